"""Unit tests of `app.kernels.result.ExecutionResult`: folding one execution's messages into
the contract's `execute_code` answer. Pure: messages are plain dicts, sizes are given.
"""

from __future__ import annotations

import json

from app.kernels.result import ExecutionResult

MSG_ID = "request-1"
NO_CAP = 10 * 1024 * 1024


def msg(msg_type: str, content: dict, channel: str = "iopub") -> dict:
    """A decoded message answering request MSG_ID."""
    return {"header": {"msg_id": f"{msg_type}-{id(content)}", "msg_type": msg_type},
            "parent_header": {"msg_id": MSG_ID}, "metadata": {}, "content": content,
            "msg_type": msg_type, "channel": channel}


def stream(text: str, name: str = "stdout") -> dict:
    return msg("stream", {"name": name, "text": text})


def status(state: str) -> dict:
    return msg("status", {"execution_state": state})


def reply(state: str = "ok", count: int | None = 1, **content) -> dict:
    return msg("execute_reply", {"status": state, "execution_count": count, **content},
               channel="shell")


def error(ename: str = "ZeroDivisionError", evalue: str = "division by zero") -> dict:
    return msg("error", {"ename": ename, "evalue": evalue,
                         "traceback": ["Traceback ...", f"{ename}: {evalue}"]})


def fold(*messages: dict, cap: int = NO_CAP) -> ExecutionResult:
    """An ExecutionResult fed `messages` in order, each sized as its JSON encoding."""
    result = ExecutionResult(cap)
    for message in messages:
        result.add(message, len(json.dumps(message)))
    return result


def test_stdout_and_stderr_are_concatenated_in_order():
    answer = fold(status("busy"), stream("a\n"), stream("oops\n", "stderr"), stream("b\n"),
                  stream("again\n", "stderr"), reply(), status("idle")).answer()
    assert answer["stdout"] == "a\nb\n"
    assert answer["stderr"] == "oops\nagain\n"
    assert answer["status"] == "ok"
    assert answer["error"] is None
    assert answer["truncated"] is False


def test_execute_result_and_display_data_become_outputs():
    shown = msg("display_data", {"data": {"image/png": "iVBOR"}, "metadata": {"width": 3}})
    result = msg("execute_result", {"data": {"text/plain": "42"}, "metadata": {},
                                    "execution_count": 7})
    answer = fold(shown, result, reply(count=7), status("idle")).answer()
    assert answer["outputs"] == [
        {"type": "display_data", "data": {"image/png": "iVBOR"}, "metadata": {"width": 3}},
        {"type": "execute_result", "data": {"text/plain": "42"}, "metadata": {}},
    ]
    assert answer["execution_count"] == 7


def test_error_comes_from_the_iopub_error_message():
    answer = fold(error("NameError", "name 'x' is not defined"),
                  reply("error", ename="NameError", evalue="from reply", traceback=[]),
                  status("idle")).answer()
    assert answer["status"] == "error"
    assert answer["error"]["ename"] == "NameError"
    assert answer["error"]["evalue"] == "name 'x' is not defined"
    assert answer["error"]["traceback"][-1] == "NameError: name 'x' is not defined"


def test_error_comes_from_execute_reply_when_no_iopub_error_arrived():
    answer = fold(reply("error", ename="KeyboardInterrupt", evalue="",
                        traceback=["line 1", 2]), status("idle")).answer()
    assert answer["status"] == "error"
    assert answer["error"] == {"ename": "KeyboardInterrupt", "evalue": "",
                               "traceback": ["line 1", "2"], "traceback_text": "line 1\n2"}


def test_aborted_reply_has_no_error():
    answer = fold(reply("aborted", count=None), status("idle")).answer()
    assert answer["status"] == "aborted"
    assert answer["error"] is None
    assert answer["execution_count"] is None


def test_complete_needs_reply_then_idle():
    result = fold(status("busy"), reply())
    assert not result.complete
    result.add(status("idle"), 10)
    assert result.complete


def test_complete_needs_idle_then_reply():
    result = fold(status("busy"), status("idle"))
    assert not result.complete
    result.add(reply(), 10)
    assert result.complete


def test_busy_status_alone_does_not_complete():
    assert not fold(reply(), status("busy")).complete


def test_results_keep_every_raw_message_in_arrival_order():
    messages = [status("busy"), msg("execute_input", {"code": "1"}), stream("x"),
                status("idle"), reply()]
    answer = fold(*messages).answer()
    assert answer["results"] == messages
    assert any(m["msg_type"] == "execute_reply" for m in answer["results"])


