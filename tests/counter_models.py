"""Models with counter caches, for tests/test_counters.py and the worker processes it starts.

Importing this module declares the counters (workers get it with `--import`). `write()` is one
writer process of the concurrency test.
"""

from __future__ import annotations

import random
import time
import uuid

import sqlalchemy as sa
from sqlalchemy import orm

from dbqueue import async_counter_cache, config


class Base(orm.DeclarativeBase):
    pass


class Post(Base):
    __tablename__ = "posts"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    title: orm.Mapped[str] = orm.mapped_column(sa.String(100), default="")
    comments_count: orm.Mapped[int] = orm.mapped_column(default=0)
    count_of_likes: orm.Mapped[int] = orm.mapped_column(default=0)
    views_count: orm.Mapped[int] = orm.mapped_column(default=0)


class Comment(Base):
    __tablename__ = "comments"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    post_id: orm.Mapped[int | None] = orm.mapped_column(sa.ForeignKey("posts.id"), index=True)
    body: orm.Mapped[str] = orm.mapped_column(sa.String(200), default="")
    post: orm.Mapped[Post | None] = orm.relationship()


class Like(Base):
    __tablename__ = "likes"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    post_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey("posts.id"), index=True)
    post: orm.Mapped[Post] = orm.relationship()


class Author(Base):
    """A string primary key."""

    __tablename__ = "authors"
    handle: orm.Mapped[str] = orm.mapped_column(sa.String(50), primary_key=True)
    books_count: orm.Mapped[int] = orm.mapped_column(default=0)


class Book(Base):
    __tablename__ = "books"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    author_handle: orm.Mapped[str] = orm.mapped_column(sa.ForeignKey("authors.handle"))
    author: orm.Mapped[Author] = orm.relationship()


class Album(Base):
    """A UUID primary key (native on PostgreSQL, CHAR(32) on SQLite)."""

    __tablename__ = "albums"
    id: orm.Mapped[uuid.UUID] = orm.mapped_column(primary_key=True, default=uuid.uuid4)
    tracks_count: orm.Mapped[int] = orm.mapped_column(default=0)


class Track(Base):
    __tablename__ = "tracks"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    album_id: orm.Mapped[uuid.UUID] = orm.mapped_column(sa.ForeignKey("albums.id"))
    album: orm.Mapped[Album] = orm.relationship()


class Tag(Base):
    """Not counted: a one-to-many relationship the counter refuses."""

    __tablename__ = "tags"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    tagged_comments_count: orm.Mapped[int] = orm.mapped_column(default=0)
    comments: orm.Mapped[list[TaggedComment]] = orm.relationship(back_populates="tag")


class TaggedComment(Base):
    __tablename__ = "tagged_comments"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    tag_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey("tags.id"))
    tag: orm.Mapped[Tag] = orm.relationship(back_populates="comments")


async_counter_cache(Comment.post)  # posts.comments_count
async_counter_cache(Like.post, column="count_of_likes")
async_counter_cache(Book.author)
async_counter_cache(Track.album)  # albums.tracks_count


def write(url: str, post_id: int, operations: int, seed: int) -> None:
    """Insert and delete comments of one post, one transaction each (a writer process)."""
    engine = config.create_engine(url)
    rng = random.Random(seed)
    mine: list[int] = []
    try:
        for n in range(operations):
            with orm.Session(engine) as session, session.begin():
                if mine and rng.random() < 0.35:
                    comment = session.get(Comment, mine.pop(rng.randrange(len(mine))))
                    session.delete(comment)
                    session.flush()
                else:
                    comment = Comment(post_id=post_id, body=f"{seed}-{n}")
                    session.add(comment)
                    session.flush()
                    mine.append(comment.id)
                # The rest of the request's work: the delta is written, not yet committed.
                time.sleep(rng.random() * 0.005)
    finally:
        engine.dispose()
