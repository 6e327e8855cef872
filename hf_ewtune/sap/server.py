"""The model owner's TCP server: authenticated, optionally TLS, concurrent, and robust to hostile clients.

Every connection gets its own thread. A connection must finish the shared-secret handshake
(:mod:`hf_ewtune.sap.auth`) within ``handshake_timeout`` seconds, reading at most 4 KiB, before any request
reaches the handler. After that, each frame is capped at ``max_frame_bytes`` (refused from its prefix), must
start within ``idle_timeout`` seconds and arrive whole within ``frame_timeout`` seconds. Handler calls are
serialised by a lock (the vendor's state is shared), while slow or malicious peers only ever hold their own
thread. The server runs until :meth:`SAPServer.stop` (or Ctrl-C for :func:`serve`), unless ``max_connections``
is set.

Example:
    >>> from hf_ewtune.sap.server import SAPServer
    >>> from hf_ewtune.sap.wire import Message
    >>> with SAPServer(lambda m: Message(kind="ok", meta={"echo": m.kind})) as server:
    ...     with server.connect() as client:
    ...         client.request(Message(kind="ping")).meta
    {'echo': 'ping'}
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import ssl
import sys
import threading
import time
import warnings
from typing import Any, Callable

from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.sap.auth import SECRET_ENV_VAR, generate_secret, resolve_secret, server_handshake
from hf_ewtune.sap.wire import DEFAULT_MAX_FRAME_BYTES, Message, SAPProtocolError, encode_frame, read_frame, write_frame

logger = logging.getLogger(__name__)

__all__ = ["SAPServer", "serve", "check_host"]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_host(host: str, *, tls: bool, allow_insecure_remote: bool, allow_remote: bool = False) -> None:
    """Refuse a non-loopback ``host`` without TLS unless plaintext was explicitly opted into.

    ``allow_remote`` is the deprecated spelling of ``allow_insecure_remote``.
    """
    if allow_remote:
        warnings.warn("allow_remote=True is deprecated: pass ssl_context=... for TLS, or allow_insecure_remote=True "
                      "to keep plaintext (authenticated, not encrypted).", DeprecationWarning, stacklevel=3)
        allow_insecure_remote = True
    if not _is_loopback(host) and not tls and not allow_insecure_remote:
        raise PrivacyConfigError(
            f"host={host!r} is not a loopback address and no ssl_context was given: the privatized data and the "
            "model's replies would cross the network unencrypted. Pass ssl_context=... (an ssl.SSLContext), use "
            "127.0.0.1, or pass allow_insecure_remote=True behind your own secure tunnel.")


def _positive(name: str, value: Any, kind: type = float) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    if not ok or not math.isfinite(value) or value <= 0:
        raise PrivacyConfigError(f"{name}= must be a finite positive {kind.__name__}, got {value!r}.")


class SAPServer:
    """Serve ``handler`` (usually ``SAPVendor.handle``) to authenticated SAP clients.

    Args:
        handler: Maps a request :class:`~hf_ewtune.sap.wire.Message` to a reply. Calls are serialised.
        host: Address to bind. Non-loopback needs ``ssl_context`` (or ``allow_insecure_remote=True``).
        port: 0 picks a free port (see :attr:`port` after :meth:`start`).
        secret: Shared secret (str or bytes, at least 16 bytes). ``None`` reads ``HF_EWTUNE_SAP_SECRET`` and, if
            that is unset, generates one (:attr:`secret`, :attr:`secret_generated`).
        ssl_context: A server-side ``ssl.SSLContext`` (with ``load_cert_chain`` done) to serve over TLS.
        allow_insecure_remote: Allow a non-loopback ``host`` without TLS (plaintext, still authenticated).
        max_frame_bytes: Largest frame accepted from an authenticated client (default 256 MiB).
        handshake_timeout: Seconds a new connection has to authenticate (TLS handshake included).
        idle_timeout: Seconds an authenticated connection may wait between requests before it is closed.
        frame_timeout: Seconds a frame may take to arrive once it has started (and a reply to be sent).
        max_clients: Connections served at once; more are answered ``busy`` and closed.
        max_connections: Stop after this many authenticated connections have closed (``None``: run until
            :meth:`stop`).
        allow_remote: Deprecated alias of ``allow_insecure_remote``.
    """

    def __init__(self, handler: Callable[[Message], Message], *, host: str = "127.0.0.1", port: int = 0,
                 secret: str | bytes | None = None, ssl_context: ssl.SSLContext | None = None,
                 allow_insecure_remote: bool = False, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 handshake_timeout: float = 10.0, idle_timeout: float = 600.0, frame_timeout: float = 300.0,
                 max_clients: int = 16, max_connections: int | None = None, allow_remote: bool = False):
        if not callable(handler):
            raise PrivacyConfigError(f"handler= must be callable (e.g. vendor.handle), got {type(handler).__name__}.")
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise PrivacyConfigError(f"ssl_context= must be an ssl.SSLContext, got {type(ssl_context).__name__}.")
        check_host(host, tls=ssl_context is not None, allow_insecure_remote=allow_insecure_remote,
                   allow_remote=allow_remote)
        _positive("max_frame_bytes", max_frame_bytes, int)
        _positive("max_clients", max_clients, int)
        for name, value in [("handshake_timeout", handshake_timeout), ("idle_timeout", idle_timeout),
                            ("frame_timeout", frame_timeout)]:
            _positive(name, value)
        if max_connections is not None:
            _positive("max_connections", max_connections, int)
        self.secret_generated = secret is None and not _env_secret()
        self.secret: str | bytes = generate_secret() if self.secret_generated else (secret or _env_secret())
        self._key = resolve_secret(self.secret, role="server")
        self.handler, self.host, self.ssl_context = handler, host, ssl_context
        self.max_frame_bytes, self.max_clients, self.max_connections = max_frame_bytes, max_clients, max_connections
        self.handshake_timeout, self.idle_timeout, self.frame_timeout = handshake_timeout, idle_timeout, frame_timeout
        self._requested_port = port
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._handler_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._active: set[socket.socket] = set()
        self._workers: set[threading.Thread] = set()
        self._accept_thread: threading.Thread | None = None
        self.connections_served = 0  # authenticated connections that have closed

    # ------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        """The bound port (after :meth:`bind` / :meth:`start`)."""
        if self._listener is None:
            raise RuntimeError("the server is not bound yet; call start() (or bind()) first.")
        return self._listener.getsockname()[1]

    def bind(self) -> "SAPServer":
        """Bind and listen (idempotent); :meth:`start` and :meth:`serve_forever` call it."""
        if self._listener is None:
            self._listener = socket.create_server((self.host, self._requested_port), backlog=64)
            self._listener.settimeout(0.2)  # lets the accept loop notice stop()
        return self

    def start(self) -> "SAPServer":
        """Serve in a background thread; returns ``self`` (use :attr:`port` and :attr:`secret`)."""
        self.bind()
        self._accept_thread = threading.Thread(target=self.serve_forever, name="sap-server-accept", daemon=True)
        self._accept_thread.start()
        return self

    def serve_forever(self) -> None:
        """Accept connections in this thread until :meth:`stop` (or ``max_connections`` is reached)."""
        self.bind()
        try:
            while not self._stop.is_set():
                try:
                    conn, addr = self._listener.accept()
                except (socket.timeout, TimeoutError):
                    continue
                except OSError as exc:
                    if self._stop.is_set():
                        break
                    logger.warning("accept failed (%s); still serving", exc)  # e.g. out of file descriptors
                    time.sleep(0.1)
                    continue
                self._dispatch(conn, addr)
        finally:
            self._shutdown_connections()

    def stop(self, *, timeout: float = 5.0) -> None:
        """Stop accepting, close every open connection and wait up to ``timeout`` seconds for the threads."""
        self._stop.set()
        self._shutdown_connections()
        if self._accept_thread is not None and self._accept_thread is not threading.current_thread():
            self._accept_thread.join(timeout)
        with self._state_lock:
            workers = list(self._workers)
        for th in workers:
            th.join(timeout)
        if self._listener is not None:
            self._listener.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops; returns whether it has."""
        return self._stop.wait(timeout)

    def __enter__(self) -> "SAPServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def connect(self, **kwargs: Any):
        """A :class:`~hf_ewtune.sap.transport.SocketTransport` to this server, with its host, port and secret.

        Extra keywords go to ``SocketTransport`` (for TLS: ``ssl_context=`` a client context trusting the cert).
        """
        from hf_ewtune.sap.transport import SocketTransport

        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else "::1" if self.host == "::" else self.host
        kwargs.setdefault("host", host)
        kwargs.setdefault("secret", self.secret)
        return SocketTransport(port=self.port, **kwargs)

    # ------------------------------------------------------------------ connections
    def _dispatch(self, conn: socket.socket, addr: Any) -> None:
        with self._state_lock:
            busy = len(self._workers) >= self.max_clients
            if not busy:
                th = threading.Thread(target=self._serve_connection, args=(conn, addr), daemon=True,
                                      name=f"sap-server-conn-{addr}")
                self._workers.add(th)
                self._active.add(conn)
        if not busy:
            try:
                th.start()
                return
            except RuntimeError as exc:  # cannot start a thread: answer busy below
                logger.warning("cannot start a connection thread: %s", exc)
                with self._state_lock:
                    self._workers.discard(th)
                    self._active.discard(conn)
        logger.warning("refusing %s: %d connections already open (max_clients)", addr, self.max_clients)
        try:
            write_frame(conn, Message(kind="error", meta={"error": "server busy (max_clients reached); retry later."}),
                        timeout=1.0)
        except OSError:
            pass
        conn.close()

    def _serve_connection(self, conn: socket.socket, addr: Any) -> None:
        authenticated = False
        sock = conn
        # Backstop: the whole handshake (TLS included) must finish soon after handshake_timeout, however slowly the
        # bytes trickle in. (server_handshake has its own total deadline and CPython bounds do_handshake as a
        # whole; this does not rely on either.) The 1 s grace lets those fire first and send their error reply.
        watchdog = threading.Timer(self.handshake_timeout + 1.0, lambda: _force_shutdown(sock))
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.settimeout(self.handshake_timeout)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
                with self._state_lock:
                    self._active.add(sock)
                sock.do_handshake()
            server_handshake(sock, self._key, timeout=self.handshake_timeout)
            watchdog.cancel()
            authenticated = True
            self._request_loop(sock)
        except SAPProtocolError as exc:
            logger.warning("closing connection from %s: %s", addr, exc)
            try:
                write_frame(sock, Message(kind="error", meta={"error": str(exc)}), timeout=1.0)
            except (OSError, ValueError):
                pass
        except (OSError, ValueError) as exc:  # resets, TLS failures, sockets closed by stop()
            logger.info("connection from %s ended: %s", addr, exc)
        except Exception:  # never let one connection take the server down
            logger.exception("unexpected error on the connection from %s", addr)
        finally:
            watchdog.cancel()
            for s in {sock, conn}:
                try:
                    s.close()
                except OSError:
                    pass
            with self._state_lock:
                self._active.discard(conn)
                self._active.discard(sock)
                self._workers.discard(threading.current_thread())
                if authenticated:
                    self.connections_served += 1
                    if self.max_connections is not None and self.connections_served >= self.max_connections:
                        self._stop.set()

    def _request_loop(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            msg = read_frame(sock, max_frame_bytes=self.max_frame_bytes, idle_timeout=self.idle_timeout,
                             frame_timeout=self.frame_timeout)
            if msg.kind == "close":
                return
            try:
                with self._handler_lock:
                    reply = self.handler(msg)
                frame = encode_frame(reply)
            except Exception as exc:  # report to the peer, keep serving
                logger.exception("handler failed on %s", msg.kind)
                frame = encode_frame(Message(kind="error", meta={"error": f"{type(exc).__name__}: {exc}"}))
            sock.settimeout(self.frame_timeout)
            sock.sendall(frame)

    def _shutdown_connections(self) -> None:
        with self._state_lock:
            active = list(self._active)
        for s in active:
            _force_shutdown(s)


def _force_shutdown(sock: socket.socket) -> None:
    """Wake any thread blocked on ``sock`` (plain ``socket.shutdown``, also under a TLS wrapper)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass


def _env_secret() -> str | None:
    import os

    return os.environ.get(SECRET_ENV_VAR) or None


def serve(handler: Callable[[Message], Message], *, host: str = "127.0.0.1", port: int = 0,
          on_bound: Callable[[int], None] | None = None, on_ready: Callable[[SAPServer], None] | None = None,
          secret: str | bytes | None = None, ssl_context: ssl.SSLContext | None = None,
          allow_insecure_remote: bool = False, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
          handshake_timeout: float = 10.0, idle_timeout: float = 600.0, frame_timeout: float = 300.0,
          max_clients: int = 16, max_connections: int | None = None, allow_remote: bool = False) -> None:
    """Serve ``handler`` over TCP in this thread until Ctrl-C (or ``max_connections`` authenticated clients closed).

    Takes the arguments of :class:`SAPServer`, plus ``on_bound(port)`` and ``on_ready(server)`` callbacks called
    once the socket listens. If no ``secret`` is given (argument or ``HF_EWTUNE_SAP_SECRET``), a fresh one is
    generated and printed to stderr once: hand it to the data owner over a trusted channel.
    """
    server = SAPServer(handler, host=host, port=port, secret=secret, ssl_context=ssl_context,
                       allow_insecure_remote=allow_insecure_remote, max_frame_bytes=max_frame_bytes,
                       handshake_timeout=handshake_timeout, idle_timeout=idle_timeout, frame_timeout=frame_timeout,
                       max_clients=max_clients, max_connections=max_connections, allow_remote=allow_remote)
    server.bind()
    if server.secret_generated:
        print(f"hf_ewtune SAP server on {host}:{server.port}: generated shared secret {server.secret} "
              f"(give it to the data owner: SocketTransport(secret=...) or {SECRET_ENV_VAR}=...)", file=sys.stderr)
    if on_bound is not None:
        on_bound(server.port)
    if on_ready is not None:
        on_ready(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("SAP server interrupted; stopping")
    finally:
        server.stop()
