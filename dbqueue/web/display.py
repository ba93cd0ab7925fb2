"""What the dashboard shows of a task's pickled columns, and how it writes ages and times.

Arguments and results are shown only after their signature verifies (the same check a worker
makes); a row that does not verify is described, never unpickled. What is shown is `repr()`,
cut to `MAX_REPR` characters, and the templates escape it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import pickle
import reprlib
from typing import Any

from dbqueue import config, errors, serializer

MAX_REPR = 2000

_repr = reprlib.Repr()
_repr.maxstring = 300
_repr.maxother = 300
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 50
_repr.maxlevel = 4


@dataclasses.dataclass
class Shown:
    """Either `text` (a verified value's repr) or `problem` (why it cannot be shown)."""

    text: str | None = None
    problem: str | None = None


def short_repr(value: Any) -> str:
    try:
        text = _repr.repr(value)
    except Exception as exc:  # a user's __repr__ may raise anything
        text = f"<repr() failed: {type(exc).__name__}>"
    return text if len(text) <= MAX_REPR else text[:MAX_REPR] + "…"


def _verified(settings: config.Settings, purpose: str, handler: str, data: bytes) -> Any:
    body = serializer.verify(settings.keyring(), purpose, handler, data)
    return pickle.loads(body)


def _load(settings: config.Settings, purpose: str, handler: str, data: bytes | None) -> Any:
    """The verified, unpickled value; _Unshowable with the reason when it cannot be shown."""
    if not serializer.module_allowed(handler, settings.allowed_modules):
        raise _Unshowable(f"handler {handler} is not on DBQUEUE_ALLOWED_MODULES: not unpickled")
    try:
        return _verified(settings, purpose, handler, data or b"")
    except errors.SignatureError as exc:
        raise _Unshowable(f"{exc}: not unpickled") from exc
    except Exception as exc:
        raise _Unshowable(
            f"signature verified, but unpickling failed in the dashboard process "
            f"({type(exc).__name__}: {exc})"
        ) from exc


class _Unshowable(Exception):
    pass


def arguments(settings: config.Settings, row: Any) -> tuple[Shown, Shown]:
    """(positional arguments, keyword arguments) of a task, verified before unpickling."""
    try:
        ref, args, kwargs = _load(settings, "payload", row.handler, row.payload)
    except _Unshowable as exc:
        return Shown(problem=str(exc)), Shown(problem=str(exc))
    except (TypeError, ValueError):
        problem = "the payload does not hold (reference, args, kwargs)"
        return Shown(problem=problem), Shown(problem=problem)
    if ref and ref[0] == "object" and len(ref) == 3:
        args = (ref[1], *args)  # the bound object, shown as the first argument (self)
    elif ref and ref[0] == "model" and len(ref) == 4:
        args = (f"<{ref[1]} primary key {ref[2]!r}>", *args)
    return Shown(text=short_repr(tuple(args))), Shown(text=short_repr(dict(kwargs)))


def result(settings: config.Settings, row: Any) -> Shown:
    """The task's return value, verified before unpickling; empty when there is none."""
    if row.result is None:
        return Shown()
    try:
        return Shown(text=short_repr(_load(settings, "result", row.handler, row.result)))
    except _Unshowable as exc:
        return Shown(problem=str(exc))


def age(seconds: float | None) -> str:
    """'4s', '3m 20s', '2h 5m', '3d 4h'; an em dash for none."""
    if seconds is None:
        return "—"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def since(then: dt.datetime | None, now: dt.datetime) -> str:
    return "—" if then is None else age((now - then).total_seconds())


def timestamp(value: dt.datetime | None) -> str:
    """UTC, to the second: the database clock's time, as every dbqueue timestamp is."""
    if value is None:
        return "—"
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
