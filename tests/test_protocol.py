"""Unit tests of `app.kernels.protocol`: building requests and decoding websocket frames.

Frames are built by hand in the layouts the Jupyter server uses. Legacy binary frames: a
4-byte big-endian count n, n 4-byte offsets, the JSON message at the first offset, then the
buffers. v1 frames: an 8-byte little-endian count n, n 8-byte offsets, then the channel, the
header, parent header, metadata and content (JSON) and the buffers.
"""

from __future__ import annotations

import json

import pytest

from app.kernels import protocol

SESSION = "session-1234"


def message(msg_type: str = "stream", parent: str | None = "parent-1",
            content: dict | None = None, **extra) -> dict:
    """A Jupyter message as the server sends it over the websocket."""
    return {
        "header": {"msg_id": "m-1", "msg_type": msg_type, "session": "kernel-session"},
        "parent_header": {"msg_id": parent} if parent else {},
        "metadata": {},
        "content": content if content is not None else {},
        "channel": "iopub",
        **extra,
    }


def binary_frame(msg: dict, *buffers: bytes) -> bytes:
    """`msg` and its buffers in the server's binary websocket framing."""
    parts = [json.dumps(msg).encode(), *buffers]
    count = len(parts)
    offsets = [4 * (count + 1)]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + len(part))
    header = count.to_bytes(4, "big") + b"".join(o.to_bytes(4, "big") for o in offsets)
    return header + b"".join(parts)


