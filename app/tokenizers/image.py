"""Native image tokenizer: a convolutional autoencoder with an FSQ bottleneck.

The encoder folds ``patch x patch`` pixels into channels first (pixel-unshuffle), so the
expensive residual blocks run at 1/patch resolution; each further stage halves it. The total
downsampling is ``patch * 2 ** (len(channels) - 1)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from app.tokenizers.base import ImageInfo
from app.tokenizers.fsq import FSQ
from app.tokenizers.search import search_latents


class ResBlock(nn.Module):
    """x + conv(act(conv(act(x)))), x: [B, C, H, W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(self.act(x))))


class Encoder(nn.Module):
    """pixels [B, 3, H, W] -> latents [B, D, H / down, W / down]."""

    def __init__(self, channels: list[int], res_blocks: int, patch: int, latent_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.PixelUnshuffle(patch),
            nn.Conv2d(3 * patch * patch, channels[0], 3, padding=1),
        ]
        for i, width in enumerate(channels):
            layers += [ResBlock(width) for _ in range(res_blocks)]
            if i + 1 < len(channels):
                layers += [nn.SiLU(), nn.Conv2d(width, channels[i + 1], 4, stride=2, padding=1)]
        layers += [nn.SiLU(), nn.Conv2d(channels[-1], latent_dim, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels)

    def features_and_latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the last stage's features [B, C, h, w], latents [B, D, h, w]) of pixels."""
        features = self.layers[:-1](pixels)
        return features, self.layers[-1](features)


class FeedbackEncoder(nn.Module):
    """A second look at the image after its first codes were decoded: latent corrections.

    A one-pass encoder cannot see which side of a rounding boundary its latents fall on, nor
    what the decoder makes of the codes. This module reads the image and its residual after
    decoding the first codes (at 1/patch resolution), the encoder's features, and each latent's
    bounded value and rounding offset, and adds a correction to the latents. Its last layer
    starts at zero, so an untrained one changes nothing.
    """

    def __init__(self, width: int, features: int, quantizer: FSQ, patch: int) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.image = nn.Sequential(
            nn.PixelUnshuffle(patch),
            nn.Conv2d(2 * 3 * patch * patch, width, 3, padding=1),  # image and residual, RGB
            ResBlock(width),
            nn.SiLU(),
            nn.Conv2d(width, width, 4, stride=2, padding=1),
        )
        latent_dim = quantizer.dim
        correction = nn.Conv2d(2 * width, latent_dim, 3, padding=1)
        for parameter in correction.parameters():
            nn.init.zeros_(parameter)
        self.mix = nn.Sequential(
            nn.Conv2d(width + features + 2 * latent_dim, 2 * width, 3, padding=1),
            ResBlock(2 * width),
            ResBlock(2 * width),
            nn.SiLU(),
            correction,
        )

    def forward(
        self,
        pixels: torch.Tensor,
        recon: torch.Tensor,
        features: torch.Tensor,
        latents: torch.Tensor,
    ) -> torch.Tensor:
        """Corrected latents [B, D, h, w] from pixels and their first reconstruction
        [B, 3, H, W], the encoder's features [B, C, h, w] and its latents [B, D, h, w]."""
        bounded = self.quantizer.bound(latents)
        offset = torch.round(bounded) - bounded
        seen = self.image(torch.cat([pixels, pixels - recon], dim=1))
        half_width = (max(self.quantizer.levels) - 1) / 2
        inputs = [seen, features, (bounded / half_width).to(seen.dtype), offset.to(seen.dtype)]
        return latents + self.mix(torch.cat(inputs, dim=1))


class Decoder(nn.Module):
    """latents [B, D, h, w] -> pixels [B, 3, h * down, w * down] (unbounded; clamp to [-1, 1])."""

    def __init__(self, channels: list[int], res_blocks: int, patch: int, latent_dim: int) -> None:
        super().__init__()
        widths = channels[::-1]
        layers: list[nn.Module] = [nn.Conv2d(latent_dim, widths[0], 3, padding=1)]
        for i, width in enumerate(widths):
            layers += [ResBlock(width) for _ in range(res_blocks)]
            if i + 1 < len(widths):
                layers += [
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(width, widths[i + 1], 3, padding=1),
                ]
        layers += [
            nn.SiLU(),
            nn.Conv2d(widths[-1], 3 * patch * patch, 3, padding=1),
            nn.PixelShuffle(patch),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.layers(latents)


class FSQImageTokenizer(nn.Module):
    """Native image tokenizer implementing the ImageTokenizer protocol."""

    def __init__(
        self,
        image_size: int = 256,
        channels: tuple[int, ...] | list[int] = (64, 128),
        res_blocks: int = 2,
        patch: int = 4,
        levels: tuple[int, ...] | list[int] = (8, 8, 8, 5, 5, 5),
        refine_steps: int = 0,
        refine_lr: float = 0.025,
        feedback_width: int = 0,
        feedback_steps: int = 1,
    ) -> None:
        super().__init__()
        if refine_steps < 0 or refine_lr <= 0:
            raise ValueError(f"refine_steps {refine_steps} must be >= 0, refine_lr {refine_lr} > 0")
        if feedback_steps < 1:
            raise ValueError(f"feedback_steps {feedback_steps} must be >= 1")
        self.image_size = image_size
        self.feedback_steps = feedback_steps
        self.refine_steps = refine_steps
        self.refine_lr = refine_lr
        self.downsample = patch * 2 ** (len(channels) - 1)
        if image_size % self.downsample:
            raise ValueError(f"image_size {image_size} is not a multiple of {self.downsample}")
        self.quantizer = FSQ(list(levels))
        self.encoder = Encoder(list(channels), res_blocks, patch, self.quantizer.dim)
        self.decoder = Decoder(list(channels), res_blocks, patch, self.quantizer.dim)
        self.feedback = (
            FeedbackEncoder(feedback_width, channels[-1], self.quantizer, patch)
            if feedback_width
            else None
        )

    @classmethod
    def from_config(cls, arch: dict[str, Any]) -> FSQImageTokenizer:
        return cls(**arch)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def info(self) -> ImageInfo:
        side = self.image_size // self.downsample
        return ImageInfo(
            vocab_size=self.quantizer.vocab_size,
            image_size=(self.image_size, self.image_size),
            grid=(side, side),
            downsample=self.downsample,
            extra={
                "quantizer": "fsq",
                "levels": self.quantizer.levels,
                "refine_steps": self.refine_steps,
                "feedback_steps": self.feedback_steps if self.feedback is not None else 0,
            },
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Training path: reconstruction of pixels [B, 3, H, W] through the quantizer."""
        return self.decoder(self.quantizer(self.latents(pixels)))

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] -> latents [B, D, h, w]: the encoder's, corrected by the
        feedback pass (when the model has one) ``feedback_steps`` times, each after decoding
        the current latents; the same weights serve every step."""
        if self.feedback is None:
            return self.encoder(pixels)
        features, latents = self.encoder.features_and_latents(pixels)
        for _ in range(self.feedback_steps):
            recon = self.decoder(self.quantizer(latents).to(features.dtype)).clamp(-1, 1)
            latents = self.feedback(pixels, recon.to(pixels.dtype), features, latents)
        return latents

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> tokens [B, H / down, W / down]."""
        latents = self.latents(pixels)
        if self.refine_steps:
            latents = self.refine(latents, pixels)
        return self.quantizer.encode(latents)

    def refine(self, latents: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """Latents [B, D, h, w] searched (``search_latents``) for codes that decode closer to
        ``pixels`` in mean squared error (the model card gives what it gains). Weights are
        untouched."""
        dtype = next(self.decoder.parameters()).dtype

        def error(current: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            recon = self.decoder(self.quantizer(current).to(dtype)).float().clamp(-1, 1)
            return (recon - target).square().flatten(1).mean(dim=1)

        return search_latents(latents, pixels, error, self.refine_steps, self.refine_lr)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, h, w] -> pixels [B, 3, h * down, w * down] in [-1, 1]."""
        latents = self.quantizer.decode(tokens).to(next(self.decoder.parameters()).dtype)
        return self.decoder(latents).clamp(-1, 1)
