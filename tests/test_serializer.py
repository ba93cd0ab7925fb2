"""Signing properties (reliability.md R24) and key handling, on the serializer alone.

No database is involved: these are properties of the envelope format and of where keys come
from, so they run once rather than per database.
"""

from __future__ import annotations

import logging
import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbqueue import config, errors, serializer

KEY_A = b"a" * 16 + b"first-key-long-enough-for-hmac"
KEY_B = b"b" * 16 + b"second-key-long-enough-for-hmac"
KEY_C = b"c" * 16 + b"third-key-never-given-to-anyone"

HANDLERS = st.from_regex(r"\A[a-z][a-z0-9_.]{0,30}:[A-Za-z_][A-Za-z0-9_.]{0,30}\Z")
PURPOSES = st.sampled_from(serializer.PURPOSES)
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=10), inner, max_size=5)
        | st.tuples(inner, inner)
    ),
    max_leaves=20,
)
ENVELOPES = st.tuples(PURPOSES, HANDLERS, st.binary(max_size=200))


def keyring(current: bytes = KEY_A, *fallbacks: bytes) -> serializer.Keyring:
    return serializer.Keyring(current, tuple(fallbacks))


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@given(PURPOSES, HANDLERS, VALUES)
def test_round_trip(purpose, handler, value):
    ring = keyring()
    assert (
        serializer.loads(ring, purpose, handler, serializer.dumps(ring, purpose, handler, value))
        == value
    )


@given(ENVELOPES, st.data())
def test_any_single_bit_flip_is_rejected(envelope_parts, data):
    purpose, handler, body = envelope_parts
    ring = keyring()
    envelope = serializer.sign(ring, purpose, handler, body)
    bit = data.draw(st.integers(0, len(envelope) * 8 - 1), label="bit")
    with pytest.raises(errors.SignatureError, match="signature did not verify"):
        serializer.verify(ring, purpose, handler, flip(envelope, bit))


def test_every_bit_of_one_envelope_is_covered():
    """Exhaustively: header (version, key id, MAC) and body, every one of the bits."""
    ring = keyring()
    envelope = serializer.dumps(ring, "payload", "tests.jobs:add", (("func",), (1, 2), {}))
    for bit in range(len(envelope) * 8):
        with pytest.raises(errors.SignatureError, match="signature did not verify"):
            serializer.verify(ring, "payload", "tests.jobs:add", flip(envelope, bit))
    assert serializer.verify(ring, "payload", "tests.jobs:add", envelope)  # untouched: fine


@given(ENVELOPES, st.data())
def test_truncation_is_rejected(envelope_parts, data):
    purpose, handler, body = envelope_parts
    ring = keyring()
    envelope = serializer.sign(ring, purpose, handler, body)
    cut = data.draw(st.integers(0, len(envelope) - 1), label="keep")
    with pytest.raises(errors.SignatureError, match="signature did not verify"):
        serializer.verify(ring, purpose, handler, envelope[:cut])


@given(ENVELOPES, st.binary(min_size=1, max_size=50))
def test_extension_is_rejected(envelope_parts, extra):
    purpose, handler, body = envelope_parts
    ring = keyring()
    envelope = serializer.sign(ring, purpose, handler, body)
    with pytest.raises(errors.SignatureError, match="signature did not verify"):
        serializer.verify(ring, purpose, handler, envelope + extra)


@given(ENVELOPES, HANDLERS)
def test_envelope_moved_to_another_handler_is_rejected(envelope_parts, other):
    purpose, handler, body = envelope_parts
    if other == handler:
        other = handler + "x"
    ring = keyring()
    envelope = serializer.sign(ring, purpose, handler, body)
    with pytest.raises(errors.SignatureError, match="signature did not verify"):
        serializer.verify(ring, purpose, other, envelope)


@given(ENVELOPES, PURPOSES)
def test_envelope_moved_to_another_purpose_is_rejected(envelope_parts, other):
    purpose, handler, body = envelope_parts
    ring = keyring()
    envelope = serializer.sign(ring, purpose, handler, body)
    if other == purpose:
        assert serializer.verify(ring, other, handler, envelope) == body
        return
    with pytest.raises(errors.SignatureError, match=f"purpose={other}"):
        serializer.verify(ring, other, handler, envelope)


def test_handler_and_purpose_boundaries_cannot_be_shifted():
    """The MAC separates fields, so moving text between handler and body does not collide."""
    ring = keyring()
    envelope = serializer.sign(ring, "payload", "a:b", b"\0c")
    with pytest.raises(errors.SignatureError):
        serializer.verify(ring, "payload", "a:b\0c", envelope)


