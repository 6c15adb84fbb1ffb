"""The native audio codec: both backbones batch like alone; the STFT backbone's framing is exact."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from app.tokenizers import audio
from app.tokenizers.audio import RVQAudioCodec
from app.tokenizers.rvq import ResidualVQ
from app.tokenizers.stftnet import Spectrum
from app.tokenizers.wave_losses import AudioLoss

SAMPLE_RATE = 16000
TINY_ARCHS = {
    "seanet": {"base": 4, "ratios": [2, 4, 5, 8]},
    "stft": {"hop_length": 320, "n_fft": 1280, "dim": 32, "encoder_blocks": 1, "decoder_blocks": 2},
}
LENGTHS = [3000, 8000, 5121]  # not multiples of the hop, mixed in one batch


def tiny_codec(backbone: str, **refine: Any) -> RVQAudioCodec:
    torch.manual_seed(0)
    arch = {"latent_dim": 16, "codebooks": 3, "codebook_size": 32, **TINY_ARCHS[backbone]}
    codec = RVQAudioCodec(sample_rate=SAMPLE_RATE, backbone=backbone, **arch, **refine)
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


def losses_per_clip(codec: RVQAudioCodec, codebooks: int) -> list[float]:
    """The training loss of each clip's reconstruction from its first ``codebooks`` codebooks,
    encoded as the service encodes (one batch, under inference mode)."""
    loss = AudioLoss(SAMPLE_RATE, complex_stft=1.0)
    with torch.inference_mode():
        tokens, frames = codec.encode(*padded(clips()))
        waves, _ = codec.decode(tokens[:, :codebooks], frames)
    return [
        float(loss(waves[i : i + 1, :, : clip.shape[-1]], clip[None])[0])
        for i, clip in enumerate(clips())
    ]


@pytest.mark.parametrize("backbone", sorted(TINY_ARCHS))
def test_refined_codes_reconstruct_every_clip_better_from_each_searched_codebook_count(
    backbone: str,
) -> None:
    one_pass = tiny_codec(backbone)
    refined = tiny_codec(backbone, refine_steps=4, refine_codebooks=[1, 3])
    for codebooks in (1, 3):
        before, after = losses_per_clip(one_pass, codebooks), losses_per_clip(refined, codebooks)
        assert all(a < b for a, b in zip(after, before, strict=True)), (codebooks, before, after)


def test_a_clip_longer_than_a_search_window_is_refined_window_by_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(audio, "REFINE_WINDOW_FRAMES", 4)  # the 25-frame clip: 7 windows
    monkeypatch.setattr(audio, "REFINE_MARGIN_FRAMES", 2)
    before = losses_per_clip(tiny_codec("stft"), 3)
    after = losses_per_clip(tiny_codec("stft", refine_steps=4, refine_codebooks=[3]), 3)
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)


def test_a_clip_refines_to_the_same_tokens_alone_as_in_a_batch() -> None:
    # The STFT backbone, as shipped: SEANet's latents differ by float rounding (1e-7) with the
    # padded length, and the search can carry such a difference to other codes.
    codec = tiny_codec("stft", refine_steps=4)
    with torch.inference_mode():
        tokens, frames = codec.encode(*padded(clips()))
        for i, wave in enumerate(clips()):
            alone, _ = codec.encode(wave[None], torch.tensor([wave.shape[-1]]))
            assert torch.equal(tokens[i, :, : frames[i]], alone[0]), i


def test_refinement_settings_out_of_range_are_refused_with_their_values() -> None:
    with pytest.raises(ValueError, match=r"refine_codebooks \[4\] within 1\.\.3"):
        tiny_codec("stft", refine_steps=2, refine_codebooks=[4])


def test_residual_vq_codes_each_stage_as_the_nearest_entry_to_what_earlier_stages_left() -> None:
    """Against a brute-force search in float64: the golden sweep cannot show a quantizer that
    picks a near-nearest entry or subtracts a little less than it picked, because the host's
    last bits flip as many of its residual codes (see tests/test_shipped_models.py)."""
    torch.manual_seed(0)
    quantizer = ResidualVQ(codebooks=4, codebook_size=64, dim=16)
    z = torch.randn(2, 16, 50) * 0.3
    codes = quantizer.encode(z)
    vectors = z.permute(0, 2, 1).reshape(-1, 16).double()
    residual = vectors.clone()
    for k in range(quantizer.codebooks):
        distances = torch.cdist(residual, quantizer.embed[k].double())
        nearest = distances.argmin(dim=1)
        runner_up = distances.topk(2, dim=1, largest=False).values
        assert float((runner_up[:, 1] - runner_up[:, 0]).min()) > 1e-6  # no tie to round
        wrong = int((codes[:, k].reshape(-1) != nearest).sum())
        assert wrong == 0, f"codebook {k}: {wrong} of {len(nearest)} codes are not the nearest"
        residual = residual - quantizer.embed[k].double()[nearest]
    decoded = quantizer.decode(codes).permute(0, 2, 1).reshape(-1, 16).double()
    torch.testing.assert_close(decoded, vectors - residual, rtol=0, atol=1e-6)
