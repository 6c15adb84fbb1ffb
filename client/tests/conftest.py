"""The server most of the client's tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness import MAX_BODY_BYTES, MAX_ITEMS, serve


@pytest.fixture(scope="session")
def url() -> Iterator[str]:
    """The server most tests share: small item and body limits, so that lists split."""
    yield from serve(TOKSERVE_MAX_ITEMS=str(MAX_ITEMS), TOKSERVE_MAX_BODY_BYTES=str(MAX_BODY_BYTES))
