"""The titok backend: one-dimensional image tokens (TiTok), served from a local folder.

A small TiTok is built from titok-pytorch's own class with random weights and saved as a folder
(config.json of its arguments + model.safetensors); its tokens through the API must be the
package's own ``tokenize`` of the same pixels, a sequence of L ids, whatever they are batched
with, and they travel like grids do: decode, the cache, msgpack and npy bodies, layouts.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import msgpack
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokserve_client.layouts import LayoutError

from app.bulk import BulkOptions, run
from app.bulk.progress import Progress
from app.cli import main
from app.media import decode_image
from app.model_folder import ModelLoadError
from app.registry import ModelRegistry
from app.tokenizers.adapters import PixelRange
from tests.support import SHARED_DATA, TINY_IMAGE, served, settings_for, write_model

titok = pytest.importorskip("titok_pytorch")

SIDE, LATENTS, VOCAB = 32, 8, 64
CONFIG = {
    "dim": 32,
    "image_size": SIDE,
    "patch_size": 8,
    "num_latent_tokens": LATENTS,
    "enc_depth": 1,
    "dec_depth": 1,
    "enc_heads": 2,
    "dec_heads": 2,
    "enc_dim_head": 16,
    "dec_dim_head": 16,
    "codebook_size": VOCAB,
}
PHOTOS = sorted((SHARED_DATA / "images").glob("*.jpg"))[:3]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random TiTok saved as a folder: its arguments and its weights."""
    folder = tmp_path_factory.mktemp("titok")
    torch.manual_seed(0)
    model = titok.TiTokTokenizer(**CONFIG).eval()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors"
    )
    return folder


