"""The ``titok`` backend: TiTok one-dimensional image tokenizers, through ``titok-pytorch``.

TiTok ("An Image is Worth 32 Tokens", Yu et al. 2024) reads an image's patches together with a
few learned latent tokens through a ViT and quantises only the latents: an image becomes a
sequence of L ids (32 in the paper) that are no place in the image (``ImageInfo.grid`` is
``(L,)``). Decoding fills mask tokens for every patch from the latents' codes.

The model folder's ``source`` holds ``config.json`` (``TiTokTokenizer``'s keyword arguments:
dim, image_size, patch_size, num_latent_tokens, codebook_size, ...) and its state dict as
``model.safetensors`` or ``pytorch_model.bin``; ``options.pixels`` is the input range it was
trained on (default [-1, 1]). Each image attends only to itself, so items share batches freely.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from app.model_folder import ModelLoadError, source_of
from app.tokenizers.adapters import BadOption, PixelRange, check_options, load_package_model
from app.tokenizers.base import ImageInfo, Tokenizer
from app.tokenizers.plugins import Backend

TITOK_HINT = "pip install 'tokserve[titok]'"
OPTIONS = ("pixels",)


class TiTokImageTokenizer:
    """A loaded ``titok_pytorch.TiTokTokenizer`` behind the ImageTokenizer protocol."""

    def __init__(self, model: Any, options: dict[str, Any], device: torch.device) -> None:
        check_options(options, OPTIONS, "titok")
        side = int(model.image_size)
        self.model = model
        self.device = device
        self.pixels = PixelRange.from_dict(options.get("pixels", {}))
        self.info = ImageInfo(
            vocab_size=int(model.vq.codebook_size),
            image_size=(side, side),
            grid=(int(model.latents.shape[0]),),
            downsample=0,
            extra={"pixels": self.pixels.to_dict()},
        )

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> tokens [B, L]."""
        return self.model.tokenize(self.pixels.to_model(pixels)).long()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] -> pixels [B, 3, H, W] in [-1, 1]."""
        return self.pixels.from_model(self.model.codebook_ids_to_images(tokens).float())


def load_titok(name: str, source: Path) -> Any:
    """``titok_pytorch.TiTokTokenizer`` from the folder's config.json and weights, never a hub."""
    try:
        from titok_pytorch import TiTokTokenizer
    except ImportError as exc:
        raise ModelLoadError(
            f"{name}: the titok backend needs the 'titok-pytorch' package: {TITOK_HINT}"
        ) from exc
    return load_package_model(name, source, TiTokTokenizer)


def build(
    folder: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> Tokenizer:
    """The TiTok model in the folder ``source`` names, on ``device``."""
    name = folder.name
    source = source_of(folder, config)
    if source is None:
        raise ModelLoadError(f"{name}: config.json needs 'source', the TiTok checkpoint's folder")
    model = load_titok(name, source).to(device=device, dtype=dtype).eval()
    try:
        return TiTokImageTokenizer(model, config.get("options", {}), device)
    except BadOption as exc:
        raise ModelLoadError(f"{name}: {exc}") from exc


def configure(source: Path, options: dict[str, Any]) -> dict[str, Any]:
    """config.json of ``tokserve models add NAME --backend titok --from SOURCE``."""
    return {"modality": "image", "source": str(source), "options": options}


BACKEND = Backend(
    build,
    configure=configure,
    summary="TiTok one-dimensional image tokenizers (titok-pytorch): L ids per image",
)
