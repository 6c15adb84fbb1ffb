"""Multi-scale token maps (VAR's next-scale tokens): one sequence per image, map after map.

The tokenizer is a plugin installed at test time (tests/test_plugins.py shows how): a small but
real VAR-style residual quantiser. An image's 8 x 8 patch colours are the latent; each scale
quantises, at its own size, what the coarser maps left unexplained, so the maps 1 x 1, 2 x 2
and 4 x 4 (21 tokens) add up to the picture. What is checked is what the service must carry:
``/v1/models`` names each map and the positions it fills, and the sequence goes through encode,
decode, the cache, binary bodies and layouts as the tokenizer itself gives it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from PIL import Image

from app.tokenizers.base import ImageInfo
from app.tokenizers.plugins import find_backend
from tests.support import on_path, served, settings_for

PLUGIN = '''
"""scales: a VAR-style multi-scale residual quantiser of patch colours."""

import json
from pathlib import Path

import torch
from torch.nn import functional as F

from app.tokenizers.base import ImageInfo
from app.tokenizers.plugins import Backend


class ScalesTokenizer:
    def __init__(self, codebook, scales, image_size, patch, device):
        self.codebook = torch.tensor(codebook, dtype=torch.float32, device=device)  # [V, 3]
        self.scales, self.patch, self.device = [tuple(s) for s in scales], patch, device
        self.side = image_size // patch
        self.info = ImageInfo(
            vocab_size=len(codebook),
            image_size=(image_size, image_size),
            grid=(sum(h * w for h, w in self.scales),),
            downsample=patch,
            scales=tuple(self.scales),
        )

    def _up(self, maps):
        return F.interpolate(maps, size=(self.side, self.side), mode="nearest")

    def encode(self, pixels):
        residual = F.avg_pool2d(pixels.float(), self.patch)
        tokens = []
        for height, width in self.scales:
            coarse = F.adaptive_avg_pool2d(residual, (height, width)).permute(0, 2, 3, 1)
            ids = torch.cdist(coarse.reshape(-1, 3), self.codebook).argmin(-1)
            ids = ids.reshape(pixels.shape[0], height * width)
            chosen = self.codebook[ids].reshape(-1, height, width, 3).permute(0, 3, 1, 2)
            residual = residual - self._up(chosen)
            tokens.append(ids)
        return torch.cat(tokens, 1)

    def decode(self, tokens):
        latent, start = 0, 0
        for height, width in self.scales:
            ids = tokens[:, start : start + height * width]
            chosen = self.codebook[ids].reshape(-1, height, width, 3).permute(0, 3, 1, 2)
            latent = latent + self._up(chosen)
            start += height * width
        pixels = F.interpolate(latent, scale_factor=self.patch, mode="nearest")
        return pixels.clamp(-1, 1)


def build(folder, config, device, dtype):
    spec = json.loads((Path(config["source"]) / "scales.json").read_text())
    return ScalesTokenizer(spec["codebook"], spec["scales"], spec["image_size"], 8, device)


BACKEND = Backend(
    build,
    weight_files=lambda folder, config: [Path(config["source"]) / "scales.json"],
    summary="multi-scale residual maps of patch colours",
)
'''
SCALES = [[1, 1], [2, 2], [4, 4]]
LENGTH = 1 + 4 + 16
VOCAB = 32


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A model repository with one multi-scale model, its plugin installed on sys.path."""
    on_path(tmp_path, monkeypatch, "tokserve_scales", PLUGIN, "scales = tokserve_scales:BACKEND")
    source = tmp_path / "scales-src"
    source.mkdir()
    codebook = np.random.default_rng(0).uniform(-1, 1, (VOCAB, 3)).round(3).tolist()
    spec = {"codebook": codebook, "scales": SCALES, "image_size": 32}
    (source / "scales.json").write_text(json.dumps(spec))
    folder = tmp_path / "models" / "var-tiny"
    folder.mkdir(parents=True)
    config = {"backend": "scales", "modality": "image", "source": str(source)}
    (folder / "config.json").write_text(json.dumps(config))
    yield tmp_path / "models"
    find_backend.cache_clear()