def test_output_past_the_cap_is_cut_where_the_cap_is_and_flagged():
    first, second = stream("A" * 100), stream("B" * 100)
    cap = len(json.dumps(first)) + 10
    answer = fold(status("busy"), first, second, reply(count=3), status("idle"),
                  cap=cap).answer()
    assert answer["stdout"] == "A" * 100 + "B" * 10  # the start of the crossing stream is kept
    assert answer["truncated"] is True
    assert second not in answer["results"]  # the raw message is cut like the summary


def test_a_single_huge_print_keeps_its_start():
    answer = fold(stream("X" * 10_000), reply(), status("idle"), cap=1000).answer()
    assert answer["stdout"] == "X" * 1000
    assert answer["truncated"] is True


def test_a_huge_non_ascii_print_keeps_at_most_the_cap_in_bytes_and_whole_characters():
    answer = fold(stream("日本" * 10_000), reply(), status("idle"), cap=1000).answer()
    assert answer["stdout"] == "日本" * 166 + "日"  # 333 characters of 3 bytes: 999 bytes
    assert answer["truncated"] is True


def test_output_that_is_not_a_stream_is_dropped_whole_past_the_cap():
    image = msg("display_data", {"data": {"image/png": "P" * 5000}, "metadata": {}})
    answer = fold(image, reply(), status("idle"), cap=1000).answer()
    assert answer["outputs"] == []
    assert answer["truncated"] is True


def test_server_rate_limit_notice_marks_the_answer_truncated():
    notice = stream("IOPub data rate exceeded.\nThe Jupyter server will temporarily stop "
                    "sending output\n", "stderr")
    answer = fold(stream("start\n"), notice, reply(), status("idle")).answer()
    assert answer["truncated"] is True
    assert answer["stderr"].startswith("IOPub data rate exceeded")


def test_reply_and_status_are_kept_past_the_cap():
    big = stream("X" * 1000)
    answer = fold(status("busy"), big, error(), reply("error", count=5, ename="E", evalue="v",
                                                      traceback=[]),
                  status("idle"), cap=50).answer()
    kinds = [m["msg_type"] for m in answer["results"]]
    assert kinds == ["status", "stream", "execute_reply", "status"]
    assert answer["status"] == "error"
    assert answer["execution_count"] == 5
    assert answer["error"]["ename"] == "E"  # the dropped iopub error is replaced by the reply's
    assert answer["stdout"] == "X" * 50
    assert answer["truncated"] is True


def test_complete_past_the_cap():
    result = fold(stream("X" * 1000), reply(), status("idle"), cap=10)
    assert result.complete
    assert result.truncated


def test_no_output_is_kept_after_the_cap_was_hit():
    # After a big message is dropped, a later small one must not be kept: stdout would lose
    # its middle ("A" + "C" without "B") instead of stopping where the cap was reached.
    a, b, c = stream("A" * 50), stream("B" * 500), stream("C")
    cap = len(json.dumps(a)) + len(json.dumps(c)) + 5
    answer = fold(a, b, c, reply(), status("idle"), cap=cap).answer()
    assert answer["truncated"] is True
    assert answer["stdout"].startswith("A" * 50 + "B")
    assert "C" not in answer["stdout"]


def test_answer_overrides_status_and_error():
    override = {"ename": "ExecutionTimeout", "evalue": "too slow", "traceback": []}
    answer = fold(stream("partial"), error()).answer("timeout", override)
    assert answer["status"] == "timeout"
    assert answer["error"] == {**override, "traceback_text": ""}
    assert answer["stdout"] == "partial"
    assert answer["execution_count"] is None


def test_answer_status_override_keeps_the_kernel_error():
    answer = fold(error("ValueError", "bad"), reply("error", count=2)).answer("timeout")
    assert answer["status"] == "timeout"
    assert answer["error"]["ename"] == "ValueError"


def test_answer_without_any_reply_is_an_error():
    answer = fold(stream("x")).answer()
    assert answer["status"] == "error"
    assert answer["execution_count"] is None


def test_answer_has_every_contract_field():
    answer = fold(reply(), status("idle")).answer()
    assert set(answer) == {"results", "status", "execution_count", "stdout", "stderr",
                           "outputs", "error", "truncated"}
    json.dumps(answer)  # serialisable as the HTTP body


def display(data: dict, display_id: str | None = None, msg_type: str = "display_data") -> dict:
    content = {"data": data, "metadata": {}}
    if display_id is not None:
        content["transient"] = {"display_id": display_id}
    return msg(msg_type, content)


