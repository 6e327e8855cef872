"""Wire format: byte-exact safetensors round trip; pickled, torch.save and truncated frames are refused."""

import io
import pickle
import socket
import struct
import threading

import pytest
import torch

from hf_ewtune.sap.transport import (
    LocalTransport,
    Message,
    SAPProtocolError,
    SocketTransport,
    decode_frame,
    encode_frame,
    serve,
)


def _msg():
    g = torch.Generator().manual_seed(0)
    return Message(kind="upload", meta={"step": 3, "mode": "train"}, tensors={
        "hidden": torch.randn(2, 5, 7, generator=g),
        "hidden16": torch.randn(2, 5, 7, generator=g).half(),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.int8),
        "labels": torch.tensor([0, 1]),
    })


def test_frame_round_trip_is_byte_exact():
    msg = _msg()
    frame = encode_frame(msg)
    out = decode_frame(frame)
    assert out.kind == "upload" and out.meta == msg.meta
    for k, v in msg.tensors.items():
        assert out.tensors[k].dtype == v.dtype
        assert out.tensors[k].numpy().tobytes() == v.numpy().tobytes()
    assert encode_frame(out) == frame


def test_pickled_frame_refused():
    with pytest.raises(SAPProtocolError, match="pickle"):
        decode_frame(pickle.dumps({"hidden": torch.zeros(2)}))


def test_pickled_or_torch_save_blob_refused():
    header = b'{"kind":"upload","meta":{}}'
    for blob, why in [(pickle.dumps(torch.zeros(3)), "pickle"), (_torch_saved(), "zip")]:
        frame = struct.pack(">4sIQ", b"SAP1", len(header), len(blob)) + header + blob
        with pytest.raises(SAPProtocolError, match=why):
            decode_frame(frame)


def _torch_saved():
    buf = io.BytesIO()
    torch.save({"x": torch.zeros(3)}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("cut", [3, 10, 20, -1])
def test_truncated_frame_refused(cut):
    frame = encode_frame(_msg())
    with pytest.raises(SAPProtocolError, match="truncated"):
        decode_frame(frame[:cut])


def test_bad_magic_and_bad_header_refused():
    frame = encode_frame(_msg())
    with pytest.raises(SAPProtocolError, match="magic"):
        decode_frame(b"XXXX" + frame[4:])
    header = b"not json"
    with pytest.raises(SAPProtocolError, match="JSON"):
        decode_frame(struct.pack(">4sIQ", b"SAP1", len(header), 0) + header)
    blob = b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!"
    header = b'{"kind":"x","meta":{}}'
    with pytest.raises(SAPProtocolError, match="safetensors"):
        decode_frame(struct.pack(">4sIQ", b"SAP1", len(header), len(blob)) + header + blob)


def _echo(msg: Message) -> Message:
    return Message(kind="echo", meta=msg.meta, tensors={k: v * 2 for k, v in msg.tensors.items() if v.is_floating_point()})


SECRET = "test-shared-secret-0123456789abcdef"


def _start_server(handler, max_connections=1):
    bound = threading.Event()
    port = []

    def on_bound(p):
        port.append(p)
        bound.set()

    th = threading.Thread(target=serve, kwargs=dict(handler=handler, port=0, on_bound=on_bound,
                                                    max_connections=max_connections, secret=SECRET), daemon=True)
    th.start()
    assert bound.wait(10)
    return th, port[0]


def test_socket_round_trip_equals_local_transport():
    th, port = _start_server(_echo)
    client = SocketTransport(port=port, secret=SECRET)
    msg = _msg()
    via_socket = client.request(msg)
    client.close()
    th.join(10)
    via_local = LocalTransport(_echo).request(msg)
    assert via_socket.meta == via_local.meta == msg.meta
    for k in via_local.tensors:
        assert via_socket.tensors[k].numpy().tobytes() == via_local.tensors[k].numpy().tobytes()
    assert not th.is_alive()


def test_server_answers_a_pickled_frame_with_an_error():
    th, port = _start_server(_echo)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        from hf_ewtune.sap.auth import client_handshake

        client_handshake(s, SECRET)
        s.sendall(pickle.dumps({"evil": 1}) + b"\x00" * 32)
        from hf_ewtune.sap.transport import read_frame

        reply = read_frame(s)
    assert reply.kind == "error" and "pickle" in reply.meta["error"]
    th.join(10)
    assert not th.is_alive()


def test_non_loopback_host_refused():
    with pytest.raises(ValueError, match="loopback"):
        SocketTransport(host="8.8.8.8", port=1)