def gradient_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, 256, (2, 2, 3)).astype(np.float32)
    pixels = np.asarray(
        Image.fromarray(corners.astype(np.uint8)).resize((32, 32), Image.Resampling.BILINEAR)
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_maps_that_do_not_add_up_to_the_sequence_are_refused() -> None:
    with pytest.raises(ValueError, match=r"are one sequence of 5 tokens, not a grid of \[4\]"):
        ImageInfo(
            vocab_size=8, image_size=(32, 32), grid=(4,), downsample=8, scales=((1, 1), (2, 2))
        )


async def test_a_multi_scale_model_names_each_map_and_the_positions_it_fills(repo: Path) -> None:
    async with served(settings_for(repo)) as client:
        model = (await client.get("/v1/models/var-tiny")).json()
    assert (model["grid"], model["scales"]) == ([LENGTH], SCALES)
    assert [(s["name"], s["shape"], s["positions"]) for s in model["streams"]] == [
        ("scale 0", [1, 1], [0, 1]),
        ("scale 1", [2, 2], [1, 5]),
        ("scale 2", [4, 4], [5, 21]),
    ]


async def test_the_sequence_is_the_tokenizers_own_and_each_map_refines_the_picture(
    repo: Path,
) -> None:
    media = [gradient_png(seed) for seed in range(3)]
    async with served(settings_for(repo, cache_max_bytes=0)) as client:
        tokenizer = client.app.state.engine.registry.models["var-tiny"].tokenizer  # type: ignore[attr-defined]
        together = await client.post(
            "/v1/images/encode?model=var-tiny",
            files=[("images", (f"{i}.png", m, "image/png")) for i, m in enumerate(media)],
        )
        items = together.json()["items"]
        alone = [
            (await client.post("/v1/images/encode", content=m)).json()["items"][0] for m in media
        ]
        decoded = [
            await client.post("/v1/images/decode", json={"tokens": item["tokens"]})
            for item in items
        ]
    for item, single, image in zip(items, alone, media, strict=True):
        pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(image)))).permute(2, 0, 1)
        own = tokenizer.encode((pixels.float() / 127.5 - 1)[None])[0].tolist()
        assert item["shape"] == [LENGTH] and item["tokens"] == single["tokens"] == own
    errors = [
        np.abs(np.asarray(Image.open(io.BytesIO(d.content)), float) - np.asarray(
            Image.open(io.BytesIO(m)), float
        )).mean()
        for d, m in zip(decoded, media, strict=True)
    ]  # fmt: skip
    assert max(errors) < 40  # 21 tokens of a 32-colour codebook still draw the gradient


async def test_multi_scale_sequences_travel_as_binary_items_and_from_the_cache(repo: Path) -> None:
    async with served(settings_for(repo)) as client:
        first = await client.post("/v1/images/encode", content=gradient_png(1))
        again = await client.post("/v1/images/encode", content=gradient_png(1))
        tokens = first.json()["items"][0]["tokens"]
        binary = {"dtype": "uint8", "shape": [LENGTH], "data": bytes(tokens)}
        decoded = await client.post(
            "/v1/images/decode",
            content=msgpack.packb({"tokens": [binary, tokens]}),
            headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack"},
        )
    assert again.json()["items"][0] == {**first.json()["items"][0], "cached": True}
    one, two = msgpack.unpackb(decoded.content)["items"]
    assert one["data"] == two["data"] and one["media_type"] == "image/png"


async def test_a_sequence_of_another_length_is_refused_naming_the_models(repo: Path) -> None:
    async with served(settings_for(repo)) as client:
        refused = await client.post("/v1/images/decode", json={"tokens": [1] * 16})
    assert refused.json()["detail"] == (
        f"tokens: sequence [16] does not match model var-tiny's sequence [{LENGTH}] (ids)."
    )
