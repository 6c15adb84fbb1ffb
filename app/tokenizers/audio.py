"""Native audio codec: an encoder/decoder pair around a residual vector quantizer.

Two backbones: ``seanet`` (EnCodec-style strided convolutions at the sample rate) and ``stft``
(Vocos-style ConvNeXt at the frame rate, inverse STFT out), chosen by ``arch["backbone"]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from app.tokenizers.base import AudioInfo
from app.tokenizers.rvq import ResidualVQ
from app.tokenizers.seanet import SEANetDecoder, SEANetEncoder
from app.tokenizers.search import ErrorFn, search_latents
from app.tokenizers.stftnet import STFTDecoder, STFTEncoder
from app.tokenizers.wave_losses import AudioLoss

# Encode-time search (RVQAudioCodec.refine) in windows of 10 s at 75 frames/s, each decoded with
# 0.32 s of context on either side, more than the decoder reaches (6 blocks of kernel 7 and the
# inverse STFT's overlap: about 20 frames).
REFINE_WINDOW_FRAMES = 750
REFINE_MARGIN_FRAMES = 24
# The search's loss takes STFTs of up to 2048 points: shorter audio is zero-padded to that.
REFINE_MIN_SAMPLES = 2048


def pad_to_fft(wave: torch.Tensor) -> torch.Tensor:
    """wave [B, C, T] zero-padded on the right to at least ``REFINE_MIN_SAMPLES``."""
    return nn.functional.pad(wave, (0, max(0, REFINE_MIN_SAMPLES - wave.shape[-1])))


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
        refine_steps: int = 0,
        refine_lr: float = 0.2,
        refine_codebooks: tuple[int, ...] | list[int] | None = None,
    ) -> None:
        """``seanet`` reads base and ratios (hop = prod(ratios)); ``stft`` reads hop_length, n_fft,
        dim and the block counts. ``refine_steps`` > 0 searches the codes at encode time (see
        ``refine``) for the reconstructions from each of ``refine_codebooks`` codebooks
        (default: half of them and all)."""
        super().__init__()
        self.refine_steps = refine_steps
        self.refine_lr = refine_lr
        self.refine_codebooks = list(
            refine_codebooks or sorted({max(1, codebooks // 2), codebooks})
        )
        if (
            refine_steps < 0
            or refine_lr <= 0
            or not all(0 < k <= codebooks for k in self.refine_codebooks)
        ):
            raise ValueError(
                f"refine_steps {refine_steps} must be >= 0, refine_lr {refine_lr} > 0 and "
                f"refine_codebooks {self.refine_codebooks} within 1..{codebooks}"
            )
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
    def info(self) -> AudioInfo:
        return AudioInfo(
            vocab_size=self.quantizer.codebook_size,
            codebooks=self.quantizer.codebooks,
            sample_rate=self.sample_rate,
            channels=self.channels,
            hop_length=self.hop_length,
            frame_rate=self.sample_rate / self.hop_length,
            extra={"quantizer": "rvq", "refine_steps": self.refine_steps},
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
        """wave [B, C, T], lengths [B] -> tokens [B, n_q, F], frames [B].

        A searching codec encodes each item alone: the search amplifies the last bits of the
        latents, which a batched convolution rounds differently from a lone one, so an item's
        codes would depend on the batch it shared."""
        if self.refine_steps:
            return self._encode_each(wave, lengths, n_q)
        latents = self.encoder(self.pad_to_hop(wave), lengths)
        return self.quantizer.encode(latents, n_q), self.frames_for(lengths)

    def _encode_each(
        self, wave: torch.Tensor, lengths: torch.Tensor, n_q: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode`` with the search, one item at a time; frames past an item's end are 0."""
        frames = self.frames_for(lengths)
        rows = n_q or self.quantizer.codebooks
        tokens = torch.zeros(len(wave), rows, int(frames.max()), dtype=torch.long)
        for item, length in enumerate(lengths.tolist()):
            alone = wave[item : item + 1, :, :length]
            own_length = lengths[item : item + 1]
            latents = self.encoder(self.pad_to_hop(alone), own_length)
            codes = self.quantizer.encode(self.refine(latents, alone, own_length), n_q)
            tokens[item, :, : codes.shape[-1]] = codes[0].cpu()
        return tokens.to(wave.device), frames

    def refine(
        self, latents: torch.Tensor, wave: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Latents [B, D, F] searched (``search_latents``) for codes whose reconstructions from
        each of ``refine_codebooks`` codebooks are closer to ``wave`` by the training loss.

        Items are searched one at a time, in windows of ``REFINE_WINDOW_FRAMES`` frames decoded
        with ``REFINE_MARGIN_FRAMES`` of their (fixed) neighbours on each side, so memory stays
        that of one window however long the audio (the model card gives what it gains). Weights
        are untouched.
        """
        with torch.inference_mode(False):  # its mel filters must be able to enter autograd
            loss = AudioLoss(self.sample_rate, complex_stft=1.0).to(latents.device)
        refined = latents.float().clone()
        for item, (length, frames) in enumerate(
            zip(lengths.tolist(), self.frames_for(lengths).tolist(), strict=True)
        ):
            for start in range(0, frames, REFINE_WINDOW_FRAMES):
                stop = min(frames, start + REFINE_WINDOW_FRAMES)
                low = max(0, start - REFINE_MARGIN_FRAMES)
                high = min(frames, stop + REFINE_MARGIN_FRAMES)
                # the loss covers the margins too: the window's codes reach into them
                audio = wave[item : item + 1, :, low * self.hop_length : high * self.hop_length]
                audio = audio[..., : max(0, length - low * self.hop_length)]
                context = refined[item : item + 1, :, low:high]
                error = self._window_error(context, start - low, audio.shape[-1], loss)
                target = pad_to_fft(audio)
                refined[item : item + 1, :, start:stop] = search_latents(
                    refined[item : item + 1, :, start:stop],
                    target,
                    error,
                    self.refine_steps,
                    self.refine_lr,
                )
        return refined

    def _window_error(
        self, context: torch.Tensor, offset: int, samples: int, loss: AudioLoss
    ) -> ErrorFn:
        """The loss of a window's latents [1, D, w] placed at ``offset`` in the frames of
        ``context`` [1, D, n] (its neighbours, held fixed), summed over ``refine_codebooks``:
        the first ``samples`` decoded samples (the audio's own) against ``target``'s, both
        zero-padded to at least ``REFINE_MIN_SAMPLES``."""
        dtype = next(self.decoder.parameters()).dtype

        def error(window: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            around = context.clone()  # a normal tensor even if the context is an inference one
            placed = torch.cat(
                [around[..., :offset], window, around[..., offset + window.shape[-1] :]], dim=-1
            )
            frames = torch.tensor([placed.shape[-1]], device=placed.device)
            total = placed.new_zeros(1)
            for n_q in self.refine_codebooks:
                quantized = self.quantizer.straight_through(placed, n_q).to(dtype)
                recon = self.decoder(quantized, frames).float()[..., :samples]
                total = total + loss(pad_to_fft(recon), target)[0]
            return total

        return error

    def decode(
        self, tokens: torch.Tensor, frames: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, k, F] (k <= K), frames [B] -> wave [B, C, F * hop], lengths [B] samples."""
        latents = self.quantizer.decode(tokens).to(next(self.decoder.parameters()).dtype)
        wave = self.decoder(latents, frames).clamp(-1, 1)
        return wave, frames * self.hop_length
