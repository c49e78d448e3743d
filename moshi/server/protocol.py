"""The chat WebSocket's wire format: binary messages whose first byte is the message kind.

Kinds are fixed by the clients already in use (Kyutai's web page, ``moshi.client``): a server that speaks
this format serves them unchanged. Audio is an Ogg Opus stream (24 kHz mono) split into messages at any page
boundary, so a reader must never assume how many pages a message holds.
"""

from __future__ import annotations

import enum


class Kind(enum.IntEnum):
    """Message kinds (byte 0 of every message)."""

    HANDSHAKE = 0x00  # server -> client, once, when the session may start sending audio
    AUDIO = 0x01  # both ways: bytes of an Ogg Opus stream
    TEXT = 0x02  # server -> client: UTF-8 of one text piece
    CONTROL = 0x03  # client -> server: one control byte (accepted, no effect)
    METADATA = 0x04  # server -> client: JSON
    ERROR = 0x05  # server -> client: UTF-8 reason, sent just before the server closes the socket
    PING = 0x06  # client -> server: no payload (accepted, no effect)
    COLORED_TEXT = 0x07  # server -> client: colour byte + UTF-8


# Kinds a client may send; anything else ends the connection.
CLIENT_KINDS = frozenset({Kind.AUDIO, Kind.CONTROL, Kind.PING})


class ProtocolError(ValueError):
    """A client message that breaks the wire format; the server reports it and closes that connection."""


def handshake() -> bytes:
    """The handshake: the kind byte alone (clients ignore any payload)."""
    return bytes([Kind.HANDSHAKE])


def audio(ogg: bytes) -> bytes:
    return bytes([Kind.AUDIO]) + ogg


def text(piece: str) -> bytes:
    return bytes([Kind.TEXT]) + piece.encode("utf-8")


def error(reason: str) -> bytes:
    return bytes([Kind.ERROR]) + reason.encode("utf-8")


def parse_client_message(message: bytes) -> tuple[Kind, bytes]:
    """Splits a client message into ``(kind, payload)``.

    Raises:
        ProtocolError: the message is empty, or its kind is not one a client sends.
    """
    if not message:
        raise ProtocolError("empty message (no kind byte)")
    kind = message[0]
    if kind not in CLIENT_KINDS:
        name = Kind(kind).name.lower() if kind in Kind._value2member_map_ else "unknown"
        raise ProtocolError(f"message kind {kind} ({name}) is not accepted from a client")
    return Kind(kind), message[1:]
