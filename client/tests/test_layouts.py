"""Layouts offline: the client's helpers, from the layout files and /v1/models, give the server's
own ids for real media and cut a generated sequence as the server does."""

from __future__ import annotations

import httpx
import numpy as np
from harness import PHOTO, REPO_ROOT, SPEECH
from tokserve_client.layouts import Layout, load_layouts

ROUTES = (("images", PHOTO, "image-fsq-256"), ("audio", SPEECH, "audio-rvq-24k"))


def offline(url: str) -> Layout:
    """The generic layout, loaded here from its file and the server's model entries."""
    models = {m["name"]: m for m in httpx.get(f"{url}/v1/models", timeout=30).json()["models"]}
    return load_layouts(REPO_ROOT / "layouts", models)["generic"]


def encoded(url: str, route: str, media: bytes, model: str) -> dict:
    query = f"model={model}&layout=generic"
    answer = httpx.post(f"{url}/v1/{route}/encode?{query}", content=media, timeout=60)
    return answer.json()["items"][0]


def test_offline_layout_gives_the_servers_ids_for_a_photo_and_speech(url: str) -> None:
    layout = offline(url)
    for route, media, model in ROUTES:
        item = encoded(url, route, media, model)
        tokens = np.array(item["tokens"])
        assert layout.to_ids(model, tokens).tolist() == item["ids"]
        assert np.array_equal(layout.from_ids(model, item["ids"]), tokens)


def test_offline_split_cuts_a_generated_sequence_as_the_server_does(url: str) -> None:
    layout = offline(url)
    image, clip = (encoded(url, *route)["ids"] for route in ROUTES)
    sequence = [11, 12, *image, 13, *clip[:-1]]  # generation stopped before the clip's end
    answer = httpx.post(
        f"{url}/v1/sequences/decode", json={"layout": "generic", "ids": sequence}, timeout=60
    )
    served = [(s["kind"], s["start"], s["end"], s.get("model")) for s in answer.json()["spans"]]
    spans = layout.split(sequence)
    assert served == [(s.kind, s.start, s.end, s.model) for s in spans]
    assert answer.status_code == 207 and spans[-1].problem is not None
