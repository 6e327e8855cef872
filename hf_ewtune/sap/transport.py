"""Wire format and transports between the data owner (customer) and the model owner (vendor).

A frame is ``MAGIC (4 bytes "SAP1") | header length (uint32, big endian) | blob length (uint64, big endian) |
header (UTF-8 JSON object) | blob (safetensors bytes)``. Tensors only ever travel as safetensors; nothing
received is unpickled or ``torch.load``-ed, and pickled / ``torch.save`` payloads are refused explicitly.

Example:
    >>> import torch
    >>> from hf_ewtune.sap.transport import Message, encode_frame, decode_frame
    >>> msg = Message(kind="predict", meta={"step": 1}, tensors={"hidden": torch.ones(1, 2, 3)})
    >>> out = decode_frame(encode_frame(msg))
    >>> out.kind, out.meta["step"], out.tensors["hidden"].shape
    ('predict', 1, torch.Size([1, 2, 3]))
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

logger = logging.getLogger(__name__)

__all__ = ["Message", "SAPProtocolError", "encode_frame", "decode_frame", "LocalTransport", "SocketTransport",
           "serve", "MAX_HEADER_BYTES", "MAX_BLOB_BYTES"]

MAGIC = b"SAP1"
_PREFIX = struct.Struct(">4sIQ")
MAX_HEADER_BYTES = 64 * 1024
MAX_BLOB_BYTES = 2 * 1024**3


class SAPProtocolError(ValueError):
    """A frame is malformed, truncated, oversized, or carries a refused (e.g. pickled) payload."""


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


def _parse_prefix(prefix: bytes) -> tuple[int, int]:
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
    if blen > MAX_BLOB_BYTES:
        raise SAPProtocolError(f"blob length {blen} exceeds {MAX_BLOB_BYTES}.")
    return hlen, blen


def _parse_body(header: bytes, blob: bytes) -> Message:
    try:
        head = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SAPProtocolError(f"frame header is not UTF-8 JSON: {exc}") from None
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


def decode_frame(frame: bytes) -> Message:
    """Parse exactly one frame; raises :class:`SAPProtocolError` on anything malformed or truncated."""
    hlen, blen = _parse_prefix(frame)
    expected = _PREFIX.size + hlen + blen
    if len(frame) != expected:
        kind = "truncated" if len(frame) < expected else "oversized"
        raise SAPProtocolError(f"{kind} frame: {len(frame)} bytes, the prefix announces {expected}.")
    body = frame[_PREFIX.size:]
    return _parse_body(body[:hlen], body[hlen:])


class Transport(Protocol):
    def request(self, message: Message) -> Message: ...

    def close(self) -> None: ...


class LocalTransport:
    """In-process transport: ``request`` calls ``handler`` directly (simulation and tests).

    Args:
        handler: Usually ``SAPVendor.handle``.
        through_wire: Encode and decode every message with the real frame format (default), so that a local
            run exercises exactly what a socket would carry.

    Example:
        >>> t = LocalTransport(lambda m: Message(kind="ok", meta={"echo": m.kind}))
        >>> t.request(Message(kind="ping")).meta
        {'echo': 'ping'}
    """

    def __init__(self, handler: Callable[[Message], Message], *, through_wire: bool = True):
        self.handler = handler
        self.through_wire = through_wire

    def request(self, message: Message) -> Message:
        if self.through_wire:
            message = decode_frame(encode_frame(message))
        reply = self.handler(message)
        return decode_frame(encode_frame(reply)) if self.through_wire else reply

    def close(self) -> None:
        pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise SAPProtocolError(f"truncated frame: connection closed after {got} of {n} bytes.")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> Message:
    """Read one frame from a connected socket."""
    prefix = _recv_exact(sock, _PREFIX.size)
    hlen, blen = _parse_prefix(prefix)
    header = _recv_exact(sock, hlen)
    blob = _recv_exact(sock, blen) if blen else b""
    return _parse_body(header, blob)


def write_frame(sock: socket.socket, message: Message) -> None:
    sock.sendall(encode_frame(message))


def _check_host(host: str, allow_remote: bool) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not allow_remote:
        raise ValueError(f"host={host!r} is not a loopback address; this transport has no authentication or "
                         "encryption. Use 127.0.0.1, or pass allow_remote=True behind your own secure tunnel.")


class SocketTransport:
    """Client side of the TCP transport (one request, one reply).

    Example:
        >>> # vendor process: serve(vendor.handle, port=5555)
        >>> # customer process: t = SocketTransport(port=5555); t.request(Message(kind="ping"))
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int, timeout: float | None = 600.0, allow_remote: bool = False,
                 connect_retries: int = 50):
        _check_host(host, allow_remote)
        last: Exception | None = None
        for _ in range(max(1, connect_retries)):
            try:
                self.sock = socket.create_connection((host, port), timeout=timeout)
                break
            except OSError as exc:
                last = exc
                import time

                time.sleep(0.1)
        else:
            raise ConnectionError(f"could not connect to {host}:{port}: {last}")

    def request(self, message: Message) -> Message:
        write_frame(self.sock, message)
        reply = read_frame(self.sock)
        if reply.kind == "error":
            raise SAPProtocolError(f"the model owner reported an error: {reply.meta.get('error')}")
        return reply

    def close(self) -> None:
        try:
            write_frame(self.sock, Message(kind="close"))
        except OSError:
            pass
        self.sock.close()


def serve(handler: Callable[[Message], Message], *, host: str = "127.0.0.1", port: int = 0,
          on_bound: Callable[[int], None] | None = None, allow_remote: bool = False, max_connections: int = 1) -> None:
    """Serve ``handler`` over TCP until ``max_connections`` clients have closed.

    Args:
        handler: Maps a request :class:`Message` to a reply.
        port: 0 picks a free port; ``on_bound(port)`` is called with the actual port before accepting.

    A malformed frame gets an ``error`` reply and closes that connection (the stream can no longer be trusted).
    """
    _check_host(host, allow_remote)
    with socket.create_server((host, port)) as srv:
        if on_bound is not None:
            on_bound(srv.getsockname()[1])
        for _ in range(max_connections):
            conn, _addr = srv.accept()
            with conn:
                while True:
                    try:
                        msg = read_frame(conn)
                    except SAPProtocolError as exc:
                        logger.warning("closing connection on bad frame: %s", exc)
                        try:
                            write_frame(conn, Message(kind="error", meta={"error": str(exc)}))
                        except OSError:
                            pass
                        break
                    if msg.kind == "close":
                        break
                    try:
                        reply = handler(msg)
                    except Exception as exc:  # report to the peer, keep serving
                        logger.exception("handler failed on %s", msg.kind)
                        reply = Message(kind="error", meta={"error": f"{type(exc).__name__}: {exc}"})
                    write_frame(conn, reply)
