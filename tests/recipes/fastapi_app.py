"""FastAPI recipe: `await enqueue_async(...)` inside the request's AsyncSession.

The task is inserted through the session's own connection (`AsyncSession.run_sync`), so it is
committed with the order, or rolled back with it. The task itself is an `async def`: a worker
awaits it on its event loop, beside other async tasks. Run the worker with the same DATABASE_URL:
`dbqueue work --import myapp`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel
from sqlalchemy import String, orm
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

import dbqueue


class Base(orm.DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    email: orm.Mapped[str] = orm.mapped_column(String(254))  # MySQL needs a length
    receipt_sent: orm.Mapped[bool] = orm.mapped_column(default=False)


class NewOrder(BaseModel):
    email: str


def async_url(url: str) -> str:
    """sqlite:/// -> sqlite+aiosqlite:///, mysql:// -> mysql+aiomysql://; postgresql+psycopg://
    is async already."""
    parsed = make_url(url)
    if parsed.drivername == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif parsed.get_backend_name() in {"mysql", "mariadb"}:
        parsed = parsed.set(drivername="mysql+aiomysql").update_query_dict({"charset": "utf8mb4"})
    return parsed.render_as_string(hide_password=False)


def create_app(database_url: str | None = None) -> FastAPI:
    engine = create_async_engine(async_url(database_url or os.environ["DATABASE_URL"]))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)
    app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)

    @app.post("/orders", status_code=201)
    async def create_order(
        new: NewOrder, session: Annotated[AsyncSession, Depends(get_session)]
    ) -> dict[str, int]:
        order = Order(email=new.email)
        session.add(order)
        await session.flush()  # the order has its id now
        task = await dbqueue.enqueue_async(send_receipt, (order.id,), session=session, queue="mail")
        if new.email.count("@") != 1:
            await session.rollback()  # the order and its task disappear together
            raise HTTPException(422, "invalid email")
        await session.commit()
        return {"id": order.id, "task_id": task.id}

    return app


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessions() as session:
        yield session


@functools.cache
def worker_engine(url: str) -> AsyncEngine:
    """The tasks' engine, pool included: made on first use, on the worker process's event
    loop, which lives as long as the process, so every task of the process shares it."""
    return create_async_engine(async_url(url))


async def send_receipt(order_id: int) -> None:
    engine = worker_engine(os.environ["DATABASE_URL"])
    async with AsyncSession(engine) as session, session.begin():
        order = await session.get(Order, order_id)
        assert order is not None
        order.receipt_sent = True  # ... send the email here
