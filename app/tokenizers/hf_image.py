"""transformers image VQ models (Emu3, Janus; Chameleon encode-only) behind the ImageTokenizer
protocol.

Pixels arrive in [-1, 1] and are mapped to the range the checkpoint's image processor produces
(``options.pixels``: rescale, mean, std; default [-1, 1]); decoded pixels are mapped back.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch.nn import functional as F

from app.tokenizers.adapters import BadOption, PixelRange, check_options
from app.tokenizers.base import ImageInfo


def _image_info(
    vocab_size: int, image_size: tuple[int, int], downsample: int, pixels: PixelRange
) -> ImageInfo:
    return ImageInfo(
        vocab_size=vocab_size,
        image_size=image_size,
        grid=(image_size[0] // downsample, image_size[1] // downsample),
        downsample=downsample,
        extra={"pixels": pixels.to_dict()},
    )


def _image_size(value: int | list[int], downsample: int) -> tuple[int, int]:
    """``image_size``: one side or [height, width], each a multiple of the downsampling."""
    height, width = (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
    if height % downsample or width % downsample or min(height, width) < downsample:
        raise BadOption(f"image_size {value} must be a multiple of the downsampling {downsample}")
    return height, width


class Emu3Tokenizer:
    """Emu3VQVAE: an image is encoded as 4 repeated video frames -> one frame of codes [h, w]."""

    OPTIONS = ("image_size", "pixels")
    DEFAULT_IMAGE_SIZE = 512  # the Emu3 image processor's smallest area is 512 x 512

    def __init__(self, model: Any, options: dict[str, Any], device: torch.device) -> None:
        check_options(options, self.OPTIONS, "Emu3VQVAE")
        downsample = int(model.vision_spatial_factor)
        image_size = _image_size(options.get("image_size", self.DEFAULT_IMAGE_SIZE), downsample)
        self.pixels = PixelRange.from_dict(options.get("pixels", {}))
        self.model = model
        self.device = device
        self.info = _image_info(
            int(model.config.codebook_size), image_size, downsample, self.pixels
        )

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> tokens [B, H / down, W / down]."""
        sizes = torch.tensor([list(pixels.shape[-2:])] * pixels.shape[0], device=pixels.device)
        output = self.model.encode(
            self.pixels.to_model(pixels), image_sizes=sizes, return_dict=True
        )
        return torch.stack(output.image_tokens).long()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, h, w] -> pixels [B, 3, h * down, w * down] in [-1, 1]."""
        return self.pixels.from_model(self.model.decode(tokens).float())


class JanusTokenizer:
    """JanusVQVAE (LlamaGen VQ-16): a fixed num_patches x num_patches grid of cosine-nearest codes.

    Janus quantises l2-normalised latents against l2-normalised codes, and transformers' own
    ``decode`` looks codes up normalised; ``JanusVQVAE.encode`` (5.x) compares them unnormalised,
    so encoding here takes the encoder's latents and picks codes as the trained model does.
    """

    OPTIONS = ("pixels",)

    def __init__(self, model: Any, options: dict[str, Any], device: torch.device) -> None:
        check_options(options, self.OPTIONS, "JanusVQVAE")
        config = model.config
        downsample = 2 ** (len(config.channel_multiplier) - 1)
        side = int(config.num_patches) * downsample
        self.pixels = PixelRange.from_dict(options.get("pixels", {}))
        self.model = model
        self.device = device
        self.info = _image_info(int(config.num_embeddings), (side, side), downsample, self.pixels)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> tokens [B, num_patches, num_patches]."""
        latents = self.model.quant_conv(self.model.encoder(self.pixels.to_model(pixels)))
        directions = F.normalize(latents.permute(0, 2, 3, 1).float(), dim=-1)
        codebook = F.normalize(self.model.quantize.embedding.weight.float(), dim=-1)
        return (directions @ codebook.t()).argmax(dim=-1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, h, w] -> pixels [B, 3, h * down, w * down] in [-1, 1]."""
        return self.pixels.from_model(self.model.decode(tokens.flatten(1)).float())


class ChameleonTokenizer:
    """ChameleonVQVAE (Chameleon, Anole, Lumina-mGPT): an image -> a grid of nearest codes.

    transformers converted Chameleon's VQGAN encoder and quantizer but not its decoder, so the
    model is served encode-only: its tokens are what Chameleon-family LLMs read, and turning
    them back into pixels needs the original VQGAN decoder elsewhere.
    """

    OPTIONS = ("pixels",)

    def __init__(self, model: Any, options: dict[str, Any], device: torch.device) -> None:
        check_options(options, self.OPTIONS, "ChameleonVQVAE")
        config = model.config
        downsample = 2 ** (len(config.channel_multiplier) - 1)
        side = int(config.resolution)
        self.pixels = PixelRange.from_dict(options.get("pixels", {}))
        self.model = model
        self.device = device
        info = _image_info(int(config.num_embeddings), (side, side), downsample, self.pixels)
        self.info = replace(info, encode_only=True)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> tokens [B, H / down, W / down]."""
        rows, columns = self.info.grid
        output = self.model.encode(self.pixels.to_model(pixels), return_dict=True)
        return output.image_tokens.view(pixels.shape[0], rows, columns).long()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Never called: the service refuses decodes of an encode-only model."""
        raise NotImplementedError("ChameleonVQVAE has no decoder in transformers")
