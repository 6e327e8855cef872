"""The SAP server survives hostile clients: deep JSON, slow clients, huge length claims, no/wrong secret; TLS works.

Every network wait in these tests has a short timeout, so a regression shows up as a failure, not a hang.
"""

import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import tracemalloc

import pytest
import torch

from hf_ewtune.errors import PrivacyConfigError
from hf_ewtune.sap import SAPVendor
from hf_ewtune.sap.auth import SECRET_ENV_VAR, SAPAuthenticationError, client_handshake
from hf_ewtune.sap.server import SAPServer
from hf_ewtune.sap.transport import (
    DEFAULT_MAX_FRAME_BYTES,
    Message,
    SAPProtocolError,
    SocketTransport,
    decode_frame,
    encode_frame,
    read_frame,
    serve,
)

SECRET = "test-shared-secret-0123456789abcdef"


class _Spy:
    """Echo handler that records every message it was asked to handle."""

    def __init__(self):
        self.seen = []

    def __call__(self, msg: Message) -> Message:
        self.seen.append(msg.kind)
        return Message(kind="echo", meta=dict(msg.meta, kind=msg.kind),
                       tensors={k: v * 2 for k, v in msg.tensors.items() if v.is_floating_point()})


@pytest.fixture
def spy():
    return _Spy()


@pytest.fixture
def server(spy):
    srv = SAPServer(spy, secret=SECRET, handshake_timeout=1.0, frame_timeout=1.0, idle_timeout=30.0).start()
    yield srv
    srv.stop()


def _raw(server, *, authenticate: bool) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    if authenticate:
        client_handshake(s, SECRET, timeout=5)
        s.settimeout(5)
    return s


def _frame(header: bytes, blob_len: int = 0) -> bytes:
    return struct.pack(">4sIQ", b"SAP1", len(header), blob_len) + header


def _ping(server, **kw) -> float:
    """Seconds for a fresh client to connect, authenticate and get one reply."""
    t0 = time.monotonic()
    with server.connect(timeout=5, connect_retries=1, **kw) as client:
        assert client.request(Message(kind="ping", meta={"n": 1})).meta == {"n": 1, "kind": "ping"}
    return time.monotonic() - t0


def _read_until_closed(s: socket.socket) -> list[Message]:
    frames = []
    while True:
        try:
            frames.append(read_frame(s))
        except SAPProtocolError:  # connection closed by the server
            return frames


# ---------------------------------------------------------------------------------------- malformed frames
def test_deeply_nested_header_is_a_protocol_error_not_a_recursion_error():
    header = b"[" * 60_000
    with pytest.raises(SAPProtocolError, match="nests deeper"):
        decode_frame(_frame(header))
    ok = b'{"kind":"x","meta":{"a":[[["[[[[{{{{"]]]}}'  # brackets inside strings do not count
    assert decode_frame(_frame(ok)).meta == {"a": [[["[[[[{{{{"]]]}


def test_header_with_a_huge_integer_is_a_protocol_error():
    with pytest.raises(SAPProtocolError, match="JSON"):  # json.loads raises a bare ValueError past 4300 digits
        decode_frame(_frame(b'{"kind":"x","meta":{"n":' + b"9" * 5000 + b"}}"))


def test_unserialisable_reply_is_reported_and_the_connection_keeps_serving():
    replies = iter([Message(kind="bad", meta={"x": object()}), Message(kind="good")])
    with SAPServer(lambda m: next(replies), secret=SECRET) as srv, srv.connect(timeout=5) as client:
        with pytest.raises(SAPProtocolError, match="TypeError"):
            client.request(Message(kind="first"))
        assert client.request(Message(kind="second")).kind == "good"


def test_deeply_nested_header_does_not_kill_the_server(server, spy):
    with _raw(server, authenticate=True) as s:
        s.sendall(_frame(b"[" * 60_000))
        reply = read_frame(s)
    assert reply.kind == "error" and "nests deeper" in reply.meta["error"]
    with _raw(server, authenticate=False) as s:  # before authentication: refused on size alone (4 KiB cap)
        read_frame(s)  # the challenge
        s.sendall(_frame(b"[" * 60_000))
        assert "exceeds" in read_frame(s).meta["error"]
    assert _ping(server) < 5 and spy.seen == ["ping"]


