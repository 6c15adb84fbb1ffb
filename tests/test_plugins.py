"""Plugin backends: a package outside tokserve adds a tokenizer through the entry-point group.

The package here is written into a temporary site folder at test time, as `pip install` would
lay it out (the module and its .dist-info with entry_points.txt), so tokserve finds it exactly
as it finds an installed one. Its tokenizer is small but real: each 8 x 8 patch's mean colour,
quantised to 4 levels per channel, is one token of 64; decoding paints the patches.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.model_folder import ModelLoadError
from app.registry import ModelRegistry
from app.tokenizers.plugins import backend_names, find_backend
from bench.server import server_process
from tests.support import REPO_ROOT, on_path, settings_for

PLUGIN = '''
"""palette: a patch-colour image tokenizer, packaged for tokserve as a plugin backend."""

import json
from pathlib import Path

import torch
from torch.nn import functional as F

from app.model_folder import ModelLoadError
from app.tokenizers.base import ImageInfo
from app.tokenizers.plugins import Backend


class PaletteTokenizer:
    def __init__(self, levels: int, image_size: int, patch: int, device: torch.device) -> None:
        self.levels, self.patch, self.device = levels, patch, device
        side = image_size // patch
        self.info = ImageInfo(
            vocab_size=levels**3,
            image_size=(image_size, image_size),
            grid=(side, side),
            downsample=patch,
        )

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        means = F.avg_pool2d(pixels.float(), self.patch)
        steps = ((means + 1) / 2 * (self.levels - 1)).round().long().clamp(0, self.levels - 1)
        red, green, blue = steps.unbind(1)
        return (red * self.levels + green) * self.levels + blue

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        red = tokens // (self.levels * self.levels)
        green = tokens // self.levels % self.levels
        blue = tokens % self.levels
        steps = torch.stack([red, green, blue], 1).float()
        pixels = steps / (self.levels - 1) * 2 - 1
        return F.interpolate(pixels, scale_factor=self.patch, mode="nearest")


def build(folder, config, device, dtype):
    source = Path(config["source"])
    try:
        palette = json.loads((source / "palette.json").read_text())
    except OSError as exc:
        raise ModelLoadError(f"{folder.name}: {exc}") from exc
    patch = int(config.get("options", {}).get("patch", 8))
    return PaletteTokenizer(palette["levels"], palette["image_size"], patch, device)


def configure(source, options):
    return {"modality": "image", "source": str(source), "options": {"patch": 8, **options}}


def palette_files(folder, config):
    return [Path(config["source"]) / "palette.json"]


BACKEND = Backend(
    build,
    weight_files=palette_files,
    configure=configure,
    summary="patch colours quantised to a palette",
)
'''


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A site folder holding the palette plugin, on this process's sys.path."""
    yield on_path(
        tmp_path, monkeypatch, "tokserve_palette", PLUGIN, "palette = tokserve_palette:BACKEND"
    )
    find_backend.cache_clear()


@pytest.fixture
def palette_source(tmp_path: Path) -> Path:
    """The plugin's local model files: 4 levels per channel, 64 x 64 images."""
    source = tmp_path / "palette-src"
    source.mkdir()
    (source / "palette.json").write_text(json.dumps({"levels": 4, "image_size": 64}))
    return source


def palette_model(root: Path, source: Path) -> Path:
    """A model repository with one palette model."""
    folder = root / "palette-64"
    folder.mkdir(parents=True)
    config = {"backend": "palette", "modality": "image", "source": str(source)}
    (folder / "config.json").write_text(json.dumps(config))
    return root


def blocks_png() -> tuple[bytes, np.ndarray]:
    """A 64 x 64 PNG of 8 x 8 blocks in palette colours, and the token grid it must give."""
    rng = np.random.default_rng(3)
    steps = rng.integers(0, 4, (8, 8, 3))
    pixels = np.repeat(np.repeat(steps * 85, 8, axis=0), 8, axis=1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue(), (steps[..., 0] * 4 + steps[..., 1]) * 4 + steps[..., 2]


def pixels_of(image: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))


