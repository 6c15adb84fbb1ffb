"""The native audio codec: both backbones batch like alone; the STFT backbone's framing is exact."""

from __future__ import annotations

import pytest
import torch

from app.tokenizers.audio import RVQAudioCodec
from app.tokenizers.stftnet import Spectrum

SAMPLE_RATE = 16000
TINY_ARCHS = {
    "seanet": {"base": 4, "ratios": [2, 4, 5, 8]},
    "stft": {"hop_length": 320, "n_fft": 1280, "dim": 32, "encoder_blocks": 1, "decoder_blocks": 2},
}
LENGTHS = [3000, 8000, 5121]  # not multiples of the hop, mixed in one batch


def tiny_codec(backbone: str) -> RVQAudioCodec:
    torch.manual_seed(0)
    arch = {"latent_dim": 16, "codebooks": 3, "codebook_size": 32, **TINY_ARCHS[backbone]}
    codec = RVQAudioCodec(sample_rate=SAMPLE_RATE, backbone=backbone, **arch)
    return codec.eval()


def clips() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [0.3 * torch.randn(1, n, generator=generator) for n in LENGTHS]


def padded(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.zeros(len(waves), 1, max(w.shape[-1] for w in waves))
    for i, wave in enumerate(waves):
        batch[i, :, : wave.shape[-1]] = wave
    return batch, torch.tensor([w.shape[-1] for w in waves])


@pytest.mark.parametrize("backbone", sorted(TINY_ARCHS))
@torch.inference_mode()
def test_an_items_tokens_do_not_depend_on_its_batch_mates(backbone: str) -> None:
    codec = tiny_codec(backbone)
    tokens, frames = codec.encode(*padded(clips()))
    for i, wave in enumerate(clips()):
        alone, alone_frames = codec.encode(wave[None], torch.tensor([wave.shape[-1]]))
        assert int(frames[i]) == int(alone_frames[0]) == -(-wave.shape[-1] // codec.hop_length)
        assert torch.equal(tokens[i, :, : frames[i]], alone[0])


@pytest.mark.parametrize("backbone", sorted(TINY_ARCHS))
@torch.inference_mode()
def test_an_items_decoded_audio_does_not_depend_on_its_batch_mates(backbone: str) -> None:
    codec = tiny_codec(backbone)
    tokens, frames = codec.encode(*padded(clips()))
    waves, lengths = codec.decode(tokens, frames)
    assert lengths.tolist() == (frames * codec.hop_length).tolist()
    for i in range(len(LENGTHS)):
        alone, _ = codec.decode(tokens[i : i + 1, :, : frames[i]], frames[i : i + 1])
        torch.testing.assert_close(waves[i, :, : lengths[i]], alone[0], atol=1e-5, rtol=0)


def test_stft_framing_gives_one_frame_per_hop_and_reconstructs_the_wave_exactly() -> None:
    spectrum = Spectrum(n_fft=1280, hop=320)
    wave = torch.randn(2, 320 * 40)
    spec = spectrum.analyse(wave)
    assert spec.shape == (2, 641, 40)
    rebuilt = spectrum.synthesise(spec, torch.ones(2, 40))
    torch.testing.assert_close(rebuilt, wave, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backbone", sorted(TINY_ARCHS))
@torch.inference_mode()
def test_codec_runs_in_bfloat16_as_cuda_serving_may(backbone: str) -> None:
    codec = tiny_codec(backbone).to(torch.bfloat16)
    wave, lengths = padded(clips())
    tokens, frames = codec.encode(wave.to(torch.bfloat16), lengths)
    decoded, samples = codec.decode(tokens, frames)
    assert tokens.shape == (3, 3, 25) and decoded.shape == (3, 1, 25 * 320)
    assert torch.isfinite(decoded).all() and samples.tolist() == (frames * 320).tolist()


def test_unknown_backbone_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="'seanet' or 'stft'"):
        RVQAudioCodec(backbone="wavenet")
