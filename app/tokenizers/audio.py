"""Native audio codec: an encoder/decoder pair around a residual vector quantizer.

Two backbones: ``seanet`` (EnCodec-style strided convolutions at the sample rate) and ``stft``
(Vocos-style ConvNeXt at the frame rate, inverse STFT out), chosen by ``arch["backbone"]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from app.tokenizers.base import TokenizerInfo
from app.tokenizers.rvq import ResidualVQ
from app.tokenizers.seanet import SEANetDecoder, SEANetEncoder
from app.tokenizers.stftnet import STFTDecoder, STFTEncoder


class RVQAudioCodec(nn.Module):
    """Native audio codec implementing the AudioTokenizer protocol."""

    def __init__(
        self,
        sample_rate: int = 24000,
        channels: int = 1,
        base: int = 16,
        ratios: tuple[int, ...] | list[int] = (2, 4, 5, 8),
        latent_dim: int = 128,
        codebooks: int = 8,
        codebook_size: int = 1024,
        backbone: str = "seanet",
        hop_length: int = 320,
        n_fft: int = 1280,
        dim: int = 256,
        encoder_blocks: int = 2,
        decoder_blocks: int = 6,
    ) -> None:
        """``seanet`` reads base and ratios (hop = prod(ratios)); ``stft`` reads hop_length, n_fft,
        dim and the block counts."""
        super().__init__()
        self.sample_rate = sample_rate
        self.channels = channels
        self.encoder: nn.Module
        self.decoder: nn.Module
        if backbone == "seanet":
            self.hop_length = math.prod(ratios)
            self.encoder = SEANetEncoder(channels, base, tuple(ratios), latent_dim)
            self.decoder = SEANetDecoder(channels, base, tuple(ratios), latent_dim)
        elif backbone == "stft":
            self.hop_length = hop_length
            shape = (channels, hop_length, n_fft, dim)
            self.encoder = STFTEncoder(*shape, encoder_blocks, latent_dim)
            self.decoder = STFTDecoder(*shape, decoder_blocks, latent_dim)
        else:
            raise ValueError(f"unknown audio backbone {backbone!r}; expected 'seanet' or 'stft'")
        self.quantizer = ResidualVQ(codebooks, codebook_size, latent_dim)

    @classmethod
    def from_config(cls, arch: dict[str, Any]) -> RVQAudioCodec:
        return cls(**arch)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def info(self) -> TokenizerInfo:
        return TokenizerInfo(
            modality="audio",
            vocab_size=self.quantizer.codebook_size,
            codebooks=self.quantizer.codebooks,
            sample_rate=self.sample_rate,
            channels=self.channels,
            hop_length=self.hop_length,
            frame_rate=self.sample_rate / self.hop_length,
            extra={"quantizer": "rvq"},
        )

    def frames_for(self, lengths: torch.Tensor) -> torch.Tensor:
        """[B] samples -> [B] frames = ceil(samples / hop)."""
        return torch.div(lengths + self.hop_length - 1, self.hop_length, rounding_mode="floor")

    def pad_to_hop(self, wave: torch.Tensor) -> torch.Tensor:
        """wave [B, C, T] zero-padded on the right to a multiple of the hop."""
        extra = -wave.shape[-1] % self.hop_length
        return nn.functional.pad(wave, (0, extra)) if extra else wave

    def encode(
        self, wave: torch.Tensor, lengths: torch.Tensor, n_q: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """wave [B, C, T], lengths [B] -> tokens [B, n_q, F], frames [B]."""
        latents = self.encoder(self.pad_to_hop(wave), lengths)
        return self.quantizer.encode(latents, n_q), self.frames_for(lengths)

    def decode(
        self, tokens: torch.Tensor, frames: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, k, F] (k <= K), frames [B] -> wave [B, C, F * hop], lengths [B] samples."""
        latents = self.quantizer.decode(tokens).to(next(self.decoder.parameters()).dtype)
        wave = self.decoder(latents, frames).clamp(-1, 1)
        return wave, frames * self.hop_length
