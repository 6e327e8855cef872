"""The SAP wire format: one frame per message, read from bytes or from a socket with hard limits.

A frame is ``MAGIC (4 bytes "SAP1") | header length (uint32, big endian) | blob length (uint64, big endian) |
header (UTF-8 JSON object) | blob (safetensors bytes)``. Tensors only ever travel as safetensors; nothing
received is unpickled or ``torch.load``-ed, and pickled / ``torch.save`` payloads are refused explicitly.

Limits enforced before anything is allocated or parsed:

- the header is at most :data:`MAX_HEADER_BYTES` (64 KiB) and its JSON nests at most :data:`MAX_JSON_DEPTH` levels
  (a deeply nested header would otherwise raise ``RecursionError`` inside ``json.loads``);
- a whole frame is at most ``max_frame_bytes`` (default :data:`DEFAULT_MAX_FRAME_BYTES`, 256 MiB), checked on the
  16-byte prefix, so a client that *claims* a 2 GiB blob is refused at once;
- socket reads can be given deadlines (``idle_timeout`` for the first byte, ``frame_timeout`` for the rest), so a
  client that sends a few bytes and stalls is dropped instead of holding the connection forever.

Example:
    >>> import torch
    >>> from hf_ewtune.sap.wire import Message, encode_frame, decode_frame
    >>> msg = Message(kind="predict", meta={"step": 1}, tensors={"hidden": torch.ones(1, 2, 3)})
    >>> out = decode_frame(encode_frame(msg))
    >>> out.kind, out.meta["step"], out.tensors["hidden"].shape
    ('predict', 1, torch.Size([1, 2, 3]))
"""

from __future__ import annotations

import json
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["Message", "SAPProtocolError", "SAPTimeoutError", "encode_frame", "decode_frame", "read_frame",
           "write_frame", "MAX_HEADER_BYTES", "MAX_JSON_DEPTH", "DEFAULT_MAX_FRAME_BYTES", "MAX_BLOB_BYTES"]

MAGIC = b"SAP1"
_PREFIX = struct.Struct(">4sIQ")
PREFIX_BYTES = _PREFIX.size
MAX_HEADER_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32
DEFAULT_MAX_FRAME_BYTES = 256 * 1024**2
MAX_BLOB_BYTES = DEFAULT_MAX_FRAME_BYTES  # old name, kept for backward compatibility


class SAPProtocolError(ValueError):
    """A frame is malformed, truncated, oversized, or carries a refused (e.g. pickled) payload."""


class SAPTimeoutError(SAPProtocolError):
    """The peer did not send a whole frame (or the handshake) within the allowed time."""


@dataclass
class Message:
    """One protocol message: a ``kind``, a small JSON-able ``meta`` dict and named tensors."""

    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _looks_pickled(blob: bytes) -> str | None:
    if blob[:1] == b"\x80" and len(blob) > 1 and blob[1] <= 5:
        return "a pickle stream"
    if blob[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save format)"
    return None


def encode_frame(message: Message) -> bytes:
    """Serialise ``message`` to one frame (JSON header + safetensors blob)."""
    header = json.dumps({"kind": message.kind, "meta": message.meta}, separators=(",", ":")).encode("utf-8")
    if len(header) > MAX_HEADER_BYTES:
        raise SAPProtocolError(f"header is {len(header)} bytes, over the {MAX_HEADER_BYTES}-byte limit; "
                               "send large data as tensors, not in meta.")
    tensors = {k: v.detach().contiguous().cpu() for k, v in message.tensors.items()}
    blob = st_save(tensors) if tensors else b""
    return _PREFIX.pack(MAGIC, len(header), len(blob)) + header + blob


def _parse_prefix(prefix: bytes, max_frame_bytes: int) -> tuple[int, int]:
    if len(prefix) < _PREFIX.size:
        raise SAPProtocolError(f"truncated frame: {len(prefix)} bytes, the prefix alone needs {_PREFIX.size}.")
    why = _looks_pickled(prefix)
    if why:
        raise SAPProtocolError(f"refusing a frame that is {why}; only SAP1 frames with safetensors blobs are accepted.")
    magic, hlen, blen = _PREFIX.unpack(prefix[:_PREFIX.size])
    if magic != MAGIC:
        raise SAPProtocolError(f"bad frame magic {magic!r} (expected {MAGIC!r}).")
    if hlen > MAX_HEADER_BYTES:
        raise SAPProtocolError(f"header length {hlen} exceeds {MAX_HEADER_BYTES}.")
    if hlen + blen > max_frame_bytes:
        raise SAPProtocolError(f"frame of {hlen + blen} bytes (blob length {blen}) exceeds max_frame_bytes="
                               f"{max_frame_bytes}; send smaller batches (batch_size=) or raise max_frame_bytes= "
                               "on both sides.")
    return hlen, blen