def test_two_gib_length_claim_is_refused_at_once_without_allocating(server, spy):
    tracemalloc.start()
    try:
        for authenticate in (True, False):
            with _raw(server, authenticate=authenticate) as s:
                if not authenticate:
                    read_frame(s)  # the challenge
                t0 = time.monotonic()
                s.sendall(_frame(b'{"kind":"upload","meta":{}}', blob_len=2 * 1024**3))  # and never the blob
                reply = read_frame(s)
                assert time.monotonic() - t0 < 3.0
                assert reply.kind == "error" and "max_frame_bytes" in reply.meta["error"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024**2
    assert spy.seen == [] and _ping(server) < 5
    with pytest.raises(SAPProtocolError, match="max_frame_bytes"):
        decode_frame(_frame(b'{"kind":"x","meta":{}}', blob_len=2 * 1024**3))


def test_max_frame_bytes_has_a_documented_default_and_can_be_changed(spy):
    assert DEFAULT_MAX_FRAME_BYTES == 256 * 1024**2
    big = Message(kind="upload", tensors={"hidden": torch.zeros(4096)})  # 16 KiB of tensor data
    with SAPServer(spy, secret=SECRET, max_frame_bytes=8 * 1024) as small:
        with small.connect(timeout=5) as client:
            with pytest.raises(SAPProtocolError, match="max_frame_bytes=8192"):
                client.request(big)
    with SAPServer(spy, secret=SECRET) as default:
        with default.connect(timeout=5) as client:
            assert client.request(big).tensors["hidden"].shape == (4096,)
    with pytest.raises(PrivacyConfigError, match="max_frame_bytes"):
        SAPServer(spy, secret=SECRET, max_frame_bytes=0)
    with pytest.raises(PrivacyConfigError, match="idle_timeout"):
        SAPServer(spy, secret=SECRET, idle_timeout=float("inf"))


# ---------------------------------------------------------------------------------------- slow clients
def test_slow_six_byte_client_does_not_block_others(server):
    slow = _raw(server, authenticate=False)
    slow.sendall(b"SAP1\x00\x00")  # 6 bytes, then silence
    slow_authed = _raw(server, authenticate=True)
    slow_authed.sendall(b"SAP1\x00\x00")
    try:
        assert _ping(server) < 3.0  # served while both slow clients hold their sockets
        t0 = time.monotonic()
        for s in (slow, slow_authed):
            frames = _read_until_closed(s)  # the server drops them after its timeouts
            assert frames[-1].kind == "error" and "timed out" in frames[-1].meta["error"]
        assert time.monotonic() - t0 < 4.0
    finally:
        slow.close()
        slow_authed.close()
    assert _ping(server) < 3.0


def test_connections_in_sequence_and_in_parallel(server, spy):
    for _ in range(3):  # the server does not end after the first connection
        assert _ping(server) < 5
    errors, barrier = [], threading.Barrier(4)

    def worker(i):
        try:
            with server.connect(timeout=10) as client:
                barrier.wait(5)  # all four connections are open at the same time
                for j in range(3):
                    x = torch.full((2,), float(i * 10 + j))
                    out = client.request(Message(kind="mul", meta={"i": i}, tensors={"x": x}))
                    assert out.meta["i"] == i and torch.equal(out.tensors["x"], 2 * x)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(20)
    assert not errors and not any(th.is_alive() for th in threads)
    assert spy.seen.count("mul") == 12 and spy.seen.count("ping") == 3
    assert _ping(server) < 5


def test_serve_keeps_serving_until_stopped_and_prints_a_generated_secret(spy, monkeypatch, capsys):
    monkeypatch.delenv(SECRET_ENV_VAR, raising=False)
    ready = []
    th = threading.Thread(target=serve, kwargs=dict(handler=spy, on_ready=ready.append), daemon=True)
    th.start()
    for _ in range(100):
        if ready:
            break
        time.sleep(0.05)
    srv = ready[0]
    assert srv.secret_generated and len(srv.secret) >= 32
    for _ in range(3):
        assert _ping(srv) < 5
    assert th.is_alive()  # the old default (max_connections=1) would have returned after the first client
    srv.stop()
    th.join(5)
    assert not th.is_alive()
    assert srv.secret in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- authentication
@pytest.mark.parametrize("kind", ["upload", "reset"])
def test_unauthenticated_upload_or_reset_is_refused(kind):
    vendor = SAPVendor(top=torch.nn.Linear(32, 2))  # upload/reset never touch the model
    vendor.rows.append({"marker": torch.zeros(1)})
    msg = Message(kind=kind, tensors={"hidden": torch.zeros(1, 2, 32), "attention_mask": torch.ones(1, 2),
                                      "labels": torch.zeros(1, dtype=torch.long)} if kind == "upload" else {})
    with SAPServer(vendor.handle, secret=SECRET) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(encode_frame(msg))  # no handshake
            frames = _read_until_closed(s)
    assert frames[0].kind == "challenge"
    assert frames[-1].kind == "error" and "authentication required" in frames[-1].meta["error"]
    assert len(vendor.rows) == 1  # nothing stored, nothing forgotten


def test_wrong_secret_is_refused(server, spy):
    with pytest.raises(SAPAuthenticationError, match="wrong shared secret"):
        SocketTransport(port=server.port, secret="not-the-shared-secret-0123456789", timeout=5)
    assert spy.seen == []
    assert _ping(server) < 5


def test_missing_or_short_secret_is_a_config_error(server, monkeypatch):
    monkeypatch.delenv(SECRET_ENV_VAR, raising=False)
    with pytest.raises(PrivacyConfigError, match=f"secret=.*{SECRET_ENV_VAR}"):
        SocketTransport(port=server.port)
    with pytest.raises(PrivacyConfigError, match="at least 16"):
        SocketTransport(port=server.port, secret="short")
    monkeypatch.setenv(SECRET_ENV_VAR, SECRET)
    with SocketTransport(port=server.port, timeout=5) as client:  # the common path: secret from the environment
        assert client.request(Message(kind="ping")).kind == "echo"
    assert SAPServer(lambda m: m).secret == SECRET


def test_client_refuses_a_server_that_does_not_know_the_secret():
    with socket.create_server(("127.0.0.1", 0)) as impostor:
        port = impostor.getsockname()[1]

        def fake_vendor():
            conn, _ = impostor.accept()
            with conn:
                conn.sendall(encode_frame(Message(kind="challenge", meta={"protocol": "sap1-hmac-sha256",
                                                                          "nonce": "00" * 32})))
                read_frame(conn)
                conn.sendall(encode_frame(Message(kind="welcome", meta={"mac": "11" * 32})))

        th = threading.Thread(target=fake_vendor, daemon=True)
        th.start()
        with pytest.raises(SAPAuthenticationError, match="did not prove"):
            SocketTransport(port=port, secret=SECRET, timeout=5, connect_retries=1)
        th.join(5)


# ---------------------------------------------------------------------------------------- TLS
def _self_signed(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl binary is not installed and `cryptography` is not a dependency: "
                    "no way to make a self-signed certificate for the TLS test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return cert, key


def test_tls_round_trip_on_loopback(tmp_path, spy):
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    x = torch.arange(6.0).reshape(2, 3)
    with SAPServer(spy, secret=SECRET, ssl_context=server_ctx, handshake_timeout=1.0) as srv:
        with srv.connect(ssl_context=client_ctx, timeout=5) as client:
            assert isinstance(client.sock, ssl.SSLSocket) and client.sock.version().startswith("TLS")
            assert torch.equal(client.request(Message(kind="mul", tensors={"x": x})).tensors["x"], 2 * x)
        with pytest.raises((SAPProtocolError, OSError)):  # a plaintext client cannot talk to the TLS server
            SocketTransport(port=srv.port, secret=SECRET, timeout=3, connect_retries=1)
        with pytest.raises(ssl.SSLError):  # a client that does not trust the certificate refuses it
            srv.connect(ssl_context=ssl.create_default_context(), timeout=3)
        assert _ping(srv, ssl_context=client_ctx) < 5
    assert spy.seen == ["mul", "ping"]


def test_slow_tls_handshake_is_cut_at_handshake_timeout(tmp_path, spy):
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    with SAPServer(spy, secret=SECRET, ssl_context=server_ctx, handshake_timeout=1.0) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            t0, closed = time.monotonic(), False
            hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200)  # a TLS ClientHello, trickled
            for byte in hello:
                try:
                    s.sendall(bytes([byte]))
                except OSError:
                    closed = True
                    break
                time.sleep(0.05)  # each byte resets a per-read timeout; only a total deadline ends this
                if time.monotonic() - t0 > 4:
                    break
            if not closed:
                s.settimeout(1)
                try:
                    closed = s.recv(1) == b""
                except (ConnectionResetError, socket.timeout):
                    closed = True
        assert closed and time.monotonic() - t0 < 3.0
        assert _ping(srv, ssl_context=ssl.create_default_context(cafile=str(cert))) < 5


def test_non_loopback_needs_tls_or_an_explicit_insecure_opt_in(spy):
    with pytest.raises(PrivacyConfigError, match="ssl_context"):
        SAPServer(spy, host="0.0.0.0", secret=SECRET)
    with pytest.raises(PrivacyConfigError, match="ssl_context"):
        serve(spy, host="10.1.2.3", secret=SECRET)
    with pytest.raises(PrivacyConfigError, match="ssl_context"):
        SocketTransport(host="10.1.2.3", port=1, secret=SECRET)
    # allowed (not bound here) with TLS or with the explicit opt-in
    SAPServer(spy, host="0.0.0.0", secret=SECRET, ssl_context=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
    SAPServer(spy, host="0.0.0.0", secret=SECRET, allow_insecure_remote=True)