def v1_frame(msg: dict, *buffers: bytes, channel: str = "iopub") -> bytes:
    """`msg` and its buffers in the server's v1 websocket framing."""
    parts = [channel.encode(), *(json.dumps(msg[key]).encode() for key in
                                 ("header", "parent_header", "metadata", "content")), *buffers]
    offsets = [8 * (len(parts) + 2)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    return len(offsets).to_bytes(8, "little") + \
        b"".join(o.to_bytes(8, "little") for o in offsets) + b"".join(parts)


# -- requests --------------------------------------------------------------------------------

def test_execute_request_never_offers_stdin_nor_aborts_what_follows_an_error():
    request = protocol.execute_request("print(1)", SESSION)
    assert request["content"]["code"] == "print(1)"
    assert request["content"]["allow_stdin"] is False
    assert request["content"]["stop_on_error"] is False
    assert request["content"]["silent"] is False


def test_execute_request_header_and_channel():
    request = protocol.execute_request("1", SESSION)
    assert request["header"]["msg_type"] == "execute_request"
    assert request["header"]["session"] == SESSION
    assert request["header"]["version"].startswith("5.")
    assert request["channel"] == "shell"
    assert request["parent_header"] == {}


def test_every_request_has_a_fresh_msg_id():
    ids = {protocol.execute_request("1", SESSION)["header"]["msg_id"] for _ in range(50)}
    assert len(ids) == 50


def test_encode_then_decode_round_trips_a_request():
    request = protocol.execute_request("x = 'é'", SESSION)
    decoded = protocol.decode(protocol.encode(request))
    assert decoded["header"] == request["header"]
    assert decoded["content"] == request["content"]
    assert decoded["msg_type"] == "execute_request"


# -- decoding --------------------------------------------------------------------------------

def test_decode_text_frame_fills_msg_type_and_drops_buffers():
    decoded = protocol.decode(json.dumps(message("stream", buffers=["AAAA"])))
    assert decoded["msg_type"] == "stream"
    assert decoded["parent_header"] == {"msg_id": "parent-1"}
    assert "buffers" not in decoded


def test_decode_text_frame_adds_missing_parts():
    decoded = protocol.decode(json.dumps({"header": {"msg_type": "status"}}))
    assert decoded["msg_type"] == "status"
    assert decoded["parent_header"] == {}
    assert decoded["content"] == {}
    assert decoded["metadata"] == {}


def test_decode_binary_frame_reads_the_json_and_drops_the_buffers():
    sent = message("display_data", content={"data": {"text/plain": "img"}})
    decoded = protocol.decode(binary_frame(sent, b"\x00\x01binary-buffer", b"second"))
    assert decoded["msg_type"] == "display_data"
    assert decoded["content"] == {"data": {"text/plain": "img"}}
    assert "buffers" not in decoded
    assert b"binary-buffer".decode() not in json.dumps(decoded)


def test_decode_binary_frame_without_buffers():
    decoded = protocol.decode(binary_frame(message("comm_msg")))
    assert decoded["msg_type"] == "comm_msg"


@pytest.mark.parametrize("frame", [
    "not json",
    "[1, 2, 3]",
    '"a string"',
    '{"content": {}}',
    '{"header": "not a dict"}',
    b"\x00\x00",
    b"\x00\x00\x00\x00\x00\x00\x00\x00",            # zero offsets
    b"\x00\x00\x00\x01\x00\x00\xff\xff{}",           # offset beyond the frame
    b"\x00\x00\x00\x01\x00\x00\x00\x08not json",
], ids=["text", "list", "string", "no-header", "bad-header", "short-binary", "no-offsets",
        "bad-offset", "binary-not-json"])
def test_decode_rejects_what_is_not_a_message(frame):
    with pytest.raises(ValueError):
        protocol.decode(frame)


def test_decode_v1_frame_reads_channel_and_parts_and_drops_the_buffers():
    sent = message("display_data", content={"data": {"text/plain": "é ✓"}})
    sent["metadata"] = {"isolated": True}
    decoded = protocol.decode_v1(v1_frame(sent, b"\x00\x01binary-buffer"))
    assert decoded["channel"] == "iopub"
    assert decoded["msg_type"] == "display_data"
    for key in ("header", "parent_header", "metadata", "content"):
        assert decoded[key] == sent[key]
    assert "buffers" not in decoded and "binary-buffer" not in json.dumps(decoded)


def test_decode_v1_reads_frames_as_the_server_builds_them_raw_bytes_included():
    """The kernel packs with `surrogateescape` (bytes that are not UTF-8 go raw), and the
    server relays its parts as they are: such bytes become U+FFFD, as in the JSON encoding."""
    from jupyter_client.session import Session
    from jupyter_server.services.kernels.connection.base import serialize_msg_to_ws_v1

    session = Session(key=b"")
    sent = session.msg("stream", content={"name": "stdout", "text": "caf\udce9 é ✓\n"},
                       parent={"msg_id": "parent-1"})
    parts = [session.pack(sent[key]) for key in ("header", "parent_header", "metadata",
                                                  "content")]
    decoded = protocol.decode_v1(serialize_msg_to_ws_v1(parts, "iopub"))
    assert decoded["content"]["text"] == "caf\ufffd é ✓\n"
    assert decoded["msg_id"] == sent["header"]["msg_id"] and decoded["msg_type"] == "stream"
    assert protocol.parent_id(decoded) == "parent-1"


def test_encode_v1_is_what_the_jupyter_server_reads():
    from jupyter_server.services.kernels.connection.base import deserialize_msg_from_ws_v1

    request = protocol.execute_request("x = 'é'", SESSION)
    channel, parts = deserialize_msg_from_ws_v1(protocol.encode_v1(request))
    assert channel == "shell"
    assert [json.loads(part) for part in parts] == [
        request["header"], request["parent_header"], request["metadata"], request["content"]]
    decoded = protocol.decode_v1(protocol.encode_v1(request))
    assert decoded["header"] == request["header"] and decoded["content"] == request["content"]


def _v1(count: int, offsets: list[int], body: bytes) -> bytes:
    return count.to_bytes(8, "little") + b"".join(o.to_bytes(8, "little") for o in offsets) \
        + body


GOOD_V1 = v1_frame(message("status"))
HEADER_END = 8 * 7  # six offsets after the count


@pytest.mark.parametrize("frame", [
    b"\x06\x00",
    _v1(2, [24, 24], b""),
    _v1(6, [HEADER_END, HEADER_END + 1, 99, 99, 99, 99], b"x"),   # offsets beyond the frame
    _v1(6, [HEADER_END + 2, HEADER_END + 7, HEADER_END + 23, HEADER_END + 25, HEADER_END + 27,
            HEADER_END + 29], b'zziopub{"msg_type":"x"}{}{}{}'),  # bytes before the channel
    _v1(6, [HEADER_END, HEADER_END + 2, HEADER_END + 1, HEADER_END + 3, HEADER_END + 3,
            HEADER_END + 3], b"abc"),                              # offsets going back
    _v1(6, [HEADER_END, HEADER_END, HEADER_END + 8, HEADER_END + 10, HEADER_END + 12,
            HEADER_END + 14], b"not json{}{}{}"),
    _v1(6, [HEADER_END, HEADER_END, HEADER_END + 4, HEADER_END + 6, HEADER_END + 8,
            HEADER_END + 10], b"{}{}{}{}{}"),                      # two values in one part
    _v1(6, [HEADER_END, HEADER_END, HEADER_END + 2, HEADER_END + 4, HEADER_END + 6,
            HEADER_END + 8], b"[]{}{}{}"),                         # a header that is no object
    GOOD_V1[:-1],                                                  # cut short
], ids=["short", "too-few-offsets", "beyond", "misplaced", "backwards", "not-json",
        "two-values", "list-header", "truncated"])
def test_decode_v1_rejects_what_is_not_a_message(frame):
    with pytest.raises(ValueError):
        protocol.decode_v1(frame)


# -- reading messages ------------------------------------------------------------------------

def test_parent_id():
    assert protocol.parent_id(message(parent="abc")) == "abc"
    assert protocol.parent_id(message(parent=None)) is None
    assert protocol.parent_id({"parent_header": None}) is None
    assert protocol.parent_id({}) is None


def test_is_idle_only_for_idle_status():
    idle = protocol.decode(json.dumps(message("status", content={"execution_state": "idle"})))
    busy = protocol.decode(json.dumps(message("status", content={"execution_state": "busy"})))
    stream = protocol.decode(json.dumps(message("stream", content={"execution_state": "idle"})))
    assert protocol.is_idle(idle)
    assert not protocol.is_idle(busy)
    assert not protocol.is_idle(stream)


@pytest.mark.parametrize("state", ["restarting", "dead"])
def test_parentless_restarting_or_dead_status_is_a_kernel_death(state):
    announced = message("status", parent=None, content={"execution_state": state})
    assert protocol.kernel_death_state(protocol.decode(json.dumps(announced))) == state


@pytest.mark.parametrize("msg", [
    message("status", parent="some-request", content={"execution_state": "dead"}),
    message("status", parent=None, content={"execution_state": "starting"}),
    message("status", parent=None, content={"execution_state": "idle"}),
    message("stream", parent=None, content={"execution_state": "restarting"}),
], ids=["with-parent", "starting", "idle", "not-status"])
def test_other_messages_are_not_a_kernel_death(msg):
    assert protocol.kernel_death_state(protocol.decode(json.dumps(msg))) is None


def test_decoded_message_with_null_content_can_be_read():
    # A null content must read as empty, not break the loop with a 500.
    null_content = {**message("status", parent=None), "content": None}
    decoded = protocol.decode(json.dumps(null_content))
    assert protocol.is_idle(decoded) is False
    assert protocol.kernel_death_state(decoded) is None


def test_message_whose_type_is_not_a_string_is_refused():
    bad = {"header": {"msg_type": ["status"]}, "parent_header": {}, "content": {}}
    with pytest.raises(ValueError):
        protocol.decode(json.dumps(bad))


def test_odd_execution_states_are_neither_idle_nor_death():
    odd = protocol.decode(json.dumps({"header": {"msg_type": "status"}, "parent_header": {},
                                      "content": {"execution_state": ["dead"]}}))
    assert not protocol.is_idle(odd)
    assert protocol.kernel_death_state(odd) is None


@pytest.mark.parametrize("restart, state", [(False, "shutdown"), (True, "restarting")])
def test_broadcast_shutdown_reply_means_the_kernel_went_away(restart, state):
    reply = {"header": {"msg_type": "shutdown_reply"}, "parent_header": {"msg_id": "other"},
             "content": {"status": "ok", "restart": restart}, "channel": "iopub"}
    assert protocol.kernel_death_state(protocol.decode(json.dumps(reply))) == state


@pytest.mark.parametrize("msg_id, expected", [
    ("4e7a1c2d-9b0e-4f3b_5388_17", ("4e7a1c2d-9b0e-4f3b_5388", 17)),
    ("ea7e89314f4ab_5407_0", ("ea7e89314f4ab_5407", 0)),
    ("0c7682d0376241489eba51af8068cade", None),  # a bare uuid, as older kernels send
    ("session_12_", None),
    ("_3", None),
    ("session_1_٣", None),  # a digit, but not an ASCII one
])
def test_sequence_number_reads_jupyter_clients_numbered_msg_ids(msg_id, expected):
    assert protocol.sequence_number({"header": {"msg_id": msg_id}}) == expected


def test_sequence_number_of_a_message_without_msg_id():
    assert protocol.sequence_number({"header": {}}) is None
