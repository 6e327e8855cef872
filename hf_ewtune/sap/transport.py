"""Transports between the data owner (customer) and the model owner (vendor).

:class:`LocalTransport` calls the vendor in-process (through the real wire format). :class:`SocketTransport` is
the client of :class:`~hf_ewtune.sap.server.SAPServer` / :func:`~hf_ewtune.sap.server.serve`: it authenticates
with the shared secret (mutual HMAC challenge-response, :mod:`hf_ewtune.sap.auth`), optionally over TLS, and then
sends one request and reads one reply at a time. The wire format lives in :mod:`hf_ewtune.sap.wire` and is
re-exported here.

Example:
    >>> import torch
    >>> from hf_ewtune.sap.transport import Message, encode_frame, decode_frame
    >>> msg = Message(kind="predict", meta={"step": 1}, tensors={"hidden": torch.ones(1, 2, 3)})
    >>> out = decode_frame(encode_frame(msg))
    >>> out.kind, out.meta["step"], out.tensors["hidden"].shape
    ('predict', 1, torch.Size([1, 2, 3]))
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any, Callable, Protocol

from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.sap.auth import SAPAuthenticationError, client_handshake, generate_secret, resolve_secret
from hf_ewtune.sap.server import SAPServer, check_host, serve
from hf_ewtune.sap.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    MAX_BLOB_BYTES,
    MAX_HEADER_BYTES,
    MAX_JSON_DEPTH,
    Message,
    SAPProtocolError,
    SAPTimeoutError,
    decode_frame,
    encode_frame,
    read_frame,
    write_frame,
)

__all__ = ["Message", "SAPProtocolError", "SAPTimeoutError", "SAPAuthenticationError", "encode_frame",
           "decode_frame", "read_frame", "write_frame", "LocalTransport", "SocketTransport", "SAPServer", "serve",
           "generate_secret", "MAX_HEADER_BYTES", "MAX_BLOB_BYTES", "MAX_JSON_DEPTH", "DEFAULT_MAX_FRAME_BYTES"]


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


class SocketTransport:
    """Client side of the TCP transport: authenticate once, then one request, one reply.

    Args:
        host: The model owner's address. Non-loopback needs ``ssl_context`` (or ``allow_insecure_remote=True``).
        port: The server's port.
        secret: The shared secret the server printed or returned (:attr:`SAPServer.secret`); ``None`` reads the
            ``HF_EWTUNE_SAP_SECRET`` environment variable. Checked before connecting.
        ssl_context: A client ``ssl.SSLContext`` (e.g. ``ssl.create_default_context(cafile=...)``) to use TLS.
        server_hostname: Name checked against the server certificate (default: ``host``).
        timeout: Seconds any single read or write may block (the ``train`` reply can take a while).
        allow_insecure_remote: Allow a non-loopback ``host`` without TLS (plaintext, still authenticated).
        connect_retries: Connection attempts, 0.1 s apart (the server may still be starting).
        max_frame_bytes: Largest reply accepted (default 256 MiB).
        allow_remote: Deprecated alias of ``allow_insecure_remote``.

    Raises:
        PrivacyConfigError: No or too short a secret, or a non-loopback host without TLS.
        SAPAuthenticationError: The server refused the secret, or could not prove it knows it.

    Example:
        >>> from hf_ewtune.sap.server import SAPServer
        >>> with SAPServer(lambda m: Message(kind="pong"), secret="a shared secret of 32 bytes....") as server:
        ...     with SocketTransport(port=server.port, secret="a shared secret of 32 bytes....") as client:
        ...         client.request(Message(kind="ping")).kind
        'pong'
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int, secret: str | bytes | None = None,
                 ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 timeout: float | None = 600.0, allow_insecure_remote: bool = False, connect_retries: int = 50,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, allow_remote: bool = False):
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise PrivacyConfigError(f"ssl_context= must be an ssl.SSLContext, got {type(ssl_context).__name__}.")
        check_host(host, tls=ssl_context is not None, allow_insecure_remote=allow_insecure_remote,
                   allow_remote=allow_remote)
        key = resolve_secret(secret, role="client")
        self.max_frame_bytes = max_frame_bytes
        last: Exception | None = None
        for _ in range(max(1, connect_retries)):
            try:
                sock = socket.create_connection((host, port), timeout=timeout)
                break
            except OSError as exc:
                last = exc
                time.sleep(0.1)
        else:
            raise ConnectionError(f"could not connect to {host}:{port}: {last}")
        try:
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=server_hostname or host)
            client_handshake(sock, key, timeout=30.0 if timeout is None else timeout)
            sock.settimeout(timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def request(self, message: Message) -> Message:
        """Send ``message`` and return the reply; an ``error`` reply raises :class:`SAPProtocolError`."""
        write_frame(self.sock, message)
        reply = read_frame(self.sock, max_frame_bytes=self.max_frame_bytes)
        if reply.kind == "error":
            raise SAPProtocolError(f"the model owner reported an error: {reply.meta.get('error')}")
        return reply

    def close(self) -> None:
        try:
            write_frame(self.sock, Message(kind="close"))
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> "SocketTransport":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