def _check_json_depth(text: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than ``limit`` before ``json.loads`` can recurse on it."""
    if text.count("[") + text.count("{") <= limit:
        return
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                raise SAPProtocolError(f"frame header nests deeper than {limit} levels; refusing to parse it.")
        elif ch in "]}":
            depth -= 1


def _parse_body(header: bytes, blob: bytes) -> Message:
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SAPProtocolError(f"frame header is not UTF-8 JSON: {exc}") from None
    _check_json_depth(text)
    try:
        head = json.loads(text)
    except (ValueError, RecursionError) as exc:  # bad JSON, or an int over Python's digit limit
        raise SAPProtocolError(f"frame header is not UTF-8 JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(head, dict) or not isinstance(head.get("kind"), str) or not isinstance(head.get("meta", {}), dict):
        raise SAPProtocolError("frame header must be a JSON object with a string 'kind' and an object 'meta'.")
    tensors: dict[str, torch.Tensor] = {}
    if blob:
        why = _looks_pickled(blob)
        if why:
            raise SAPProtocolError(f"refusing a tensor payload that is {why}; only safetensors is accepted.")
        try:
            tensors = st_load(bytes(blob))
        except Exception as exc:  # safetensors raises its own error types
            raise SAPProtocolError(f"tensor payload is not valid safetensors: {exc}") from None
    return Message(kind=head["kind"], meta=head.get("meta", {}), tensors=tensors)


def decode_frame(frame: bytes, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Message:
    """Parse exactly one frame; raises :class:`SAPProtocolError` on anything malformed, oversized or truncated."""
    hlen, blen = _parse_prefix(frame, max_frame_bytes)
    expected = _PREFIX.size + hlen + blen
    if len(frame) != expected:
        kind = "truncated" if len(frame) < expected else "oversized"
        raise SAPProtocolError(f"{kind} frame: {len(frame)} bytes, the prefix announces {expected}.")
    body = frame[_PREFIX.size:]
    return _parse_body(body[:hlen], body[hlen:])


def _recv_exact(sock: socket.socket, n: int, deadline: float | None, what: str) -> bytes:
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SAPTimeoutError(f"timed out waiting for {what} ({got} of {n} bytes received).")
            sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(n - got, 1 << 20))
        except (socket.timeout, TimeoutError):
            raise SAPTimeoutError(f"timed out waiting for {what} ({got} of {n} bytes received).") from None
        if not chunk:
            raise SAPProtocolError(f"truncated frame: connection closed after {got} of {n} bytes of {what}.")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
               idle_timeout: float | None = None, frame_timeout: float | None = None) -> Message:
    """Read one frame from a connected socket.

    Args:
        sock: A connected (optionally TLS-wrapped) socket.
        max_frame_bytes: Refuse (from the 16-byte prefix alone) frames announcing more than this many bytes.
        idle_timeout: Seconds to wait for the first byte; ``None`` keeps the socket's own timeout.
        frame_timeout: Seconds for the rest of the frame once its first byte arrived; ``None`` keeps the
            socket's own (per-read) timeout.

    Raises:
        SAPProtocolError: Malformed, oversized, pickled or truncated frame.
        SAPTimeoutError: A deadline passed.
    """
    first_deadline = None if idle_timeout is None else time.monotonic() + idle_timeout
    first = _recv_exact(sock, 1, first_deadline, "the next frame")
    deadline = None if frame_timeout is None else time.monotonic() + frame_timeout
    prefix = first + _recv_exact(sock, _PREFIX.size - 1, deadline, "the frame prefix")
    hlen, blen = _parse_prefix(prefix, max_frame_bytes)
    header = _recv_exact(sock, hlen, deadline, "the frame header")
    blob = _recv_exact(sock, blen, deadline, "the tensor payload") if blen else b""
    return _parse_body(header, blob)


def write_frame(sock: socket.socket, message: Message, *, timeout: float | None = None) -> None:
    """Send one frame; ``timeout`` (seconds, total) bounds a peer that stops reading."""
    if timeout is not None:
        sock.settimeout(timeout)
    sock.sendall(encode_frame(message))