def clear(wait: bool = False) -> dict:
    return msg("clear_output", {"wait": wait})


def test_clear_output_empties_the_outputs_but_stdout_keeps_every_stream_text():
    result = fold(stream("step 1\n"), display({"text/plain": "old"}), clear(),
                  stream("step 2\n"), display({"text/plain": "new"}), reply(), status("idle"))
    answer = result.answer()
    assert [o["data"]["text/plain"] for o in answer["outputs"]] == ["new"]
    assert answer["stdout"] == "step 1\nstep 2\n"  # the contract: all stdout text
    assert [m["msg_type"] for m in answer["results"]].count("display_data") == 2


def test_clear_output_with_wait_clears_when_the_next_output_arrives():
    result = fold(display({"text/plain": "10%"}), clear(wait=True))
    assert len(result.answer()["outputs"]) == 1  # nothing new yet: still shown
    result.add(display({"text/plain": "20%"}), 3)
    assert [o["data"]["text/plain"] for o in result.answer()["outputs"]] == ["20%"]


def test_clear_output_past_the_cap_still_clears():
    """A progress display past the cap must not end showing a stale state."""
    result = fold(display({"text/plain": "0%"}), stream("x" * 100), clear(), cap=60)
    assert result.answer()["truncated"] is True
    assert result.answer()["outputs"] == []


def test_a_progress_loop_past_the_cap_keeps_memory_bounded():
    """`clear_output(wait=True); print(i)` for ever: past the cap nothing more is kept."""
    result = ExecutionResult(1000)
    for i in range(10_000):
        result.add(clear(wait=True), 100)
        result.add(display({"text/plain": f"{i}%"}), 100)
    answer = result.answer()
    assert answer["truncated"] is True
    assert len(answer["results"]) <= 10
    assert result.kept_bytes <= 1000
    assert answer["outputs"] == []  # the last clear was applied; what came after it, dropped


def test_update_display_data_replaces_the_display_it_names():
    result = fold(display({"text/plain": "0%"}, "bar"), display({"text/plain": "other"}),
                  display({"text/plain": "100%"}, "bar", msg_type="update_display_data"))
    outputs = result.answer()["outputs"]
    assert [o["data"]["text/plain"] for o in outputs] == ["100%", "other"]
    assert outputs[0]["display_id"] == "bar" and "display_id" not in outputs[1]


def test_images_are_kept_as_sent_and_count_against_the_cap():
    png = {"image/png": "iVBORw0KGgo" + "A" * 100, "text/plain": "<Figure>"}
    kept = fold(display(png)).answer()
    assert kept["outputs"][0]["data"] == png and not kept["truncated"]
    dropped = fold(display(png), cap=50).answer()
    assert dropped["outputs"] == [] and dropped["truncated"]


def test_traceback_text_has_no_ansi_colour_codes():
    coloured = msg("error", {"ename": "ValueError", "evalue": "bad", "traceback": [
        "\x1b[0;31m---------\x1b[0m", "\x1b[0;31mValueError\x1b[0m: bad"]})
    error_field = fold(coloured).answer()["error"]
    assert error_field["traceback"][1] == "\x1b[0;31mValueError\x1b[0m: bad"  # raw kept
    assert error_field["traceback_text"] == "---------\nValueError: bad"


def test_add_returns_the_updates_a_stream_shows():
    result = ExecutionResult(NO_CAP)
    assert result.add(status("busy"), 10) == []
    assert result.add(stream("hi\n"), 10) == [{"type": "stdout", "text": "hi\n"}]
    assert result.add(stream("oops", "stderr"), 10) == [{"type": "stderr", "text": "oops"}]
    assert result.add(clear(wait=True), 10) == [{"type": "clear_output", "wait": True}]
    [update] = result.add(display({"text/plain": "x"}), 10)
    assert update == {"type": "output", "output": {"type": "display_data",
                                                   "data": {"text/plain": "x"},
                                                   "metadata": {}}}
    [failure] = result.add(error(), 10)
    assert failure["type"] == "error" and failure["error"]["ename"] == "ZeroDivisionError"


def test_code_that_never_replied_keeps_the_count_it_started_under():
    """A kernel killed mid-cell (or code stopped by a restart) sends no reply: the answer
    still says which cell it was, from `execute_input`."""
    result = fold(status("busy"), msg("execute_input", {"code": "x", "execution_count": 7}),
                  stream("partial\n"))
    assert result.answer("crashed")["execution_count"] == 7
    assert fold(status("busy")).answer("crashed")["execution_count"] is None