@given(ENVELOPES)
def test_fallback_key_verifies_while_current_key_signs(envelope_parts):
    """Rotation: old rows still verify; new rows carry the new key id (Flask CVE-2025-47278)."""
    purpose, handler, body = envelope_parts
    old_ring = keyring(KEY_A)
    rotating = keyring(KEY_B, KEY_A)
    old_envelope = serializer.sign(old_ring, purpose, handler, body)
    assert serializer.verify(rotating, purpose, handler, old_envelope) == body

    new_envelope = serializer.sign(rotating, purpose, handler, body)
    assert new_envelope[1:9] == serializer.Keyring.key_id(KEY_B) != old_envelope[1:9]
    assert new_envelope == serializer.sign(keyring(KEY_B), purpose, handler, body)
    with pytest.raises(errors.SignatureError, match="key this process does not have"):
        serializer.verify(old_ring, purpose, handler, new_envelope)

    # rotation finished (fallback dropped): the old envelope no longer verifies
    with pytest.raises(errors.SignatureError, match="key this process does not have"):
        serializer.verify(keyring(KEY_B), purpose, handler, old_envelope)


def test_envelope_claiming_a_known_key_id_but_macd_with_another_key_is_rejected():
    ring = keyring(KEY_A)
    forged = serializer.sign(keyring(KEY_C), "payload", "m:f", b"body")
    forged = forged[:1] + serializer.Keyring.key_id(KEY_A) + forged[9:]
    with pytest.raises(errors.SignatureError, match="signature did not verify"):
        serializer.verify(ring, "payload", "m:f", forged)


@pytest.mark.parametrize("bad", [None, b"", b"\x01", b"\x80\x05N."])
def test_empty_short_and_unsigned_envelopes_are_rejected(bad):
    with pytest.raises(errors.SignatureError, match="signature did not verify"):
        serializer.verify(keyring(), "payload", "m:f", bad)


# -- keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 31])
def test_short_key_is_refused_wherever_it_comes_from(tmp_path, length):
    short = "k" * length
    if length:
        with pytest.raises(
            errors.ConfigurationError, match=f"DBQUEUE_SECRET_KEY is {length} bytes"
        ):
            serializer.load_keyring(short)
    with pytest.raises(errors.ConfigurationError, match="DBQUEUE_SECRET_KEY_FALLBACKS"):
        serializer.load_keyring("k" * 32, (short,))
    key_file = tmp_path / "key"
    key_file.write_text(short)
    key_file.chmod(0o600)
    with pytest.raises(errors.ConfigurationError, match=f"{key_file} is {length} bytes"):
        serializer.load_keyring(None, key_file=str(key_file))


def test_key_of_32_bytes_is_accepted():
    assert serializer.load_keyring("k" * 32).current == b"k" * 32


def test_settings_read_key_and_fallbacks_from_environment(monkeypatch):
    monkeypatch.setenv("DBQUEUE_SECRET_KEY", KEY_B.decode())
    monkeypatch.setenv("DBQUEUE_SECRET_KEY_FALLBACKS", f" {KEY_A.decode()} , {KEY_C.decode()}")
    ring = config.Settings(database_url="sqlite://").keyring()
    assert ring.current == KEY_B and ring.fallbacks == (KEY_A, KEY_C)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o660, 0o644])
def test_group_or_world_accessible_key_file_is_refused(tmp_path, mode):
    key_file = tmp_path / "key"
    key_file.write_text("k" * 48)
    key_file.chmod(mode)
    with pytest.raises(errors.ConfigurationError, match=f"chmod 600 {key_file}"):
        serializer.load_keyring(None, key_file=str(key_file))


def test_key_file_is_created_owner_only_and_named_in_the_log(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("DBQUEUE_SECRET_KEY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    old_umask = os.umask(0)  # a permissive umask must not widen the file
    try:
        with caplog.at_level(logging.WARNING, logger="dbqueue"):
            ring = serializer.load_keyring(None)
    finally:
        os.umask(old_umask)
    path = tmp_path / "config" / "dbqueue" / "key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    assert len(ring.current) >= serializer.MIN_KEY_BYTES
    assert ring.current == path.read_bytes().strip()
    assert str(path) in caplog.text and "workers on other hosts need the same key" in caplog.text
    # the next process reads the same key and says nothing
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dbqueue"):
        assert serializer.load_keyring(None).current == ring.current
    assert caplog.text == ""


def test_envelopes_from_another_key_file_do_not_verify(tmp_path):
    first = serializer.load_keyring(None, key_file=str(tmp_path / "one"))
    second = serializer.load_keyring(None, key_file=str(tmp_path / "two"))
    envelope = serializer.dumps(first, "result", "m:f", 42)
    with pytest.raises(errors.SignatureError):
        serializer.loads(second, "result", "m:f", envelope)


# -- callable references ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("handler", "allowed", "expected"),
    [
        ("tests.jobs:add", (), True),  # no allow-list: everything importable may run
        ("tests.jobs:add", ("tests",), True),
        ("tests.jobs:add", ("tests.jobs",), True),
        ("tests.jobs:add", ("app", "tests.jobs"), True),
        ("tests.jobs:add", ("tests.job",), False),
        ("tests_evil:run", ("tests",), False),  # a prefix of the name is not the package
        ("os:system", ("tests",), False),
        ("builtins:eval", ("app",), False),
    ],
)
def test_allow_list_matches_whole_module_names(handler, allowed, expected):
    assert serializer.module_allowed(handler, allowed) is expected
