"""Pickling, HMAC signing and verification, and references to callables.

An envelope is `version (1 byte) | key id (8 bytes) | HMAC-SHA256 (32 bytes) | pickle`. The MAC
covers the purpose (payload, result or exception), the task's `handler` column and the pickle,
so a valid envelope cannot be moved to another column or paired with another handler. Nothing
is unpickled before its MAC verifies. Owns no SQL.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import importlib
import inspect
import os
import pickle
import secrets
import stat
import types
from pathlib import Path
from typing import Any

from dbqueue import errors

VERSION = b"\x01"
HEADER = 1 + 8 + 32
MIN_KEY_BYTES = 32
PURPOSES = ("payload", "result", "exception")


@dataclasses.dataclass(frozen=True)
class Keyring:
    """The key that signs, and the fallback keys that still verify during a rotation."""

    current: bytes
    fallbacks: tuple[bytes, ...] = ()

    @staticmethod
    def key_id(key: bytes) -> bytes:
        return _key_id(key)

    def find(self, key_id: bytes) -> bytes | None:
        for key in (self.current, *self.fallbacks):
            if hmac.compare_digest(_key_id(key), key_id):
                return key
        return None


@functools.lru_cache(maxsize=64)
def _key_id(key: bytes) -> bytes:
    # Cached: signing and verifying each task would otherwise hash every key again.
    return hashlib.sha256(b"dbqueue-key-id" + key).digest()[:8]


@functools.lru_cache(maxsize=64)
def _keyed(key: bytes) -> Any:
    """An HMAC already keyed and fed the constant prefix; each MAC starts from a copy of it,
    which skips re-deriving the padded key for every task (measured: a third of a MAC)."""
    return hmac.new(key, b"dbqueue\0", hashlib.sha256)


def default_key_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "dbqueue" / "key"


def _check_length(key: bytes, source: str) -> bytes:
    if len(key) < MIN_KEY_BYTES:
        raise errors.ConfigurationError(
            f"the secret key from {source} is {len(key)} bytes; use at least {MIN_KEY_BYTES} "
            "(python -c 'import secrets; print(secrets.token_urlsafe(48))')"
        )
    return key


def load_keyring(
    secret_key: str | None, fallback_keys: tuple[str, ...] = (), key_file: str | None = None
) -> Keyring:
    """The keyring from DBQUEUE_SECRET_KEY, or from an owner-only key file created on first use.

    The key file makes the embedded default work with no setup; workers on other hosts must be
    given the same key, which the message on creation says.
    """
    fallbacks = tuple(
        _check_length(k.encode(), "DBQUEUE_SECRET_KEY_FALLBACKS") for k in fallback_keys
    )
    if secret_key:
        return Keyring(_check_length(secret_key.encode(), "DBQUEUE_SECRET_KEY"), fallbacks)
    path = Path(key_file) if key_file else default_key_file()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first; read theirs
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(48))
            import logging

            logging.getLogger("dbqueue").warning(
                "created secret key file %s (DBQUEUE_SECRET_KEY is not set); workers on other "
                "hosts need the same key",
                path,
            )
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise errors.ConfigurationError(
            f"key file {path} is readable by group or others (mode {oct(mode & 0o777)}): "
            f"chmod 600 {path}"
        )
    return Keyring(_check_length(path.read_bytes().strip(), str(path)), fallbacks)


def _mac(key: bytes, purpose: str, handler: str, key_id: bytes, body: bytes) -> bytes:
    mac = _keyed(key).copy()
    mac.update(b"".join((purpose.encode(), b"\0", handler.encode(), b"\0", VERSION, key_id)))
    mac.update(body)
    digest: bytes = mac.digest()
    return digest


def sign(keyring: Keyring, purpose: str, handler: str, body: bytes) -> bytes:
    """Wrap a pickle in an envelope signed with the current key."""
    key_id = _key_id(keyring.current)
    return VERSION + key_id + _mac(keyring.current, purpose, handler, key_id, body) + body


def verify(keyring: Keyring, purpose: str, handler: str, envelope: bytes | None) -> bytes:
    """The pickle inside a verified envelope; SignatureError for anything else."""
    if not envelope or len(envelope) < HEADER:
        raise errors.SignatureError(f"signature did not verify (purpose={purpose}): truncated")
    envelope = bytes(envelope)
    if envelope[:1] != VERSION:
        raise errors.SignatureError(
            f"signature did not verify (purpose={purpose}): unknown envelope version"
        )
    key_id, mac, body = envelope[1:9], envelope[9:HEADER], envelope[HEADER:]
    key = keyring.find(key_id)
    if key is None:
        raise errors.SignatureError(
            f"signature did not verify (purpose={purpose}, key id={key_id.hex()}): "
            "signed with a key this process does not have"
        )
    if not hmac.compare_digest(mac, _mac(key, purpose, handler, key_id, body)):
        raise errors.SignatureError(
            f"signature did not verify (purpose={purpose}, key id={key_id.hex()})"
        )
    return body


def dumps(keyring: Keyring, purpose: str, handler: str, value: Any) -> bytes:
    return sign(keyring, purpose, handler, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def loads(keyring: Keyring, purpose: str, handler: str, envelope: bytes | None) -> Any:
    return pickle.loads(verify(keyring, purpose, handler, envelope))


# -- callable references -----------------------------------------------------------------


def undecorated(func: Any) -> Any:
    """What a task decorated with @handle_asynchronously runs: the function under the
    decorator, still bound to the object or class it was looked up on (the worker looks a
    method up on the object it reloaded, and must call the method, not enqueue it again)."""
    if inspect.ismethod(func) and hasattr(func.__func__, "__dbqueue_func__"):
        # `@classmethod` written above the decorator, on a Python whose classmethod binds the
        # object it wraps instead of asking that object's __get__ (3.13 and later)
        return types.MethodType(undecorated(func.__func__), func.__self__)
    return getattr(func, "__dbqueue_func__", func)


def handler_name(func: Any) -> str:
    """`module:qualname` of a callable, refusing ones a worker could not import."""
    func = undecorated(func)
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if module is None or qualname is None:
        raise errors.EnqueueError(
            f"tasks must be importable module-level functions; {func!r} has no module/qualname"
        )
    if qualname == "<lambda>" or "<lambda>" in qualname:
        raise errors.EnqueueError(
            f"tasks must be importable module-level functions; {module}.{qualname} is a lambda"
        )
    if "<locals>" in qualname:
        raise errors.EnqueueError(
            f"tasks must be importable module-level functions; {module}.{qualname} is a local "
            "function"
        )
    if module == "__main__":
        raise errors.EnqueueError(
            f"tasks must be importable module-level functions; {qualname} is defined in "
            "__main__, which workers cannot import: move it into a module"
        )
    return f"{module}:{qualname}"


@functools.lru_cache(maxsize=1024)
def import_handler(name: str) -> Any:
    """The callable `module:qualname` names; the decorated function if it was decorated."""
    module_name, _, qualname = name.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return undecorated(obj)


def module_allowed(handler: str, allowed_modules: tuple[str, ...]) -> bool:
    """Whether `handler`'s module is one of `allowed_modules` or inside one of them."""
    if not allowed_modules:
        return True
    module = handler.partition(":")[0]
    return any(module == m or module.startswith(m + ".") for m in allowed_modules)


def pickle_args(
    description: str, args: tuple[Any, ...], kwargs: dict[str, Any], func: Any = None
) -> None:
    """Raise EnqueueError naming the first argument of `description` that does not pickle.

    Positional arguments are named by the function's parameter when it has one, so the
    message reads `argument 'callback' (position 1) of app.mail:send`.
    """
    names = _positional_names(func)
    for position, value in enumerate(args):
        name = f"{names[position]!r} " if position < len(names) else ""
        _try_pickle(value, f"argument {name}(position {position}) of {description}")
    for name, value in kwargs.items():
        _try_pickle(value, f"argument {name!r} of {description}")


def _positional_names(func: Any) -> list[str]:
    try:
        signature = inspect.signature(undecorated(func))
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in signature.parameters.values() if p.kind in kinds]


def _try_pickle(value: Any, what: str) -> None:
    try:
        pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise errors.EnqueueError(
            f"{what} cannot be pickled: {type(value).__name__}: {exc}"
        ) from exc
