"""Counter caches: delta rows in the writer's transaction, one queued flush, exact counts."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy import orm

import dbqueue
from dbqueue import counters, executor, store, worker
from tests import counter_models as m

FLUSHES = "SELECT count(*) FROM tasks WHERE handler = 'dbqueue.counters:flush'"
QUEUED_FLUSHES = FLUSHES + " AND status IN ('queued', 'running')"


@pytest.fixture
def models(db):
    m.Base.metadata.create_all(db.engine)
    return db


def session(db) -> orm.Session:
    return orm.Session(db.engine)


def new_post(db, title: str = "p") -> int:
    with session(db) as s, s.begin():
        post = m.Post(title=title)
        s.add(post)
        s.flush()
        return post.id


def add_comments(db, post_id: int, n: int) -> list[int]:
    ids = []
    for i in range(n):
        with session(db) as s, s.begin():
            comment = m.Comment(post_id=post_id, body=str(i))
            s.add(comment)
            s.flush()
            ids.append(comment.id)
    return ids


def work_off(db) -> worker.Summary:
    return worker.Worker(db.settings, queues=["counter_caches"]).work_off()


def comments_count(db, post_id: int) -> int:
    return db.scalar("SELECT comments_count FROM posts WHERE id = :id", id=post_id)


def test_insert_writes_deltas_and_one_flush_applies_them(models):
    db = models
    post_id = new_post(db)
    add_comments(db, post_id, 5)
    assert db.scalar("SELECT count(*) FROM counter_deltas") == 5
    assert db.scalar("SELECT sum(delta) FROM counter_deltas") == 5
    assert comments_count(db, post_id) == 0  # the writers never touched the post
    assert db.scalar(QUEUED_FLUSHES + " AND queue = 'counter_caches'") == 1
    assert work_off(db).succeeded == 1
    assert comments_count(db, post_id) == 5
    assert db.scalar("SELECT count(*) FROM counter_deltas") == 0


def test_a_thousand_comments_queue_one_flush(models):
    db = models
    post_id = new_post(db)
    add_comments(db, post_id, 200)
    with session(db) as s, s.begin():  # and 800 in one transaction: one delta row for them
        s.add_all(m.Comment(post_id=post_id) for _ in range(800))
    assert db.scalar(FLUSHES) == 1
    assert db.scalar("SELECT count(*) FROM counter_deltas") == 201
    work_off(db)
    assert comments_count(db, post_id) == 1000 == db.scalar("SELECT count(*) FROM comments")


def test_rollback_leaves_neither_delta_nor_task(models):
    db = models
    post_id = new_post(db)
    with session(db) as s:
        s.add(m.Comment(post_id=post_id))
        s.flush()
        assert s.execute(sa.text("SELECT count(*) FROM counter_deltas")).scalar() == 1
        s.rollback()
    assert db.scalar("SELECT count(*) FROM counter_deltas") == 0
    assert db.scalar("SELECT count(*) FROM tasks") == 0
    assert db.scalar("SELECT count(*) FROM comments") == 0


def test_writers_never_update_the_parent_row(models):
    db = models
    post_id, other_id = new_post(db), new_post(db)
    statements: list[str] = []

    def capture(conn, cursor, statement, *args):
        statements.append(statement)

    sa.event.listen(db.engine, "before_cursor_execute", capture)
    try:
        (comment_id,) = add_comments(db, post_id, 1)
        with session(db) as s, s.begin():
            s.get(m.Comment, comment_id).post_id = other_id
        with session(db) as s, s.begin():
            s.delete(s.get(m.Comment, comment_id))
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", capture)
    assert any("INSERT INTO counter_deltas" in s for s in statements)
    assert not [s for s in statements if s.lstrip().upper().startswith("UPDATE POSTS")]
    if db.kind == "postgresql":
        # A transaction holding the post row (as a flush or an app would) does not block
        # inserting its comments: the writer takes no lock that conflicts with it.
        with db.engine.connect() as holder:
            holder.execute(
                sa.text("SELECT 1 FROM posts WHERE id = :id FOR NO KEY UPDATE"), {"id": post_id}
            )
            with session(db) as s, s.begin():
                s.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
                s.add(m.Comment(post_id=post_id))
            holder.rollback()


def test_delete_and_reparent_move_the_counts(models):
    db = models
    a, b = new_post(db, "a"), new_post(db, "b")
    ids = add_comments(db, a, 4)
    with session(db) as s, s.begin():  # re-parent through the foreign key column
        s.get(m.Comment, ids[0]).post_id = b
    with session(db) as s, s.begin():  # through the relationship
        s.get(m.Comment, ids[1]).post = s.get(m.Post, b)
    with session(db) as s, s.begin():  # to no parent at all
        s.get(m.Comment, ids[2]).post_id = None
    with session(db) as s:  # delete an expired instance: its post_id is not in memory
        comment = s.get(m.Comment, ids[3])
        s.commit()
        s.delete(comment)
        s.commit()
    with session(db) as s, s.begin():  # a change that is not a re-parenting: no delta
        s.get(m.Comment, ids[0]).body = "edited"
    work_off(db)
    assert (comments_count(db, a), comments_count(db, b)) == (0, 2)
    assert db.scalar("SELECT count(*) FROM counter_deltas") == 0
    assert db.scalar("SELECT sum(delta) FROM counter_deltas") is None


def test_custom_column_name(models):
    db = models
    post_id = new_post(db)
    with session(db) as s, s.begin():
        s.add_all([m.Like(post_id=post_id), m.Like(post_id=post_id)])
    work_off(db)
    assert db.scalar("SELECT count_of_likes FROM posts WHERE id = :id", id=post_id) == 2
    assert comments_count(db, post_id) == 0


def test_string_and_uuid_primary_keys(models):
    db = models
    album_id = uuid.uuid4()
    with session(db) as s, s.begin():
        s.add_all([m.Author(handle="ann o'neil"), m.Album(id=album_id)])
    with session(db) as s, s.begin():
        s.add_all([m.Book(author_handle="ann o'neil") for _ in range(3)])
        s.add_all([m.Track(album_id=album_id) for _ in range(2)])
    assert sorted(r[0] for r in db.rows("SELECT row_id FROM counter_deltas")) == sorted(
        [str(album_id), "ann o'neil"]
    )
    work_off(db)
    assert db.scalar("SELECT books_count FROM authors") == 3
    assert db.scalar("SELECT tracks_count FROM albums") == 2


def test_a_primary_key_over_200_characters_is_refused_naming_the_limit(models):
    """`counter_deltas.row_id` is VARCHAR(200) (text on SQLite): a longer key is refused on
    every engine, naming the limit, instead of the driver's "value too long" (or, on SQLite,
    a delta no other engine could store); nothing is written. 200 characters fit."""
    db = models
    counters.increment(m.Author, "h" * 200, "books_count")
    assert db.scalar("SELECT row_id FROM counter_deltas") == "h" * 200
    with pytest.raises(counters.CounterCacheError) as refused:
        counters.increment(m.Author, "é" * 201, "books_count")
    assert "is 201 characters, limit is 200 (counter_deltas.row_id)" in str(refused.value)
    assert db.scalar("SELECT count(*) FROM counter_deltas") == 1
    assert db.scalar(FLUSHES) == 1


def test_flush_without_the_model_reflects_the_table(models):
    db = models
    post_id = new_post(db)
    with session(db) as s, s.begin():
        s.add(m.Author(handle="bo"))
    with db.engine.begin() as conn:
        counters.insert_deltas(
            conn,
            [
                counters.Delta("posts", str(post_id), "comments_count", 7),
                counters.Delta("authors", "bo", "books_count", 2),
            ],
        )
    assert counters.flush("posts", str(post_id), "comments_count") == 7
    assert counters.flush("authors", "bo", "books_count") == 2
    assert comments_count(db, post_id) == 7
    assert db.scalar("SELECT books_count FROM authors") == 2


def test_registration_errors_are_clear():
    with pytest.raises(counters.CounterCacheError, match=r"already counted by Comment\.post"):
        dbqueue.async_counter_cache(m.Comment.post)
    with pytest.raises(counters.CounterCacheError, match="needs a many-to-one"):
        dbqueue.async_counter_cache(m.Tag.comments)
    with pytest.raises(counters.CounterCacheError, match="has no column 'nope'"):
        dbqueue.async_counter_cache(m.Comment.post, column="nope")
    with pytest.raises(counters.CounterCacheError, match="relationship attribute"):
        dbqueue.async_counter_cache(m.Comment.post_id)
    with pytest.raises(counters.CounterCacheError, match="queue must be"):
        dbqueue.async_counter_cache(m.TaggedComment.tag, queue="")


def test_increment_and_decrement_any_counter(models):
    db = models
    post_id = new_post(db)
    counters.increment(m.Post, post_id, "views_count", by=5)
    counters.decrement(m.Post, post_id, "views_count")
    with session(db) as s:
        counters.increment(m.Post, post_id, "views_count", session=s)
        s.rollback()  # rolled back with the caller's transaction
    with db.engine.begin() as conn:
        counters.increment(m.Post.__table__, post_id, "views_count", by=10, connection=conn)
    assert db.scalar(FLUSHES) == 1
    work_off(db)
    assert db.scalar("SELECT views_count FROM posts") == 14
    with pytest.raises(counters.CounterCacheError, match="posts has no column 'view_count'"):
        counters.increment(m.Post, post_id, "view_count")
    with pytest.raises(counters.CounterCacheError, match="by must be an int"):
        counters.increment(m.Post, post_id, "views_count", by=1.5)


def test_inline_mode_applies_in_the_writers_transaction(models):
    db = models
    post_id = new_post(db)
    with dbqueue.inline():
        add_comments(db, post_id, 3)
    assert comments_count(db, post_id) == 3
    assert db.scalar("SELECT count(*) FROM counter_deltas") == 0


def test_reconcile_recounts_from_the_rows(models):
    db = models
    a, b = new_post(db), new_post(db)
    add_comments(db, a, 3)
    add_comments(db, b, 1)
    with db.engine.begin() as conn:  # drift, as Core inserts that bypass the ORM would cause
        conn.execute(sa.text("UPDATE posts SET comments_count = 40 WHERE id = :id"), {"id": a})
        conn.execute(
            sa.text("INSERT INTO comments (post_id, body) VALUES (:id, 'core')"), {"id": b}
        )
    assert counters.reconcile(m.Comment.post, batch_size=1) == 2
    assert (comments_count(db, a), comments_count(db, b)) == (3, 2)
    assert db.scalar("SELECT count(*) FROM counter_deltas") == 0
    work_off(db)  # the flushes still queued find nothing left to apply
    assert (comments_count(db, a), comments_count(db, b)) == (3, 2)
    with pytest.raises(counters.CounterCacheError, match="no counter cache is registered"):
        counters.reconcile(m.TaggedComment.tag)


def test_reconcile_command(models):
    db = models
    post_id = new_post(db)
    add_comments(db, post_id, 2)
    result = db.cli("counters", "reconcile", "--import", "tests.counter_models")
    assert result.returncode == 0, result.stderr
    assert "posts.comments_count (Comment.post): 1 corrected" in result.stdout
    assert comments_count(db, post_id) == 2
    result = db.cli(
        "counters", "reconcile", "--import", "tests.counter_models", "--only", "Comment.post"
    )
    assert "0 corrected" in result.stdout and "books_count" not in result.stdout
    result = db.cli("counters", "reconcile")
    assert result.returncode != 0 and "no counter caches" in result.stderr


def test_a_delta_written_while_its_flush_runs_gets_a_new_flush(models):
    """The unique key is held while a flush is queued, and given up once it reads."""
    db = models
    post_id = new_post(db)
    add_comments(db, post_id, 1)
    with db.engine.begin() as conn:
        (row,) = store.claim(conn, "w", 1, ["counter_caches"])
    add_comments(db, post_id, 1)  # the flush is running but has not read: counted on
    assert db.scalar(QUEUED_FLUSHES) == 1
    outcome = executor.execute(db.settings, row)
    assert comments_count(db, post_id) == 2
    add_comments(db, post_id, 1)  # it has read and still shows running: a new flush queues
    assert db.scalar(FLUSHES + " AND status = 'queued'") == 1
    with db.engine.begin() as conn:
        assert store.record(conn, "w", [outcome]) == 1
    work_off(db)
    assert comments_count(db, post_id) == 3
    assert db.scalar("SELECT count(*) FROM counter_deltas") == 0


def test_flush_waits_for_a_writer_in_flight(models, monkeypatch):
    db = models
    monkeypatch.setattr(counters, "LOCK_TIMEOUT_MS", 20_000)  # wait here rather than retry
    post_id = new_post(db)
    add_comments(db, post_id, 1)
    writer = session(db)
    writer.begin()
    writer.add(m.Comment(post_id=post_id))
    writer.flush()  # delta written, transaction open: the queued flush counts on it
    results: list[int] = []
    flusher = threading.Thread(
        target=lambda: results.append(counters.flush("posts", str(post_id), "comments_count"))
    )
    flusher.start()
    time.sleep(0.5)
    assert flusher.is_alive()  # waiting for the writer, not reading without its delta
    writer.commit()
    writer.close()
    flusher.join(10)
    assert results == [2]
    assert comments_count(db, post_id) == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_writer_processes_and_a_worker_keep_the_hot_counter_exact(models):
    db = models
    post_id = new_post(db)
    worker_proc = db.popen(
        "work",
        "--queue",
        "counter_caches",
        "--import",
        "tests.counter_models",
        "--concurrency",
        "2",
        "--sleep-delay",
        "0.1",
    )
    db.wait_for("SELECT count(*) FROM workers", 2, timeout=60)  # flushing before writes start
    writers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from tests.counter_models import write; "
                "write(sys.argv[1], int(sys.argv[2]), 150, int(sys.argv[3]))",
                db.url,
                str(post_id),
                str(seed),
            ],
            env=db.env,
            cwd=db.tmp_path,
        )
        for seed in range(4)
    ]
    # counter + pending deltas = count(*) in every committed state, sampled in one statement.
    drift = sa.text(
        "SELECT (SELECT comments_count FROM posts WHERE id = :id)"
        " + (SELECT coalesce(sum(delta), 0) FROM counter_deltas WHERE row_id = :rid"
        "    AND column_name = 'comments_count')"
        " - (SELECT count(*) FROM comments WHERE post_id = :id)"
    )
    samples = []
    try:
        while any(w.poll() is None for w in writers):
            with db.engine.connect() as conn:
                samples.append(conn.execute(drift, {"id": post_id, "rid": str(post_id)}).scalar())
            time.sleep(0.05)
        for w in writers:
            assert w.wait(240) == 0
        db.wait_for("SELECT count(*) FROM counter_deltas", 0, timeout=60)
        db.wait_for(QUEUED_FLUSHES, 0, timeout=60)
    finally:
        worker_proc.send_signal(signal.SIGTERM)
        _out, err = worker_proc.communicate(timeout=60)
    assert worker_proc.returncode == 0, err
    total = db.scalar("SELECT count(*) FROM comments WHERE post_id = :id", id=post_id)
    assert 0 < total < 600  # the writers inserted and deleted
    assert db.scalar("SELECT count(*) FROM tasks WHERE status = 'failed'") == 0
    assert comments_count(db, post_id) == total
    # many flush runs while the writers wrote: new flush tasks, or one flush run again after
    # it gave up waiting for the writers' locks (one task in a CI run on MariaDB)
    flush_runs = "SELECT sum(attempts) FROM tasks WHERE handler = 'dbqueue.counters:flush'"
    assert db.scalar(flush_runs) > 1
    assert len(samples) > 10 and set(samples) == {0}


def test_a_lock_cycle_with_the_application_costs_the_flush_not_the_writer(models):
    """The writer updates the post, then adds a comment; a flush between them holds the lock."""
    db = models
    post_id = new_post(db)
    add_comments(db, post_id, 1)
    writer = session(db)
    writer.begin()
    writer.get(m.Post, post_id).title = "edited"
    writer.flush()  # the writer holds the post row
    outcome: list[object] = []

    def run_flush():
        try:
            outcome.append(counters.flush("posts", str(post_id), "comments_count"))
        except sa.exc.OperationalError as exc:
            outcome.append(exc)

    flusher = threading.Thread(target=run_flush)
    flusher.start()
    time.sleep(0.2)  # the flush holds the counter's lock and waits for the post row
    writer.add(m.Comment(post_id=post_id))
    writer.commit()  # the writer is never the one that fails
    writer.close()
    flusher.join(30)
    if db.kind == "postgresql":
        assert "lock timeout" in str(outcome[0])  # retried later by the worker
    else:
        assert outcome == [2]  # SQLite: the flush waited for the writer to commit
    work_off(db)
    assert comments_count(db, post_id) == 2
    assert db.scalar("SELECT title FROM posts") == "edited"


def insert_deltas(db, post_id: int, n: int) -> None:
    with db.engine.begin() as conn:
        counters.insert_deltas(
            conn, [counters.Delta("posts", str(post_id), "comments_count", 1)] * n
        )


def test_concurrent_flushes_apply_each_delta_once(models):
    db = models
    post_id = new_post(db)
    insert_deltas(db, post_id, 50)
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(counters.flush("posts", str(post_id), "comments_count"))
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results, reverse=True)[:1] == [50] and sum(results) == 50
    assert comments_count(db, post_id) == 50


def test_a_long_backlog_is_applied_in_batches(models, monkeypatch):
    db = models
    monkeypatch.setattr(counters, "FLUSH_BATCH", 3)
    post_id = new_post(db)
    insert_deltas(db, post_id, 7)
    assert counters.flush("posts", str(post_id), "comments_count") == 3
    assert db.scalar(QUEUED_FLUSHES) == 1  # a successor for the rest
    assert work_off(db).succeeded == 2
    assert comments_count(db, post_id) == 7
    assert db.scalar("SELECT count(*) FROM counter_deltas") == 0


def test_deltas_of_a_deleted_parent_are_dropped(models):
    db = models
    post_id = new_post(db)
    add_comments(db, post_id, 2)
    with session(db) as s, s.begin():
        for comment in s.scalars(sa.select(m.Comment)):
            s.delete(comment)
        s.flush()
        s.delete(s.get(m.Post, post_id))
    assert work_off(db).succeeded == 1
    assert db.scalar("SELECT count(*) FROM counter_deltas") == 0
