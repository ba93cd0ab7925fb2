"""Flask recipe: enqueue inside the request's Flask-SQLAlchemy session.

The task is inserted on the session's connection, so it is committed with the order, or
rolled back with it: a worker never sees a receipt for an order that does not exist.
Run the worker with the same DATABASE_URL: `dbqueue work --import myapp`.
"""

from __future__ import annotations

import os

from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String, orm

import dbqueue


class Base(orm.DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Order(db.Model):
    __tablename__ = "orders"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    email: orm.Mapped[str] = orm.mapped_column(String(254))  # MySQL needs a length
    receipt_sent: orm.Mapped[bool] = orm.mapped_column(default=False)


def create_app(database_url: str | None = None) -> Flask:
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = database_url or os.environ["DATABASE_URL"]
    db.init_app(app)

    @app.post("/orders")
    def create_order() -> tuple[dict[str, int | str], int]:
        order = Order(email=request.json["email"])
        db.session.add(order)
        db.session.flush()  # the order has its id now
        task = send_receipt.enqueue((order.id,), session=db.session)
        if order.email.count("@") != 1:
            db.session.rollback()  # the order and its task disappear together
            return {"error": "invalid email"}, 422
        db.session.commit()
        return {"id": order.id, "task_id": task.id}, 201

    return app


@dbqueue.handle_asynchronously(queue="mail")
def send_receipt(order_id: int) -> None:
    """Runs in a worker, which has no request: the task opens an app context of its own."""
    with create_app().app_context():
        order = db.session.get(Order, order_id)
        order.receipt_sent = True  # ... send the email here
        db.session.commit()
        db.engine.dispose()
