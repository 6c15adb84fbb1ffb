"""schemathesis hooks (SCHEMATHESIS_HOOKS=tests.schemathesis_hooks): msgpack answers are read
as msgpack, so their schemas are checked as the JSON ones are."""

from __future__ import annotations

from typing import Any

import msgpack
import schemathesis


@schemathesis.deserializer("application/msgpack")
def read_msgpack(ctx: Any, response: Any) -> Any:
    """The answer's msgpack body as Python values."""
    return msgpack.unpackb(response.content, raw=False)
