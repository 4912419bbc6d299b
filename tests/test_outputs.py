"""Rich output as an agent needs it, from a real kernel: images kept as sent, `clear_output`
and `update_display_data` applied as a notebook shows them, tracebacks also as plain text.
"""

from __future__ import annotations

import base64

from app import create_app
from tests.conftest import post

PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJ"
       "RU5ErkJggg==")
SVG = '<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"></svg>'
JPEG = base64.b64encode(b"\xff\xd8\xff\xe0" + bytes(16) + b"\xff\xd9").decode()

CELL = f"""
from IPython.display import Image, SVG, clear_output, display
import base64
print("noise")
display("a display that is cleared")
clear_output()
print("after clear")
display(Image(data=base64.b64decode("{PNG}")))
display(Image(data=base64.b64decode("{JPEG}"), format="jpeg"))
display(SVG('{SVG}'))
progress = display("0%", display_id=True)
progress.update("100%")
raise ValueError("bad value")
"""


def test_a_notebook_like_cell_reads_as_a_notebook_shows_it(http, shared_kernel):
    status, answer = post(http, "/execute_code", {"id": shared_kernel, "code": CELL})
    assert status == 200
    assert answer["stdout"] == "noise\nafter clear\n"  # all stream text, as the contract says
    assert [o["type"] for o in answer["outputs"]] == ["display_data"] * 4
    png, jpeg, svg, progress = answer["outputs"]
    assert png["data"]["image/png"] == PNG  # as the kernel sent it: base64, untouched
    assert jpeg["data"]["image/jpeg"] == JPEG
    assert svg["data"]["image/svg+xml"].startswith("<svg")
    assert progress["data"]["text/plain"] == "'100%'"
    assert progress["display_id"]
    # Nothing is lost: the raw messages keep what was cleared and updated.
    kinds = [m["msg_type"] for m in answer["results"]]
    assert "clear_output" in kinds and "update_display_data" in kinds
    assert any(m["content"].get("data", {}).get("text/plain") == "'a display that is cleared'"
               for m in answer["results"] if m["msg_type"] == "display_data")
    error = answer["error"]
    assert error["ename"] == "ValueError"
    assert any("\x1b[" in line for line in error["traceback"]), "raw keeps IPython's colours"
    assert "\x1b[" not in error["traceback_text"]
    assert "ValueError: bad value" in error["traceback_text"]


def test_images_count_against_the_output_cap(settings, shared_kernel):
    http = create_app(settings.replace(max_output_bytes=20_000)).test_client()
    code = ("from IPython.display import Image, display\n"
            f"import base64\nsmall = base64.b64decode('{PNG}')\n"
            "display(Image(data=small))\n"
            "display(Image(data=small + bytes(50_000)))\n"
            "print('after the big image')")
    status, answer = post(http, "/execute_code", {"id": shared_kernel, "code": code})
    assert status == 200 and answer["status"] == "ok"
    assert answer["truncated"] is True
    assert [o["data"]["image/png"] for o in answer["outputs"]] == [PNG]
    assert answer["stdout"] == "", "nothing after the dropped image is kept: no holes"


def test_the_test_kernels_keep_no_shared_history(http, shared_kernel):
    """The tests compare output exactly: their kernels must not share IPython's history
    database, which a frozen kernel can leave locked for the others (see conftest)."""
    code = "print(get_ipython().history_manager.enabled)"
    status, answer = post(http, "/execute_code", {"id": shared_kernel, "code": code})
    assert (status, answer["stdout"]) == (200, "False\n")
