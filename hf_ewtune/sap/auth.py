"""Shared-secret mutual authentication for the SAP socket transport (HMAC-SHA256 challenge-response).

Right after the TCP (or TLS) connection opens:

1. server -> client ``challenge``: ``meta = {"protocol": PROTOCOL, "nonce": <32 random bytes, hex>}``
2. client -> server ``auth``: ``meta = {"client_nonce": <32 random bytes, hex>,
   "mac": HMAC(secret, "sap1-client|" + nonce + client_nonce)}``
3. server -> client ``welcome``: ``meta = {"mac": HMAC(secret, "sap1-server|" + nonce + client_nonce)}``, or an
   ``error`` frame and a closed connection if the client's MAC is wrong.

Both MACs are checked with :func:`hmac.compare_digest`. Fresh nonces on both sides mean a recorded exchange
cannot be replayed, and the distinct labels mean a client's MAC cannot be reflected back as the server's. The
secret itself never crosses the wire. The handshake authenticates the peer when the connection opens; it does
not encrypt or sign later frames, which is why a non-loopback address needs TLS (see ``ssl_context``).

Example:
    >>> from hf_ewtune.sap.auth import client_mac, generate_secret, resolve_secret, server_mac
    >>> key = resolve_secret(generate_secret(), role="client")
    >>> n, c = bytes(32), bytes(range(32))
    >>> client_mac(key, n, c) == server_mac(key, n, c)   # the two directions never share a MAC
    False
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import time

from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.sap.wire import Message, SAPProtocolError, read_frame, write_frame

__all__ = ["SECRET_ENV_VAR", "MIN_SECRET_BYTES", "SAPAuthenticationError", "generate_secret", "resolve_secret",
           "client_handshake", "server_handshake", "client_mac", "server_mac"]

PROTOCOL = "sap1-hmac-sha256"
SECRET_ENV_VAR = "HF_EWTUNE_SAP_SECRET"
MIN_SECRET_BYTES = 16
HANDSHAKE_MAX_FRAME_BYTES = 4096  # nothing larger is read from a peer that has not authenticated
_NONCE_BYTES = 32


class SAPAuthenticationError(SAPProtocolError):
    """The peer did not prove that it knows the shared secret (or refused ours)."""


def generate_secret() -> str:
    """A fresh random shared secret (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32)


def resolve_secret(secret: str | bytes | None, *, role: str) -> bytes:
    """The HMAC key from ``secret`` or, when it is ``None``, from the ``HF_EWTUNE_SAP_SECRET`` environment variable.

    Raises:
        PrivacyConfigError: No secret anywhere, or one shorter than :data:`MIN_SECRET_BYTES` bytes.
    """
    if secret is None:
        secret = os.environ.get(SECRET_ENV_VAR) or None
    if secret is None:
        raise PrivacyConfigError(
            f"the SAP {role} needs the shared secret: pass secret=... (the value the model owner's server printed "
            f"or returned as SAPServer.secret) or set the {SECRET_ENV_VAR} environment variable.")
    if not isinstance(secret, (str, bytes)):
        raise PrivacyConfigError(f"secret= must be a str or bytes, got {type(secret).__name__}.")
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if len(key) < MIN_SECRET_BYTES:
        raise PrivacyConfigError(f"secret= is {len(key)} bytes; use at least {MIN_SECRET_BYTES} random bytes, "
                                 "e.g. hf_ewtune.sap.generate_secret().")
    return key


def client_mac(key: bytes, nonce: bytes, client_nonce: bytes) -> bytes:
    """The MAC by which the client proves it knows ``key``."""
    return hmac.new(key, b"sap1-client|" + nonce + client_nonce, hashlib.sha256).digest()


def server_mac(key: bytes, nonce: bytes, client_nonce: bytes) -> bytes:
    """The MAC by which the server proves it knows ``key``."""
    return hmac.new(key, b"sap1-server|" + nonce + client_nonce, hashlib.sha256).digest()


def _hex_field(meta: dict, name: str, size: int) -> bytes:
    value = meta.get(name)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise SAPAuthenticationError(f"handshake field {name!r} is missing or malformed.")
    return raw


def _read_handshake(sock: socket.socket, deadline: float) -> Message:
    remaining = deadline - time.monotonic()
    return read_frame(sock, max_frame_bytes=HANDSHAKE_MAX_FRAME_BYTES, idle_timeout=max(remaining, 1e-3),
                      frame_timeout=max(remaining, 1e-3))


def server_handshake(sock: socket.socket, key: bytes, *, timeout: float) -> None:
    """Run the server side; returns when the client is authenticated, raises otherwise.

    Raises:
        SAPAuthenticationError: Wrong MAC or an unexpected message (an ``error`` frame is sent first).
        SAPTimeoutError: The client did not answer within ``timeout`` seconds in total.
    """
    deadline = time.monotonic() + timeout
    nonce = secrets.token_bytes(_NONCE_BYTES)
    write_frame(sock, Message(kind="challenge", meta={"protocol": PROTOCOL, "nonce": nonce.hex()}), timeout=timeout)
    reply = _read_handshake(sock, deadline)
    if reply.kind != "auth":
        raise SAPAuthenticationError(f"authentication required: expected an 'auth' message, got {reply.kind!r} "
                                     "(connect with SocketTransport(secret=...)).")
    client_nonce = _hex_field(reply.meta, "client_nonce", _NONCE_BYTES)
    mac = _hex_field(reply.meta, "mac", hashlib.sha256().digest_size)
    if not hmac.compare_digest(mac, client_mac(key, nonce, client_nonce)):
        raise SAPAuthenticationError("authentication failed: wrong shared secret.")
    remaining = max(deadline - time.monotonic(), 1e-3)
    write_frame(sock, Message(kind="welcome", meta={"mac": server_mac(key, nonce, client_nonce).hex()}),
                timeout=remaining)


def client_handshake(sock: socket.socket, key: bytes | str, *, timeout: float = 30.0) -> None:
    """Run the client side on a freshly connected socket; raises unless the server proves it knows ``key``.

    Raises:
        SAPAuthenticationError: The server refused our MAC, or could not prove it knows the secret.
    """
    if isinstance(key, str):
        key = key.encode("utf-8")
    deadline = time.monotonic() + timeout
    challenge = _read_handshake(sock, deadline)
    if challenge.kind == "error":
        raise SAPAuthenticationError(f"the model owner refused the connection: {challenge.meta.get('error')}")
    if challenge.kind != "challenge" or challenge.meta.get("protocol") != PROTOCOL:
        raise SAPAuthenticationError(f"the server did not start the {PROTOCOL} handshake (got {challenge.kind!r}); "
                                     "is it an up-to-date hf_ewtune SAP server?")
    nonce = _hex_field(challenge.meta, "nonce", _NONCE_BYTES)
    client_nonce = secrets.token_bytes(_NONCE_BYTES)
    write_frame(sock, Message(kind="auth", meta={"client_nonce": client_nonce.hex(),
                                                 "mac": client_mac(key, nonce, client_nonce).hex()}),
                timeout=max(deadline - time.monotonic(), 1e-3))
    welcome = _read_handshake(sock, deadline)
    if welcome.kind == "error":
        raise SAPAuthenticationError(f"the model owner refused the connection: {welcome.meta.get('error')}")
    mac = _hex_field(welcome.meta, "mac", hashlib.sha256().digest_size) if welcome.kind == "welcome" else b""
    if not mac or not hmac.compare_digest(mac, server_mac(key, nonce, client_nonce)):
        raise SAPAuthenticationError("the server did not prove it knows the shared secret; refusing to send data.")
