"""schemathesis hooks for this API: `SCHEMATHESIS_HOOKS=tests.schemathesis_hooks` (from the
repository root) lets `schemathesis run` validate streamed answers too.
"""

from __future__ import annotations

import json

import schemathesis


@schemathesis.deserializer("application/x-ndjson")
def ndjson(ctx, response) -> list:
    """A streamed `execute_code` answer, one JSON object per line, read as an array (as the
    document describes it)."""
    return [json.loads(line) for line in response.content.decode("utf-8").splitlines()
            if line.strip()]


@schemathesis.check
def stream_ends_with_its_answer(ctx, response, case) -> bool | None:
    """A stream's last line is the whole answer (`result`) or what failed (`failure`)."""
    content_type = (response.headers.get("content-type") or [""])[0]
    if response.status_code != 200 or not content_type.startswith("application/x-ndjson"):
        return None
    lines = ndjson(None, response)
    assert lines and lines[-1].get("type") in ("result", "failure"), \
        f"the stream does not end with a result or a failure: {lines[-1:] or 'empty'}"
    return True
