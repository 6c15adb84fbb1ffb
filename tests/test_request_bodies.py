"""Reading request bodies (app/api/requests.py): a msgpack list of token items is counted from
its headers before anything is unpacked, whatever the items are; JSON media bodies must be a
list of base64 strings."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest

from tests.support import (
    TINY_AUDIO,
    held_body,
    in_chunks,
    png_bytes,
    problem_detail,
    served,
    settings_for,
)

K = TINY_AUDIO["arch"]["codebooks"]
MSGPACK = {"Content-Type": "application/msgpack"}
JSON = {"Content-Type": "application/json"}
ENCODE = "/v1/images/encode"
NOT_AN_OBJECT = (
    'The body must be an object {"model": ..., "tokens": [[int]] (k codebooks of F frames)}, '
    'or {"layout": ..., "ids": [int]} for spans of a layout\'s ids.'
)
TOO_MANY = (
    "3 token items in one request; at most 2 (TOKSERVE_MAX_ITEMS) are accepted: "
    "split the list into several requests."
)
BINARY_ITEM = {"dtype": "uint16", "shape": [K, 1], "data": bytes(2 * K)}
# three items of each kind, named by what the first one starts with in msgpack
ITEMS: dict[str, list[Any]] = {
    "binary-items": [BINARY_ITEM] * 3,
    "empty-maps": [{}] * 3,
    "fixmaps-of-15": [{i: 0 for i in range(15)}] * 3,
    "map16s": [{i: 0 for i in range(16)}] * 3,
    "map32s": [dict.fromkeys(range(65_536), 0)] * 3,
    "rows-of-15-ids": [[[0] * 15] * K] * 3,
    "array16-rows": [[[0] * 16] * K] * 3,
    "array32-rows": [[[0] * 65_536]] * 3,
}


@pytest.fixture
async def two_items(repo: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The app, not warmed up (it starts in a tenth of a second), taking 2 items a request."""
    async with served(settings_for(repo, warmup=False, max_items=2)) as client:
        yield client