def test_an_installed_plugin_is_listed_beside_tokservés_own_backends(site: Path) -> None:
    assert backend_names() == ["exported", "native", "palette", "snac", "titok", "transformers"]
    assert find_backend("palette").summary == "patch colours quantised to a palette"


def test_a_plugin_model_is_served_over_http_with_its_own_tokens(
    site: Path, palette_source: Path, tmp_path: Path
) -> None:
    repo = palette_model(tmp_path / "models", palette_source)
    png, expected = blocks_png()
    with server_process(repo, PYTHONPATH=str(site)) as (_, url):
        described = httpx.get(f"{url}/v1/models/palette-64", timeout=30).json()
        encoded = httpx.post(f"{url}/v1/images/encode", content=png, timeout=30)
        tokens = encoded.json()["items"][0]["tokens"]
        decoded = httpx.post(
            f"{url}/v1/images/decode", json={"model": "palette-64", "tokens": tokens}, timeout=30
        )
    assert (described["backend"], described["grid"], described["vocab_size"]) == (
        "palette",
        [8, 8],
        64,
    )
    assert encoded.status_code == 200, encoded.text
    assert tokens == expected.tolist()
    assert decoded.status_code == 200, decoded.text
    assert np.array_equal(pixels_of(decoded.content), pixels_of(png))


def test_a_plugin_models_version_changes_with_the_files_its_backend_names(
    site: Path, palette_source: Path, tmp_path: Path
) -> None:
    settings = settings_for(palette_model(tmp_path / "m", palette_source))
    before = ModelRegistry.load(settings).models["palette-64"].version
    (palette_source / "palette.json").write_text(json.dumps({"levels": 5, "image_size": 64}))
    after = ModelRegistry.load(settings).models["palette-64"]
    assert after.version != before
    assert after.info.vocab_size == 125


def test_models_add_writes_a_plugin_models_folder_with_its_configure(
    site: Path, palette_source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "repo"
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "models",
            "add",
            "pal",
            "--backend",
            "palette",
            "--from",
            str(palette_source),
            "--option",
            "patch=4",
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert added.returncode == 0, added.stderr
    assert json.loads((out / "pal" / "config.json").read_text()) == {
        "name": "pal",
        "backend": "palette",
        "modality": "image",
        "source": str(palette_source),
        "options": {"patch": 4},
    }
    assert "grid (16, 16)" in added.stdout
    assert "patch colours quantised to a palette" in (out / "pal" / "README.md").read_text()


def test_a_model_naming_no_installed_backend_is_refused_with_the_installed_ones(
    site: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "m" / "lost"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"backend": "xcodec2"}))
    with pytest.raises(ModelLoadError) as refused:
        ModelRegistry.load(settings_for(tmp_path / "m"))
    assert str(refused.value) == (
        "lost: unknown backend 'xcodec2'; installed: exported, native, palette, snac, titok, "
        "transformers. "
        "A backend is a package declaring it in the entry-point group 'tokserve.backends'."
    )


@pytest.mark.parametrize(
    ("module", "source", "name", "value", "problem"),
    [
        (
            "tokserve_broken",
            "import nowhere\n",
            "broken",
            "tokserve_broken:X",
            "cannot be imported from broken = tokserve_broken:X (package tokserve_broken): "
            "ModuleNotFoundError: No module named 'nowhere'",
        ),
        (
            "tokserve_odd",
            "BACKEND = object()\n",
            "odd",
            "tokserve_odd:BACKEND",
            "from odd = tokserve_odd:BACKEND (package tokserve_odd) is of type object, not an "
            "app.tokenizers.plugins.Backend",
        ),
    ],
    ids=["import-fails", "not-a-backend"],
)
def test_a_broken_plugin_is_refused_naming_its_entry_point_and_package(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    module: str,
    source: str,
    name: str,
    value: str,
    problem: str,
) -> None:
    on_path(tmp_path, monkeypatch, module, source, f"{name} = {value}")
    with pytest.raises(ModelLoadError) as refused:
        find_backend(name)
    assert str(refused.value) == f"backend {name!r} {problem}"
