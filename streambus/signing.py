"""Signed signals: who may release a waiter is whoever holds the swarm's signing key, not whoever
can write to Redis.

A :class:`Keyring` holds one or more keys, each with an id. The first signs; every key verifies,
so a key rotates by putting the new one first and keeping the old one until the signals it
signed are consumed. Each swarm signs with its own key, derived from the keyring's secret
(``HMAC(secret, "streambus/swarm/" + swarm)``), so a key handed to one swarm's agents signs
nothing in another.

A signal's signature is an HMAC-SHA256 over (swarm, channel, signal id, sender, payload), the
payload in a canonical JSON form (keys sorted), carried in the event's ``key_id`` and ``sig``
fields. A verifying waiter checks it against the swarm and channel *it reads*, not the ones the
event claims, so a signed signal copied to another channel or swarm does not verify.

An ACK is signed the same way by a coordinator that holds the key: an HMAC over (swarm,
channel, signal id, coordinator, the signal's stream id, iteration), under its own domain tag so
that no signal signature is ever a valid ACK signature. A sender that requires signed ACKs
checks each against the signal and the coordinator *it awaits*.

Keys come from ``STREAMBUS_SIGNING_KEY`` (``ID:SECRET``) or the file ``STREAMBUS_SIGNING_KEY_FILE``
names (one ``ID:SECRET`` per line, the signing key first).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec

from streambus.errors import InvalidInput
from streambus.keys import validate_id
from streambus.schema import Ack, Signal

ENV_KEY: Final = "STREAMBUS_SIGNING_KEY"
ENV_KEY_FILE: Final = "STREAMBUS_SIGNING_KEY_FILE"
MIN_SECRET_BYTES: Final = 16
_CANONICAL: Final = msgspec.json.Encoder(order="deterministic")


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One key: its id (public, carried by every signature) and its secret."""

    key_id: str
    secret: bytes = field(repr=False)

    @classmethod
    def parse(cls, text: str, where: str) -> SigningKey:
        key_id, colon, secret = text.strip().partition(":")
        if not colon:
            raise InvalidInput(f"{where}: a signing key is ID:SECRET (the id names it for "
                               "rotation)")
        validate_id(key_id, "signing key id")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise InvalidInput(f"{where}: the secret of key {key_id!r} is shorter than "
                               f"{MIN_SECRET_BYTES} bytes")
        return cls(key_id, secret.encode())

    def for_swarm(self, swarm: str) -> bytes:
        return hmac.new(self.secret, b"streambus/swarm/" + swarm.encode(), hashlib.sha256
                        ).digest()


@dataclass(frozen=True, slots=True)
class Keyring:
    """The signing key (first) and every key still accepted."""

    keys: tuple[SigningKey, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise InvalidInput("a keyring needs at least one key")

    def __repr__(self) -> str:
        return f"<Keyring signs with {self.keys[0].key_id!r}, accepts {len(self.keys)} keys>"

    @classmethod
    def from_env(cls) -> Keyring | None:
        """The keyring of ``STREAMBUS_SIGNING_KEY`` or ``STREAMBUS_SIGNING_KEY_FILE``, if set."""
        if text := os.environ.get(ENV_KEY):
            return cls((SigningKey.parse(text, ENV_KEY),))
        if path := os.environ.get(ENV_KEY_FILE):
            return cls.from_file(Path(path))
        return None

    @classmethod
    def from_file(cls, path: Path) -> Keyring:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not text"
            raise InvalidInput(f"cannot read signing key file {str(path)!r}: {why}") from None
        keys = tuple(SigningKey.parse(line, f"{path}:{n}") for n, line in enumerate(lines, 1)
                     if line.strip() and not line.lstrip().startswith("#"))
        if not keys:
            raise InvalidInput(f"signing key file {str(path)!r} holds no key")
        return cls(keys)

    def sign_signal(self, swarm: str, channel: str, signal_id: str, sender: str,
                    payload: Any) -> tuple[str, str]:
        """``(key_id, signature)`` for a signal, with the signing key."""
        key = self.keys[0]
        return key.key_id, _mac(_SIGNAL, key.for_swarm(swarm), swarm, channel, signal_id, sender,
                                payload)

    def verify_signal(self, signal: Signal, swarm: str, channel: str) -> str | None:
        """``None`` if ``signal``, read from ``channel`` of ``swarm``, carries a valid
        signature; else why not (the dead-letter reason)."""
        if not signal.sig:
            return f"unsigned signal {signal.signal_id!r} from {signal.sender or 'anonymous'!r}"
        key = next((k for k in self.keys if k.key_id == signal.key_id), None)
        if key is None:
            return f"signal {signal.signal_id!r} signed with unknown key {signal.key_id!r}"
        try:
            want = _mac(_SIGNAL, key.for_swarm(swarm), swarm, channel, signal.signal_id,
                        signal.sender, signal.payload)
        except (TypeError, ValueError, msgspec.EncodeError):  # pragma: no cover - decoded JSON
            return f"signal {signal.signal_id!r} has a payload that cannot be canonicalised"
        if not _same(want, signal.sig):
            return (f"signal {signal.signal_id!r} from {signal.sender or 'anonymous'!r} has a "
                    f"bad signature (forged, altered, or signed for another channel)")
        return None


    def sign_ack(self, swarm: str, channel: str, signal_id: str, coordinator: str,
                 stream_id: str, iteration: int) -> tuple[str, str]:
        """``(key_id, signature)`` for ``coordinator``'s ACK of a signal, with the signing key."""
        key = self.keys[0]
        return key.key_id, _mac(_ACK, key.for_swarm(swarm), swarm, channel, signal_id,
                                coordinator, stream_id, iteration)

    def verify_ack(self, ack: Ack, swarm: str, signal_id: str, coordinator: str) -> str | None:
        """``None`` if ``ack`` is ``coordinator``'s validly signed ACK of ``signal_id`` in
        ``swarm``; else why not (the dead-letter reason)."""
        if ack.coordinator != coordinator or ack.signal_id != signal_id:
            return (f"ACK recorded for {coordinator!r} of signal {signal_id!r} is "
                    f"{ack.coordinator!r}'s of {ack.signal_id!r}")
        if not ack.sig:
            return f"unsigned ACK from {coordinator!r} of signal {signal_id!r}"
        key = next((k for k in self.keys if k.key_id == ack.key_id), None)
        if key is None:
            return f"ACK from {coordinator!r} signed with unknown key {ack.key_id!r}"
        want = _mac(_ACK, key.for_swarm(swarm), swarm, ack.channel, signal_id, coordinator,
                    ack.stream_id, ack.iteration)
        if not _same(want, ack.sig):
            return (f"ACK from {coordinator!r} of signal {signal_id!r} has a bad signature "
                    "(forged or altered)")
        return None


_SIGNAL: Final = "streambus-signal/1"
_ACK: Final = "streambus-ack/1"


def _same(want: str, got: str) -> bool:
    """Constant-time comparison of a hex MAC with any string an entry carries (as bytes:
    ``compare_digest`` refuses a ``str`` with non-ASCII characters)."""
    return hmac.compare_digest(want.encode(), got.encode("utf-8", "replace"))


def _mac(domain: str, key: bytes, *parts: Any) -> str:
    message = _CANONICAL.encode([domain, *parts])
    return hmac.new(key, message, hashlib.sha256).hexdigest()
