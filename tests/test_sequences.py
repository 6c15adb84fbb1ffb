"""Layouts over HTTP: GET /v1/layouts and POST /v1/sequences/decode on generated sequences."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from tokserve_client.layouts import LayoutError

from app.registry import ModelRegistry
from tests.support import TEXT, png_bytes, served, settings_for, tiny_layout, wav_bytes


@pytest.fixture
async def client(repo: Path, tmp_path: Path) -> Any:
    layouts = tiny_layout(tmp_path / "layouts", repo)
    async with served(settings_for(repo, layout_dir=str(layouts))) as served_client:
        yield served_client


async def tokens_of(client: httpx.AsyncClient) -> tuple[list[list[int]], list[list[int]]]:
    image = await client.post("/v1/images/encode", content=png_bytes(seed=4))
    audio = await client.post("/v1/audio/encode", content=wav_bytes(seconds=0.3))
    return image.json()["items"][0]["tokens"], audio.json()["items"][0]["tokens"]


async def generated(client: httpx.AsyncClient) -> tuple[list[int], Any, Any]:
    """Text, an image span, text, a clip span, text: as an LLM would have generated them."""
    grid, codes = await tokens_of(client)
    layout = client.app.state.engine.registry.layouts["tiny"]  # type: ignore[attr-defined]
    image = layout.to_ids("tiny-image", np.array(grid)).tolist()
    clip = layout.to_ids("tiny-audio", np.array(codes)).tolist()
    return [5, 6, *image, 7, *clip, 8, 9], grid, codes


async def test_the_loaded_layouts_are_listed_with_their_id_ranges(
    client: httpx.AsyncClient,
) -> None:
    (layout,) = (await client.get("/v1/layouts")).json()["layouts"]
    assert layout["name"] == "tiny" and layout["text_vocab_size"] == TEXT
    assert [r["name"] for r in layout["ranges"]] == [
        "text", "marker boi", "marker eoi", "marker boa", "marker eoa",
        "tiny-image codes", "tiny-audio codes",
    ]  # fmt: skip
    assert layout["ranges"][-1]["stop"] == layout["vocab_size"]


async def test_a_generated_sequence_decodes_to_its_spans_in_order(
    client: httpx.AsyncClient,
) -> None:
    ids, grid, codes = await generated(client)
    answer = await client.post("/v1/sequences/decode", json={"layout": "tiny", "ids": ids})
    png = await client.post("/v1/images/decode", json={"tokens": grid})
    wav = await client.post("/v1/audio/decode", json={"tokens": codes})
    assert answer.status_code == 200
    spans = answer.json()["spans"]
    assert [(s["kind"], s["start"], s["end"]) for s in spans] == [
        ("text", 0, 2),
        ("media", 2, 2 + len(grid) * len(grid[0]) + 2),
        ("text", spans[1]["end"], spans[1]["end"] + 1),
        ("media", spans[2]["end"], spans[2]["end"] + len(codes) * len(codes[0]) + 2),
        ("text", len(ids) - 2, len(ids)),
    ]
    assert base64.b64decode(spans[1]["data"]) == png.content
    assert base64.b64decode(spans[3]["data"]) == wav.content
    assert (spans[1]["media_type"], spans[3]["media_type"]) == ("image/png", "audio/wav")


async def test_a_malformed_span_carries_its_problem_and_the_others_decode(
    client: httpx.AsyncClient,
) -> None:
    ids, _, _ = await generated(client)
    ids[3] = 7  # a text id inside the image span
    answer = await client.post(
        "/v1/sequences/decode",
        json={"layout": "tiny", "ids": ids},
        headers={"Accept": "application/msgpack"},
    )
    assert answer.status_code == 207
    spans = msgpack.unpackb(answer.content)["spans"]
    image, clip = spans[1], spans[3]
    assert image["error"]["status"] == 422
    assert image["error"]["detail"].startswith(
        f"ids 2 to {image['end'] - 1}: id 7 at position 3 is not one of tiny-image's codes"
    )
    assert clip["data"][:4] == b"RIFF"


async def test_an_unknown_layout_is_refused_naming_the_loaded_ones(
    client: httpx.AsyncClient,
) -> None:
    answer = await client.post("/v1/sequences/decode", json={"layout": "emu3", "ids": [1]})
    assert answer.status_code == 404
    assert answer.json()["detail"] == "Unknown layout 'emu3'; loaded layouts: ['tiny']."


def test_a_layout_whose_ranges_overlap_stops_the_start_in_one_sentence(
    repo: Path, tmp_path: Path
) -> None:
    folder = tiny_layout(tmp_path / "layouts", repo)
    spec = json.loads((folder / "tiny.json").read_text())
    spec["models"]["tiny-audio"]["offset"] = TEXT + 10  # inside the image's codes
    (folder / "tiny.json").write_text(json.dumps(spec))
    with pytest.raises(LayoutError) as refused:  # what `tokserve serve` loads before it serves
        ModelRegistry.load(settings_for(repo, layout_dir=str(folder)))
    assert str(refused.value).startswith("layout tiny: tiny-image codes [1004, ")
    assert str(refused.value).endswith(") overlap")


async def test_encode_with_a_layout_adds_each_items_span_of_ids(client: httpx.AsyncClient) -> None:
    grid, codes = await tokens_of(client)
    layout = client.app.state.engine.registry.layouts["tiny"]  # type: ignore[attr-defined]
    image = await client.post("/v1/images/encode?layout=tiny", content=png_bytes(seed=4))
    audio = await client.post(
        "/v1/audio/encode?layout=tiny",
        content=wav_bytes(seconds=0.3),
        headers={"Accept": "application/msgpack"},
    )
    assert image.json()["items"][0]["ids"] == layout.to_ids("tiny-image", np.array(grid)).tolist()
    assert msgpack.unpackb(audio.content)["items"][0]["ids"] == (
        layout.to_ids("tiny-audio", np.array(codes)).tolist()
    )


async def test_encode_with_a_layout_and_fewer_codebooks_lays_out_their_rows(
    client: httpx.AsyncClient,
) -> None:
    answer = await client.post("/v1/audio/encode?layout=tiny&codebooks=2", content=wav_bytes())
    item = answer.json()["items"][0]
    layout = client.app.state.engine.registry.layouts["tiny"]  # type: ignore[attr-defined]
    place = layout.media["tiny-audio"]
    first_frame = [place.offset + row * place.stride + item["tokens"][row][0] for row in (0, 1)]
    assert item["ids"][1:3] == first_frame and len(item["ids"]) == 2 + 2 * item["frames"]


async def test_long_audio_comes_in_overlapping_windows_each_its_own_span(
    client: httpx.AsyncClient,
) -> None:
    # tiny-audio: 50 frames/s; 1 s of audio, windows of 0.4 s overlapping by 0.1 s
    url = "/v1/audio/encode?layout=tiny&window_s=0.4&overlap_s=0.1"
    item = (await client.post(url, content=wav_bytes(seconds=1.0))).json()["items"][0]
    layout = client.app.state.engine.registry.layouts["tiny"]  # type: ignore[attr-defined]
    tokens = np.array(item["tokens"])
    starts = [0, 15, 30]  # 20-frame windows every 15 frames, the last one 20 frames
    assert [(w["start_s"], w["duration_s"]) for w in item["windows"]] == [
        (0.0, 0.4),
        (0.3, 0.4),
        (0.6, 0.4),
    ]
    assert [w["ids"] for w in item["windows"]] == [
        layout.to_ids("tiny-audio", tokens[:, start : start + 20]).tolist() for start in starts
    ]


async def test_an_overlap_of_a_window_or_more_advances_one_frame_at_a_time(
    client: httpx.AsyncClient,
) -> None:
    url = "/v1/audio/encode?window_s=0.2&overlap_s=0.5"
    item = (await client.post(url, content=wav_bytes(seconds=0.3))).json()["items"][0]
    assert [w["start_s"] for w in item["windows"]] == [0.0, 0.02, 0.04, 0.06, 0.08, 0.1]


async def test_windows_without_a_layout_hold_each_windows_tokens(
    client: httpx.AsyncClient,
) -> None:
    url = "/v1/audio/encode?window_s=0.4&overlap_s=0.1"
    item = (await client.post(url, content=wav_bytes(seconds=1.0))).json()["items"][0]
    tokens = np.array(item["tokens"])
    assert [np.array(w["tokens"]).tolist() for w in item["windows"]] == [
        tokens[:, start : start + 20].tolist() for start in (0, 15, 30)
    ]


@pytest.mark.parametrize(
    ("url", "headers", "status", "detail"),
    [
        (
            "/v1/images/encode?layout=emu3",
            {},
            404,
            "Unknown layout 'emu3'; loaded layouts: ['tiny'].",
        ),
        (
            "/v1/images/encode?layout=tiny",
            {"Accept": "application/x-npy"},
            422,
            "layout and window_s add to each item what application/x-npy cannot carry; ask for "
            "JSON or msgpack.",
        ),
    ],
    ids=["unknown", "npy"],
)
async def test_encode_with_a_layout_it_cannot_use_is_refused_before_any_work(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], status: int, detail: str
) -> None:
    media = png_bytes(seed=4) if "images" in url else wav_bytes(seconds=0.3)
    answer = await client.post(url, content=media, headers=headers)
    assert (answer.status_code, answer.json()["detail"]) == (status, detail)


async def test_decode_takes_an_items_span_of_ids_in_place_of_its_tokens(
    client: httpx.AsyncClient,
) -> None:
    grid, codes = await tokens_of(client)
    image = await client.post("/v1/images/encode?layout=tiny", content=png_bytes(seed=4))
    clip = await client.post("/v1/audio/encode?layout=tiny", content=wav_bytes(seconds=0.3))
    image_ids, clip_ids = image.json()["items"][0]["ids"], clip.json()["items"][0]["ids"]
    png = await client.post("/v1/images/decode", json={"layout": "tiny", "ids": image_ids})
    wav = await client.post(
        "/v1/audio/decode",
        content=msgpack.packb({"layout": "tiny", "ids": clip_ids}),
        headers={"Content-Type": "application/msgpack"},
    )
    assert png.content == (await client.post("/v1/images/decode", json={"tokens": grid})).content
    assert wav.content == (await client.post("/v1/audio/decode", json={"tokens": codes})).content


async def test_a_list_of_spans_answers_each_and_names_the_one_that_does_not_map_back(
    client: httpx.AsyncClient,
) -> None:
    clip = await client.post("/v1/audio/encode?layout=tiny", content=wav_bytes(seconds=0.3))
    ids = clip.json()["items"][0]["ids"]
    answer = await client.post(
        "/v1/audio/decode", json={"layout": "tiny", "ids": [ids, [*ids[:2], 7, *ids[3:]]]}
    )
    assert answer.status_code == 207
    good, bad = answer.json()["items"]
    assert good["media_type"] == "audio/wav"
    assert bad["error"]["status"] == 422
    assert bad["error"]["detail"].startswith("ids[1]: ")
    assert "position 2" in bad["error"]["detail"]


async def test_a_span_opening_another_modalitys_marker_is_refused_naming_where_it_decodes(
    client: httpx.AsyncClient,
) -> None:
    clip = await client.post("/v1/audio/encode?layout=tiny", content=wav_bytes(seconds=0.3))
    answer = await client.post(
        "/v1/images/decode", json={"layout": "tiny", "ids": clip.json()["items"][0]["ids"]}
    )
    assert (answer.status_code, answer.json()["detail"]) == (
        422,
        "The first span opens a span of tiny-audio, an audio model: decode it at "
        "/v1/audio/decode or /v1/sequences/decode.",
    )


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (
            {"ids": [1, 2]},
            "'ids' are read through a layout: add \"layout\": NAME, one of GET /v1/layouts.",
        ),
        (
            {"layout": "tiny", "ids": [[[1]]]},
            "'ids' must be [int] (one span of the layout's ids, markers included) for one "
            "item, or a list of those for several (got 3 levels of nesting).",
        ),
        (
            {"layout": "tiny", "model": "tiny-image", "ids": [[1.5]]},
            "Every item failed; item 0: ids[0]: every id must be an integer.",
        ),
    ],
    ids=["no-layout", "too-deep", "not-integers"],
)
async def test_a_body_of_ids_that_cannot_be_read_answers_422_saying_why(
    client: httpx.AsyncClient, body: dict[str, Any], detail: str
) -> None:
    answer = await client.post("/v1/images/decode", json=body)
    assert (answer.status_code, answer.json()["detail"]) == (422, detail)


async def test_more_spans_of_ids_than_the_item_limit_are_refused_from_msgpack_headers(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unpack_all(*args: object, **kwargs: object) -> None:
        raise AssertionError("the body was unpacked to count its items")

    limit = client.app.state.engine.settings.max_items  # type: ignore[attr-defined]
    body = msgpack.packb({"layout": "tiny", "ids": [[TEXT]] * (limit + 1)})
    monkeypatch.setattr(msgpack, "unpackb", unpack_all)
    answer = await client.post(
        "/v1/images/decode", content=body, headers={"Content-Type": "application/msgpack"}
    )
    assert answer.status_code == 413
    assert answer.json()["detail"].startswith(f"{limit + 1} token items in one request")


async def test_a_body_with_tokens_is_read_as_tokens_whatever_else_it_holds(
    client: httpx.AsyncClient,
) -> None:
    grid, _ = await tokens_of(client)
    body = {"tokens": grid, "layout": "tiny", "ids": [TEXT]}
    answer = await client.post(
        "/v1/images/decode",
        content=msgpack.packb(body),
        headers={"Content-Type": "application/msgpack"},
    )
    assert answer.content == (await client.post("/v1/images/decode", json={"tokens": grid})).content