@pytest.fixture
def unpacking_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any full unpacking of a msgpack body: a count must come from its headers alone."""

    def unpack_all(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the body was unpacked to count its items")

    monkeypatch.setattr(msgpack, "unpackb", unpack_all)


@pytest.mark.parametrize("items", ITEMS.values(), ids=list(ITEMS))
@pytest.mark.usefixtures("unpacking_refused")
async def test_a_msgpack_list_of_more_items_than_max_items_is_refused_from_its_headers(
    two_items: httpx.AsyncClient, items: list[Any]
) -> None:
    body = msgpack.packb({"model": "tiny-audio", "tokens": items})
    response = await two_items.post("/v1/audio/decode", content=body, headers=MSGPACK)
    assert problem_detail(response, 413) == TOO_MANY


async def test_one_msgpack_item_with_more_rows_than_max_items_is_one_item(
    two_items: httpx.AsyncClient,
) -> None:
    body = msgpack.packb({"tokens": [[1] * 5] * K})  # K = 4 codebooks, more than 2
    response = await two_items.post("/v1/audio/decode", content=body, headers=MSGPACK)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
async def test_a_flat_list_of_ids_is_refused_for_its_nesting_not_its_length(
    two_items: httpx.AsyncClient, binary: bool
) -> None:
    payload = {"tokens": [1, 2, 3]}
    if binary:
        response = await two_items.post(
            "/v1/audio/decode", content=msgpack.packb(payload), headers=MSGPACK
        )
    else:
        response = await two_items.post("/v1/audio/decode", json=payload)
    assert problem_detail(response, 422) == (
        "'tokens' must be [[int]] (k codebooks of F frames) for one item, or a list of those "
        "for several (got 1 levels of nesting)."
    )


@pytest.mark.parametrize(
    "body",
    [["aGVsbG8="], {"images": "aGVsbG8="}, {"images": ["aGVsbG8=", 1]}, {"files": ["aGVsbG8="]}],
    ids=["a-list", "a-string", "a-number-among-strings", "another-key"],
)
async def test_a_json_media_body_must_be_a_list_of_base64_strings(
    two_items: httpx.AsyncClient, body: Any
) -> None:
    response = await two_items.post("/v1/images/encode", json=body)
    assert problem_detail(response, 422) == (
        'The JSON body must be {"images": ["<base64>", ...]}: a list of base64 strings.'
    )


async def test_maps_where_ids_belong_make_one_bad_item_not_a_list_of_items(
    two_items: httpx.AsyncClient,
) -> None:
    body = msgpack.packb({"tokens": [[{}]] * 3})  # one item of 3 codebooks, were they ids
    response = await two_items.post("/v1/audio/decode", content=body, headers=MSGPACK)
    assert problem_detail(response, 422) == (
        "tokens must hold integer token ids, not nulls or integers beyond 64 bits."
    )


NO_IMAGES = (
    "The request holds no images: send raw bytes as the body, multipart files, "
    'or JSON {"images": [<base64>, ...]}.'
)


async def test_a_json_list_of_no_images_answers_400_saying_how_to_send_them(
    two_items: httpx.AsyncClient,
) -> None:
    response = await two_items.post("/v1/images/encode", json={"images": []})
    assert problem_detail(response, 400) == NO_IMAGES


async def test_a_multipart_body_of_fields_without_files_holds_no_images(
    two_items: httpx.AsyncClient,
) -> None:
    body = b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--b--\r\n'
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    response = await two_items.post("/v1/images/encode", content=body, headers=headers)
    assert problem_detail(response, 400) == NO_IMAGES


async def test_max_items_images_are_taken_and_one_more_refused_in_json_and_multipart(
    two_items: httpx.AsyncClient,
) -> None:
    images = [png_bytes(seed=60 + i) for i in range(4)]
    encoded = [base64.b64encode(image).decode() for image in images]
    files = [("files", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]
    assert (await two_items.post(ENCODE, json={"images": encoded[:2]})).status_code == 200
    assert (await two_items.post(ENCODE, files=files[:2])).status_code == 200
    too_many = (
        "3 images in one request; at most 2 (TOKSERVE_MAX_ITEMS) are accepted: "
        "split the list into several requests."
    )
    assert (
        problem_detail(await two_items.post(ENCODE, json={"images": encoded[:3]}), 413) == too_many
    )
    assert problem_detail(await two_items.post(ENCODE, files=files[:3]), 413) == too_many
    parts = (
        "More than 3 parts in one multipart request; at most 2 images (TOKSERVE_MAX_ITEMS) "
        "are accepted."
    )
    assert problem_detail(await two_items.post(ENCODE, files=files), 413) == parts
    fields = {f"note{i}": "x" for i in range(4)}
    assert problem_detail(await two_items.post(ENCODE, data=fields, files=files[:1]), 413) == parts


@pytest.mark.parametrize(
    ("body", "headers", "status", "detail"),
    [
        (
            b"",
            MSGPACK,
            400,
            'The body is empty; send {"model": ..., "tokens": [[int]] (k codebooks of F frames)}.',
        ),
        (
            b"\x93\x01",
            MSGPACK,
            400,
            "The body is not valid msgpack (Unpack failed: incomplete input).",
        ),
        (b"\xc1", MSGPACK, 400, "The body is not valid msgpack (FormatError)."),
        (
            b"{not json",
            JSON,
            400,
            "The body is not valid JSON (Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1)).",
        ),
        (b"[" * 100_000, JSON, 400, "The JSON body is nested too deeply to parse."),
        (
            msgpack.packb([1]),
            MSGPACK,
            422,
            NOT_AN_OBJECT,
        ),
        (
            b'{"model": "tiny-audio"}',
            JSON,
            422,
            NOT_AN_OBJECT,
        ),
        (
            b'{"model": 5, "tokens": [[1]]}',
            JSON,
            422,
            "'model' must be a string naming a loaded model.",
        ),
    ],
    ids=[
        "empty",
        "truncated-msgpack",
        "reserved-msgpack-byte",
        "bad-json",
        "deep-json",
        "msgpack-list",
        "no-tokens",
        "model-not-a-string",
    ],
)
async def test_a_decode_body_that_is_not_model_and_tokens_answers_saying_why(
    two_items: httpx.AsyncClient, body: bytes, headers: dict[str, str], status: int, detail: str
) -> None:
    response = await two_items.post("/v1/audio/decode", content=body, headers=headers)
    assert problem_detail(response, status) == detail


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("Application/MsgPack; charset=binary", msgpack.packb({"tokens": [[1] * 5] * K})),
        ("application/x-msgpack", msgpack.packb({"tokens": [[1] * 5] * K})),
        ("Application/JSON; charset=utf-8", b'{"tokens": [[1, 1, 1, 1, 1]]}'),
    ],
    ids=["msgpack-with-parameters", "x-msgpack", "json-with-parameters"],
)
async def test_the_content_type_is_read_without_case_or_parameters(
    two_items: httpx.AsyncClient, content_type: str, body: bytes
) -> None:
    response = await two_items.post(
        "/v1/audio/decode", content=body, headers={"Content-Type": content_type}
    )
    assert response.status_code == 200, response.text


async def test_a_decode_body_of_exactly_its_token_budget_is_read_and_one_byte_more_refused(
    repo: Path,
) -> None:
    limit = 1000 * 16 + 64 * 1024  # bytes per token and slack, in app/api/requests.py
    tokens = b'{"tokens": [[1, 1, 1, 1, 1]]}'
    fits = b" " * (limit - len(tokens)) + tokens
    refused = (
        "A decode body may hold 1000 tokens (TOKSERVE_MAX_DECODE_TOKENS), so at most "
        f"{limit} bytes; send fewer or shorter items per request."
    )
    async with served(settings_for(repo, warmup=False, max_decode_tokens=1000)) as client:
        for body in (fits, in_chunks(fits)):
            response = await client.post("/v1/audio/decode", content=body, headers=JSON)
            assert response.status_code == 200, response.text
        for body in (b" " + fits, in_chunks(b" " + fits)):
            response = await client.post("/v1/audio/decode", content=body, headers=JSON)
            assert problem_detail(response, 413) == refused


async def test_a_bad_base64_item_is_named_by_its_place_and_the_others_encoded(
    two_items: httpx.AsyncClient,
) -> None:
    images = [base64.b64encode(png_bytes(seed=63)).decode(), "not base64!!"]
    response = await two_items.post(ENCODE, json={"images": images})
    assert response.status_code == 207, response.text
    good, bad = response.json()["items"]
    assert len(good["tokens"]) == 8
    assert bad["error"]["detail"] == (
        "images[1] is not valid base64 (Only base64 data is allowed); it must be standard "
        "base64 (A-Z, a-z, 0-9, '+' and '/', padded with '='), optionally as a "
        "data:<media type>;base64, URL."
    )


async def test_text_fields_beside_the_files_are_read_past_up_to_max_items_plus_one(
    two_items: httpx.AsyncClient,
) -> None:
    fields = {f"note{i}": "x" for i in range(3)}
    files = [("files", ("a.png", png_bytes(seed=64), "image/png"))]
    response = await two_items.post(ENCODE, data=fields, files=files)
    assert response.status_code == 200, response.text
    assert len(response.json()["items"]) == 1


async def test_a_multipart_body_that_cannot_be_parsed_answers_400_quoting_the_parser(
    two_items: httpx.AsyncClient,
) -> None:
    headers = {"Content-Type": "multipart/form-data"}  # no boundary
    response = await two_items.post(ENCODE, content=b"not multipart at all", headers=headers)
    assert problem_detail(response, 400) == (
        "The multipart body could not be parsed (Missing boundary in multipart.); send "
        "multipart/form-data with one file part per item."
    )


CODES = [[1] * 5] * K
PAST_THE_PARSERS_LIMITS = {
    "a-map-of-17": (
        {"tokens": CODES, **{f"k{i}": 0 for i in range(16)}},
        "17 exceeds max_map_len(16)",
    ),
    "a-string-of-1025": ({"tokens": CODES, "note": "x" * 1025}, "1025 exceeds max_str_len(1024)"),
    "an-extension-type": (
        {"tokens": CODES, "model": msgpack.ExtType(1, b"x")},
        "2 exceeds max_ext_len(0)",
    ),
}


@pytest.mark.parametrize(
    ("payload", "reason"), PAST_THE_PARSERS_LIMITS.values(), ids=list(PAST_THE_PARSERS_LIMITS)
)
async def test_msgpack_past_the_parsers_limits_answers_400_quoting_them(
    two_items: httpx.AsyncClient, payload: dict[str, Any], reason: str
) -> None:
    response = await two_items.post(
        "/v1/audio/decode", content=msgpack.packb(payload), headers=MSGPACK
    )
    assert problem_detail(response, 400) == f"The body is not valid msgpack ({reason})."


async def test_msgpack_at_the_parsers_limits_is_read(two_items: httpx.AsyncClient) -> None:
    payload = {"tokens": CODES, "note": "x" * 1024, **{f"k{i}": 0 for i in range(14)}}  # 16 keys
    response = await two_items.post(
        "/v1/audio/decode", content=msgpack.packb(payload), headers=MSGPACK
    )
    assert response.status_code == 200, response.text


UNKNOWN = "Unknown audio model 'nope'; known audio models: ['tiny-audio']."


@pytest.mark.parametrize(
    ("tokens", "binary"),
    [(CODES, False), (BINARY_ITEM, True), ([CODES, CODES], False)],
    ids=["one-item-of-ids", "one-binary-item", "a-list-of-items"],
)
async def test_the_model_named_in_a_decode_body_is_the_one_asked_for(
    two_items: httpx.AsyncClient, tokens: Any, binary: bool
) -> None:
    payload = {"model": "nope", "tokens": tokens}
    if binary:
        body = msgpack.packb(payload)
        response = await two_items.post("/v1/audio/decode", content=body, headers=MSGPACK)
    else:
        response = await two_items.post("/v1/audio/decode", json=payload)
    assert problem_detail(response, 404) == UNKNOWN


async def test_a_json_list_of_more_items_than_max_items_is_refused(
    two_items: httpx.AsyncClient,
) -> None:
    response = await two_items.post("/v1/audio/decode", json={"tokens": [CODES] * 3})
    assert problem_detail(response, 413) == TOO_MANY


async def test_a_list_of_one_binary_item_answers_a_list_of_one(
    two_items: httpx.AsyncClient,
) -> None:
    body = msgpack.packb({"tokens": [BINARY_ITEM]})
    response = await two_items.post("/v1/audio/decode", content=body, headers=MSGPACK)
    assert response.status_code == 200, response.text
    (item,) = response.json()["items"]
    assert item["media_type"] == "audio/wav"


async def test_a_decode_body_declared_over_its_token_budget_is_refused_before_it_arrives(
    repo: Path,
) -> None:
    release = asyncio.Event()  # never set before the answer: the body's rest never comes
    headers = {**JSON, "Content-Length": "100000"}  # over the 81536 bytes 1000 tokens allow
    async with served(settings_for(repo, warmup=False, max_decode_tokens=1000)) as client:
        try:
            async with asyncio.timeout(10):
                response = await client.post(
                    "/v1/audio/decode", content=held_body(b"{}", release), headers=headers
                )
        finally:
            release.set()
    assert problem_detail(response, 413).startswith("A decode body may hold 1000 tokens")
    assert response.headers["connection"] == "close"
