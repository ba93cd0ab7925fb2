"""Event bus benchmark: publish throughput with 10 subscribing applications.

Ten applications (`bench_app_0` ... `bench_app_9`) each store five subscriptions with
`bus.sync()`: one name that matches the published event, one regex that matches it (the same
handler, so it is delivered once), one regex and two names that do not. Every publish of
`user_created` therefore reads 50 subscription rows' worth of candidates and inserts 10 tasks,
one per application. The publisher never imports a handler (the modules do not even exist).

Scenarios, each on a fresh SQLite file and a fresh PostgreSQL database:

* ``publish_own_tx``: `bus.publish(...)` alone, one transaction (commit) per publish.
* ``publish_batch_tx``: 100 publishes per transaction, on the caller's connection.
* ``nobody_subscribed``: events no one subscribes to (one read, no insert), own transaction.
* ``enqueue_many_baseline``: the same 10 tasks per transaction through `enqueue_many`, no bus:
  what the fan-out would cost without reading subscriptions.

Run alone (``scripts/bench`` calls ``main``)::

    python scripts/bench_bus.py --publishes 2000 --json bench_bus.json
"""

from __future__ import annotations

import argparse
import json
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

import dbqueue
from dbqueue import bus, config, database

APPS = 10
ATTRIBUTES = {"id": 42, "first_name": "John", "email": "john@example.com", "tags": ["a", "b"]}
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
SECRET = "bench-bus-secret-key-0123456789-abcdefghij"


def subscribe_apps(settings: config.Settings) -> int:
    """Sync 10 applications' subscriptions; returns the number of rows stored."""
    for i in range(APPS):
        handler = f"bench_app_{i}.handlers:on_user"
        bus._state = bus._State(
            app_key=f"bench_app_{i}",
            registry=[
                bus.Subscription("user_created", False, "default", handler),
                bus.Subscription("^user_", True, "default", handler),
                bus.Subscription("^order_", True, "default", f"bench_app_{i}.handlers:on_order"),
                bus.Subscription("invoice_paid", False, "critical", f"bench_app_{i}.h:on_invoice"),
                bus.Subscription("user_deleted", False, "default", f"bench_app_{i}.h:on_deleted"),
            ],
        )
        bus.sync(settings=settings)
    bus._state = bus._State(app_key="bench_publisher")
    with settings.get_engine().connect() as conn:
        return len(bus.list_subscriptions(conn))


def _rate(count: int, body: Callable[[], None]) -> float:
    start = time.perf_counter()
    body()
    return count / (time.perf_counter() - start)


def run_scenarios(settings: config.Settings, publishes: int) -> dict[str, float]:
    engine = settings.get_engine()
    rows = subscribe_apps(settings)
    figures: dict[str, float] = {"subscription_rows": rows}

    def own_tx() -> None:
        for _ in range(publishes):
            bus.publish("user_created", ATTRIBUTES, settings=settings)

    def batch_tx() -> None:
        for _ in range(publishes // 100):
            with engine.begin() as conn:
                for _ in range(100):
                    bus.publish("user_created", ATTRIBUTES, connection=conn, settings=settings)

    def nobody() -> None:
        for _ in range(publishes):
            bus.publish("page_viewed", ATTRIBUTES, settings=settings)

    def baseline() -> None:
        items = [(f"bench_app_{i}.handlers:on_user", ATTRIBUTES) for i in range(APPS)]
        for _ in range(publishes):
            dbqueue.enqueue_many(bus.dispatch, items, settings=settings)

    figures["publish_own_tx_per_s"] = _rate(publishes, own_tx)
    figures["publish_batch_tx_per_s"] = _rate(publishes // 100 * 100, batch_tx)
    figures["nobody_subscribed_per_s"] = _rate(publishes, nobody)
    figures["enqueue_many_baseline_per_s"] = _rate(publishes, baseline)
    with engine.connect() as conn:
        tasks = conn.execute(sa.text("SELECT count(*) FROM tasks")).scalar_one()
    expected = APPS * (2 * publishes + publishes // 100 * 100)
    if tasks != expected:
        raise AssertionError(f"expected {expected} tasks from the publishes, found {tasks}")
    figures["tasks_per_publish"] = APPS
    figures["publish_own_tx_tasks_per_s"] = figures["publish_own_tx_per_s"] * APPS
    return figures


@contextmanager
def sqlite_settings() -> Iterator[config.Settings]:
    with tempfile.TemporaryDirectory(prefix="bench_bus_") as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.sqlite3'}"
        settings = config.Settings(database_url=url, secret_key=SECRET)
        database.migrate(settings)
        try:
            yield settings
        finally:
            settings.get_engine().dispose()


@contextmanager
def postgresql_settings(admin_url: str) -> Iterator[config.Settings]:
    name = f"bench_bus_{secrets.token_hex(4)}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    settings = config.Settings(database_url=url, secret_key=SECRET)
    try:
        database.migrate(settings)
        yield settings
    finally:
        settings.get_engine().dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def print_table(results: dict[str, dict[str, float]]) -> None:
    rows = [
        ("publish, own transaction", "publish_own_tx_per_s", "publishes/s"),
        ("  = tasks inserted", "publish_own_tx_tasks_per_s", "tasks/s"),
        ("publish, 100 per transaction", "publish_batch_tx_per_s", "publishes/s"),
        ("event nobody subscribes to", "nobody_subscribed_per_s", "publishes/s"),
        ("enqueue_many of 10, no bus", "enqueue_many_baseline_per_s", "calls/s"),
    ]
    kinds = list(results)
    print(f"bus publish, {APPS} subscribing applications, 10 tasks per publish")
    print(f"{'scenario':<32}" + "".join(f"{k:>14}" for k in kinds) + "  unit")
    for label, key, unit in rows:
        cells = "".join(f"{results[k].get(key, float('nan')):>14,.0f}" for k in kinds)
        print(f"{label:<32}{cells}  {unit}")


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--publishes", type=int, default=2000, help="publishes per scenario")
    parser.add_argument("--pg-url", default=DEFAULT_PG, help="PostgreSQL admin URL")
    parser.add_argument("--db", action="append", choices=["sqlite", "postgresql"])
    parser.add_argument("--json", default="bench_bus.json", help="write the figures here")
    args = parser.parse_args(argv)
    if args.publishes < 100:
        parser.error("--publishes must be at least 100")
    results: dict[str, dict[str, float]] = {}
    for kind in args.db or ["sqlite", "postgresql"]:
        manager = sqlite_settings() if kind == "sqlite" else postgresql_settings(args.pg_url)
        with manager as settings:
            results[kind] = run_scenarios(settings, args.publishes)
    print_table(results)
    Path(args.json).write_text(json.dumps({"bench": "bus", "apps": APPS, **results}, indent=2))
    print(f"figures written to {args.json}")
    return results


if __name__ == "__main__":
    main()
