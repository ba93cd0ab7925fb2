"""Methods decorated with @handle_asynchronously, importable by worker processes (test_methods)."""

from __future__ import annotations

import os

import sqlalchemy as sa
from sqlalchemy import orm

from dbqueue import handle_asynchronously


class Base(orm.DeclarativeBase):
    pass


class CatCircle(Base):
    """delayed_job's headline example: a model whose method runs in a worker, on its row."""

    __tablename__ = "cat_circles"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str] = orm.mapped_column(sa.String(100))
    hats_flipped: orm.Mapped[int] = orm.mapped_column(default=0)

    @handle_asynchronously(priority=5)
    def flip_hats(self, times: int = 1) -> str:
        self.hats_flipped += times
        return f"{self.name} flipped {self.hats_flipped}"

    @handle_asynchronously
    def rename(self, name: str) -> str:
        self.name = name
        return name

    def wash(self) -> str:
        """Not decorated: enqueued with `delay(circle).wash()`."""
        return f"washed {self.name}"


class Hatter:
    """A plain object: its decorated method pickles the object."""

    def __init__(self, name: str) -> None:
        self.name = name

    @handle_asynchronously(queue="hats", max_attempts=1)
    def make_hat(self, size: int) -> str:
        return f"{self.name} made a size {size} hat in {os.getpid()}"


class Herd:
    """Class and static methods, decorated in both orders."""

    @handle_asynchronously(queue="census")
    @classmethod
    def census(cls, note: str) -> str:
        return f"{cls.__name__}:{note}"

    @classmethod
    @handle_asynchronously(queue="census")
    def roll_call(cls, note: str) -> str:
        return f"{cls.__name__}:{note}"

    @handle_asynchronously
    @staticmethod
    def purr(times: int) -> str:
        return "purr" * times

    @staticmethod
    @handle_asynchronously(priority=2)
    def meow(times: int) -> str:
        return "meow" * times


class BigHerd(Herd):
    """A classmethod called on a subclass runs with the subclass as `cls`."""