@pytest.fixture
def repo(checkpoint: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "tiny-titok"
    folder.mkdir(parents=True)
    config = {"backend": "titok", "modality": "image", "source": str(checkpoint)}
    (folder / "config.json").write_text(json.dumps(config))
    return tmp_path / "models"


def photo(index: int) -> bytes:
    """A photo of ../shared/data as a SIDE x SIDE PNG, so that nothing is resized."""
    with Image.open(PHOTOS[index]) as image:
        small = image.convert("RGB").resize((SIDE, SIDE))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    return buffer.getvalue()


def package_model(checkpoint: Path) -> torch.nn.Module:
    model = titok.TiTokTokenizer(**CONFIG).eval()
    model.load_state_dict(load_file(checkpoint / "model.safetensors"))
    return model


def package_tokens(checkpoint: Path, media: bytes) -> list[int]:
    """titok-pytorch's own tokenize of the pixels tokserve prepares from ``media``."""
    pixels = PixelRange().to_model(decode_image(media, (SIDE, SIDE))[None])
    return package_model(checkpoint).tokenize(pixels)[0].tolist()


async def test_a_titok_model_describes_its_tokens_as_a_sequence(repo: Path) -> None:
    async with served(settings_for(repo)) as client:
        model = (await client.get("/v1/models/tiny-titok")).json()
    assert (model["backend"], model["grid"], model["downsample"]) == ("titok", [LATENTS], 0)
    assert model["streams"] == [{"name": "sequence", "shape": [LATENTS], "vocab_size": VOCAB}]


async def test_titok_tokens_are_the_packages_own_tokenize_alone_or_batched(
    repo: Path, checkpoint: Path
) -> None:
    photos = [photo(i) for i in range(len(PHOTOS))]
    async with served(settings_for(repo, cache_max_bytes=0)) as client:
        url = "/v1/images/encode?model=tiny-titok"
        alone = [(await client.post(url, content=media)).json()["items"][0] for media in photos]
        together = await asyncio.gather(*(client.post(url, content=media) for media in photos))
    for item, media in zip(alone, photos, strict=True):
        assert item["shape"] == [LATENTS]
        assert item["tokens"] == package_tokens(checkpoint, media)
    assert [r.json()["items"][0]["tokens"] for r in together] == [i["tokens"] for i in alone]
    assert len({tuple(item["tokens"]) for item in alone}) == len(photos)  # they say something


async def test_titok_decodes_a_sequence_to_the_packages_own_reconstruction(
    repo: Path, checkpoint: Path
) -> None:
    tokens = list(range(0, VOCAB, VOCAB // LATENTS))
    async with served(settings_for(repo)) as client:
        one = await client.post("/v1/images/decode?model=tiny-titok", json={"tokens": tokens})
        two = await client.post(
            "/v1/images/decode?model=tiny-titok", json={"tokens": [tokens, [t + 1 for t in tokens]]}
        )
    served_pixels = np.asarray(Image.open(io.BytesIO(one.content)), dtype=np.int16)
    with torch.no_grad():
        own = package_model(checkpoint).codebook_ids_to_images(torch.tensor([tokens]))
    expected = PixelRange().from_model(own)[0].permute(1, 2, 0).add(1).mul(127.5).numpy()
    assert served_pixels.shape == (SIDE, SIDE, 3)
    assert np.abs(served_pixels - expected).max() <= 1  # rounding to 8 bits, either way
    first, second = (base64.b64decode(item["data"]) for item in two.json()["items"])
    assert first == one.content and second != one.content


async def test_a_sequence_of_the_wrong_length_is_refused_saying_what_the_model_takes(
    repo: Path,
) -> None:
    async with served(settings_for(repo)) as client:
        refused = await client.post("/v1/images/decode", json={"tokens": [1, 2, 3]})
        nested = await client.post("/v1/images/decode", json={"tokens": [[[1]]]})
    assert (refused.status_code, refused.json()["detail"]) == (
        422,
        f"tokens: sequence [3] does not match model tiny-titok's sequence [{LATENTS}] (ids).",
    )
    assert nested.json()["detail"] == (
        "'tokens' must be [int] (L ids) for one item, or a list of those for several "
        "(got 3 levels of nesting)."
    )


async def test_titok_tokens_come_from_the_cache_and_in_msgpack_and_npy_bodies(repo: Path) -> None:
    media = photo(0)
    async with served(settings_for(repo)) as client:
        url = "/v1/images/encode?model=tiny-titok"
        first = (await client.post(url, content=media)).json()["items"][0]
        again = (await client.post(url, content=media)).json()["items"][0]
        npy = await client.post(url, content=media, headers={"Accept": "application/x-npy"})
        binary = {
            "dtype": "uint16",
            "shape": [LATENTS],
            "data": np.array(first["tokens"], "<u2").tobytes(),
        }
        decoded = await client.post(
            "/v1/images/decode",
            content=msgpack.packb({"model": "tiny-titok", "tokens": [binary, first["tokens"]]}),
            headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack"},
        )
    assert (first["cached"], again["cached"], again["tokens"]) == (False, True, first["tokens"])
    assert np.load(io.BytesIO(npy.content)).tolist() == first["tokens"]
    items = msgpack.unpackb(decoded.content)["items"]
    assert [item["media_type"] for item in items] == ["image/png", "image/png"]
    assert items[0]["data"] == items[1]["data"]


async def test_a_layout_lays_a_sequence_out_and_decode_takes_its_span_back(
    repo: Path, tmp_path: Path
) -> None:
    text = 100
    spec = {
        "name": "seq",
        "vocab_size": text + 2 + VOCAB,
        "text_vocab_size": text,
        "markers": {"boi": text, "eoi": text + 1},
        "models": {"tiny-titok": {"begin": "boi", "end": "eoi", "offset": text + 2}},
    }
    (tmp_path / "layouts").mkdir()
    (tmp_path / "layouts" / "seq.json").write_text(json.dumps(spec))
    async with served(settings_for(repo, layout_dir=str(tmp_path / "layouts"))) as client:
        encoded = await client.post("/v1/images/encode?layout=seq", content=photo(1))
        item = encoded.json()["items"][0]
        from_ids = await client.post(
            "/v1/images/decode", json={"layout": "seq", "ids": item["ids"]}
        )
        from_tokens = await client.post("/v1/images/decode", json={"tokens": item["tokens"]})
    assert item["ids"] == [text, *(text + 2 + t for t in item["tokens"]), text + 1]
    assert from_ids.status_code == 200 and from_ids.content == from_tokens.content


def test_a_layout_ending_rows_of_a_sequence_is_refused_in_one_sentence(
    repo: Path, tmp_path: Path
) -> None:
    spec = {
        "name": "rows",
        "vocab_size": 200,
        "text_vocab_size": 100,
        "markers": {"boi": 100, "eoi": 101, "eol": 102},
        "models": {
            "tiny-titok": {"begin": "boi", "end": "eoi", "end_of_row": "eol", "offset": 103}
        },
    }
    (tmp_path / "layouts").mkdir()
    (tmp_path / "layouts" / "rows.json").write_text(json.dumps(spec))
    with pytest.raises(LayoutError) as refused:
        ModelRegistry.load(settings_for(repo, layout_dir=str(tmp_path / "layouts")))
    assert str(refused.value) == (
        "layout rows: tiny-titok's tokens are a sequence, with no row to end"
    )


def test_models_add_writes_a_titok_model_after_its_round_trip(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["models", "add", "titok-32", "--backend", "titok", "--from", str(checkpoint)]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert f"grid ({LATENTS},)" in capsys.readouterr().out
    assert json.loads((tmp_path / "titok-32" / "config.json").read_text()) == {
        "name": "titok-32",
        "backend": "titok",
        "modality": "image",
        "source": str(checkpoint),
        "options": {},
    }


def test_a_titok_folder_without_weights_is_refused_naming_the_files_it_reads(
    tmp_path: Path,
) -> None:
    source = tmp_path / "empty"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(CONFIG))
    folder = tmp_path / "models" / "lost-titok"
    folder.mkdir(parents=True)
    config = {"backend": "titok", "modality": "image", "source": str(source)}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as refused:
        ModelRegistry.load(settings_for(tmp_path / "models"))
    assert str(refused.value) == (
        f"lost-titok: {source} holds none of ['model.safetensors', 'pytorch_model.bin']"
    )


def test_bulk_shards_hold_each_images_sequence_as_the_api_answers_it(
    repo: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "photos"
    inputs.mkdir()
    for index in range(2):
        (inputs / f"{index}.png").write_bytes(photo(index))
    options = BulkOptions(
        inputs=[str(inputs)], out=tmp_path / "out", model="tiny-titok", model_dir=[str(repo)]
    )
    result = run(options, Progress(0, io.StringIO()))
    table = pq.read_table(result.out / result.manifest["shards"][0]["name"]).to_pylist()

    async def api_tokens() -> list[list[int]]:
        async with served(settings_for(repo)) as client:
            answers = [
                await client.post("/v1/images/encode", content=(inputs / row["id"]).read_bytes())
                for row in table
            ]
        return [answer.json()["items"][0]["tokens"] for answer in answers]

    assert [row["tokens"] for row in table] == asyncio.run(api_tokens())
    assert [row["shape"] for row in table] == [[LATENTS], [LATENTS]]
    manifest = json.loads((result.out / "manifest.json").read_text())
    assert manifest["grid"] == [LATENTS]
    assert manifest["streams"] == [{"name": "sequence", "shape": [LATENTS], "vocab_size": VOCAB}]


@pytest.fixture
def beside_a_grid(repo: Path) -> Path:
    """tiny-titok beside a grid model that serves image requests naming no model."""
    write_model(repo, TINY_IMAGE)
    return repo


async def test_a_body_naming_the_sequence_model_is_read_as_sequences_beside_a_grid_default(
    beside_a_grid: Path,
) -> None:
    tokens = list(range(LATENTS))
    async with served(settings_for(beside_a_grid)) as client:
        assert (await client.get("/v1/models")).json()["models"][0]["name"] == "tiny-image"
        one = await client.post("/v1/images/decode", json={"model": "tiny-titok", "tokens": tokens})
        two = await client.post(
            "/v1/images/decode", json={"model": "tiny-titok", "tokens": [tokens, tokens]}
        )
    assert (one.status_code, one.headers["content-type"]) == (200, "image/png")
    assert [item["width"] for item in two.json()["items"]] == [SIDE, SIDE]


async def test_too_many_sequences_in_msgpack_are_counted_from_headers_for_the_named_model(
    beside_a_grid: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unpack_all(*args: object, **kwargs: object) -> None:
        raise AssertionError("the body was unpacked to count its items")

    body = msgpack.packb({"model": "tiny-titok", "tokens": [list(range(LATENTS))] * 3})
    async with served(settings_for(beside_a_grid, max_items=2)) as client:
        monkeypatch.setattr(msgpack, "unpackb", unpack_all)
        refused = await client.post(
            "/v1/images/decode", content=body, headers={"Content-Type": "application/msgpack"}
        )
    assert refused.status_code == 413
    assert refused.json()["detail"].startswith("3 token items in one request")


async def test_one_binary_sequence_is_decoded_by_the_model_its_body_names(
    beside_a_grid: Path,
) -> None:
    binary = {"dtype": "uint16", "shape": [LATENTS], "data": bytes(2 * LATENTS)}
    async with served(settings_for(beside_a_grid)) as client:
        answer = await client.post(
            "/v1/images/decode",
            content=msgpack.packb({"model": "tiny-titok", "tokens": binary}),
            headers={"Content-Type": "application/msgpack"},
        )
    assert (answer.status_code, answer.headers["content-type"]) == (200, "image/png")
