"""Training and evaluation tools on tiny configs and synthetic media (fast, CPU)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from app.tokenizers.fsq import FSQ
from app.tokenizers.native import NATIVE_ARCHITECTURES
from app.train import trainer as trainer_module
from app.train.codecs import opus_at_bitrate
from app.train.config import TrainConfig
from app.train.data import (
    AUDIO_SUFFIXES,
    IMAGE_SUFFIXES,
    AudioSegments,
    ImageCrops,
    split_files,
)
from app.train.evaluate import evaluate_model
from app.train.losses import ImageLoss
from app.train.pack import pack_audio, pack_images
from app.train.trainer import BUDGET_PROBE_STEPS, BUDGET_WARMUP_STEPS, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLE_RATE = 8000
CONFIGS = Path(__file__).resolve().parent.parent / "app" / "train" / "configs"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A miniature copy of the shared data layout: smooth images, voiced and tonal clips."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    y, x = np.mgrid[0:80, 0:96] / 40.0
    for i in range(12):
        phase = rng.uniform(0, 6, size=3)
        rgb = np.stack([np.sin(x * (c + 1) + y * (i % 3) + phase[c]) for c in range(3)], axis=-1)
        Image.fromarray(((rgb + 1) * 127.5).astype(np.uint8)).save(root / "images" / f"img-{i}.png")
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    for group, base_hz in (("speech", 140.0), ("music", 330.0)):
        (root / "audio" / group).mkdir(parents=True)
        for i in range(10):
            pitch = base_hz * (1 + 0.1 * i) * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))
            voiced = sum(
                np.sin(2 * np.pi * np.cumsum(pitch * h) / SAMPLE_RATE) / h for h in (1, 2, 3)
            )
            envelope = 0.5 * (1 - np.cos(2 * np.pi * 4 * t)) * 0.3
            wave = (voiced * envelope + 0.003 * rng.standard_normal(t.size)).astype(np.float32)
            sf.write(root / "audio" / group / f"{group}-{i}.wav", wave, SAMPLE_RATE)
    return root


def image_config(**overrides: object) -> TrainConfig:
    values: dict[str, object] = {
        "name": "tiny-image",
        "modality": "image",
        "architecture": "fsq_image",
        "arch": {
            "image_size": 32,
            "channels": [8, 16],
            "res_blocks": 1,
            "patch": 2,
            "levels": [5, 5, 5],
        },
        "data": {"crop": 32, "short_side": [48, 64]},
        "loss": {"l1": 1.0, "mse": 1.0, "msssim": 0.0},
        "batch_size": 4,
        "steps": 30,
        "lr": 3e-3,
        "warmup_steps": 2,
        "ema_decay": 0.9,
    }
    return TrainConfig.from_dict({**values, **overrides})


def audio_config(**overrides: object) -> TrainConfig:
    values: dict[str, object] = {
        "name": "tiny-audio",
        "modality": "audio",
        "architecture": "rvq_audio",
        "arch": {
            "sample_rate": SAMPLE_RATE,
            "base": 4,
            "ratios": [2, 4],
            "latent_dim": 8,
            "codebooks": 2,
            "codebook_size": 16,
        },
        "data": {"segment_s": 0.25},
        "quantizer": {"dropout": 0.5},
        "batch_size": 2,
        "steps": 4,
        "lr": 1e-3,
        "warmup_steps": 1,
    }
    return TrainConfig.from_dict({**values, **overrides})


def test_training_steps_lower_the_image_loss_on_a_fixed_batch(
    data_dir: Path, tmp_path: Path
) -> None:
    trainer = Trainer(image_config(), data_dir, tmp_path / "model", tmp_path / "run")
    batch = trainer.task.sampler.batch(8)
    with torch.no_grad():
        before = float(trainer.task.loss(batch)[0])
    for _ in range(30):
        trainer.train_step()
    with torch.no_grad():
        after = float(trainer.task.loss(batch)[0])
    assert after < 0.7 * before


@pytest.mark.parametrize("computes_in_bfloat16", [True, False])
def test_cpu_training_runs_in_bfloat16_only_where_the_cpu_computes_in_it(
    computes_in_bfloat16: bool, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trainer_module, "cpu_runs_bfloat16", lambda: computes_in_bfloat16)
    trainer = Trainer(image_config(), data_dir, tmp_path / "model", tmp_path / "run")
    batch = trainer.task.sampler.batch(2)
    with trainer.autocast():
        recon = trainer.model(batch)
    assert recon.dtype == (torch.bfloat16 if computes_in_bfloat16 else torch.float32)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda path: path.stem)
def test_each_shipped_training_config_parses_and_builds_its_model(path: Path) -> None:
    config = TrainConfig.load(path)
    model = NATIVE_ARCHITECTURES[config.architecture](config.arch)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_log_mse_is_the_mean_over_images_of_log10_of_each_images_mse() -> None:
    target = torch.zeros(2, 3, 8, 8)
    recon = torch.stack([torch.full((3, 8, 8), 0.1), torch.full((3, 8, 8), 0.01)])
    _, parts = ImageLoss(l1=0.0, mse=0.0, msssim=0.0, log_mse=1.0)(recon, target)
    # MSEs 1e-2 and 1e-4 (plus the 1e-5 floor): not log10 of their mean, -2.3
    assert parts["log_mse"] == pytest.approx((np.log10(1.001e-2) + np.log10(1.1e-4)) / 2, abs=1e-4)


def test_log_mse_gives_a_smooth_image_the_gradient_a_detailed_one_gets_from_mse() -> None:
    target = torch.zeros(2, 3, 8, 8)
    recon = torch.stack([torch.full((3, 8, 8), 0.3), torch.full((3, 8, 8), 0.01)])
    grads = {}
    for name, weights in {"mse": {"mse": 1.0}, "log_mse": {"mse": 0.0, "log_mse": 1.0}}.items():
        pixels = recon.clone().requires_grad_()
        ImageLoss(l1=0.0, msssim=0.0, **weights)(pixels, target)[0].backward()
        assert pixels.grad is not None
        grads[name] = pixels.grad.flatten(1).norm(dim=1)
    assert grads["mse"][1] < 0.05 * grads["mse"][0]  # MSE: the smooth image barely counts
    assert grads["log_mse"][1] > 5 * grads["log_mse"][0]  # log-MSE: it counts more


def latents_at(quantizer: FSQ, digits: torch.Tensor) -> torch.Tensor:
    """Pre-quantizer latents [1, D, N] that the quantizer rounds to ``digits`` [D, N] exactly."""
    levels = torch.tensor(quantizer.levels, dtype=torch.float64)[:, None]
    half = (levels - 1) * (1 + quantizer.eps) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    bounded = digits - levels // 2  # the level each digit stands for
    return (torch.atanh((bounded + offset) / half) - torch.atanh(offset / half)).float()[None]


def test_collision_entropy_gap_is_near_log2_vocab_for_one_code_and_small_for_spread_codes() -> None:
    quantizer = FSQ([8, 8, 8, 5, 5, 5])
    generator = torch.Generator().manual_seed(0)
    codes = torch.randperm(quantizer.vocab_size, generator=generator)[:1024]
    basis = np.cumprod([1, *quantizer.levels[:-1]])
    digits = torch.stack(
        [(codes // int(b)) % n for b, n in zip(basis, quantizer.levels, strict=True)]
    )
    assert torch.equal(quantizer.encode(latents_at(quantizer, digits))[0], codes)
    one_code = latents_at(quantizer, digits[:, :1].expand(-1, 1024))
    vocab_bits = math.log2(quantizer.vocab_size)
    assert quantizer.collision_entropy_gap(one_code) > vocab_bits - 1
    assert quantizer.collision_entropy_gap(latents_at(quantizer, digits)) < 1


def test_training_with_the_entropy_term_uses_more_codes_than_without(
    data_dir: Path, tmp_path: Path
) -> None:
    held_out = split_files(data_dir / "images", IMAGE_SUFFIXES, 0.1, validation=True)
    crops = ImageCrops(held_out, 32, (48, 64), random.Random(1)).batch(8)
    used = {}
    for weight in (0.0, 1.0):
        config = image_config(quantizer={"entropy": weight})
        trainer = Trainer(config, data_dir, tmp_path / f"model{weight}", tmp_path / f"run{weight}")
        for _ in range(30):
            trainer.train_step()
        with torch.no_grad():
            used[weight] = len(trainer.task.model.encode(crops).unique())
    assert used[1.0] > 1.5 * used[0.0]


def test_training_steps_lower_the_stft_codec_loss_on_a_fixed_batch(
    data_dir: Path, tmp_path: Path
) -> None:
    stft = {
        "backbone": "stft",
        "sample_rate": SAMPLE_RATE,
        "hop_length": 80,
        "n_fft": 320,
        "dim": 32,
        "encoder_blocks": 1,
        "decoder_blocks": 2,
        "latent_dim": 8,
        "codebooks": 2,
        "codebook_size": 16,
    }
    loss = {"stft": 1.0, "mel": 1.0, "wave_l1": 1.0, "complex_stft": 1.0}
    config = audio_config(arch=stft, loss=loss, steps=40, lr=3e-3, quantizer={"dropout": 0.0})
    trainer = Trainer(config, data_dir, tmp_path / "model", tmp_path / "run")
    batch = trainer.task.sampler.batch(4)
    with torch.no_grad():
        before, parts = trainer.task.loss(batch)
    assert set(parts) == {"stft", "mel", "wave_l1", "complex", "commit"}
    for _ in range(40):
        trainer.train_step()
    with torch.no_grad():
        after = float(trainer.task.loss(batch)[0])
    assert after < 0.7 * float(before)


def test_a_frozen_encoder_keeps_every_image_token_while_the_decoder_learns(
    data_dir: Path, tmp_path: Path
) -> None:
    trainer = Trainer(
        image_config(freeze=["encoder"]), data_dir, tmp_path / "model", tmp_path / "run"
    )
    batch = trainer.task.sampler.batch(8)
    with torch.no_grad():
        tokens = trainer.ema.model.encode(batch)
        before = float(trainer.task.loss(batch)[0])
    for _ in range(30):
        trainer.train_step()
    with torch.no_grad():
        assert torch.equal(trainer.ema.model.encode(batch), tokens)
        assert torch.equal(trainer.model.encode(batch), tokens)
        assert float(trainer.task.loss(batch)[0]) < 0.95 * before


def test_a_feedback_pass_warm_starts_from_a_trained_tokenizer_and_learns_alone(
    data_dir: Path, tmp_path: Path
) -> None:
    plain = Trainer(image_config(), data_dir, tmp_path / "plain", tmp_path / "plain-run")
    for _ in range(10):
        plain.train_step()
    plain.save()
    arch = {**image_config().arch, "feedback_width": 4}
    config = image_config(arch=arch, freeze=["encoder", "decoder"], lr=1e-3)
    trainer = Trainer(config, data_dir, tmp_path / "feedback", tmp_path / "feedback-run")
    trainer.warm_start(tmp_path / "plain")
    batch = trainer.task.sampler.batch(8)
    with torch.no_grad():
        assert torch.equal(trainer.model.encode(batch), plain.ema.model.encode(batch))
        before = float(trainer.task.loss(batch)[0])
    for _ in range(30):
        trainer.train_step()
    with torch.no_grad():
        assert float(trainer.task.loss(batch)[0]) < before
    weights = plain.ema.model.state_dict()
    for name, tensor in trainer.model.state_dict().items():
        assert name.startswith("feedback.") or torch.equal(tensor, weights[name]), name


def test_warm_start_from_a_folder_with_a_source_takes_the_sources_weights(
    data_dir: Path, tmp_path: Path
) -> None:
    trained = Trainer(image_config(), data_dir, tmp_path / "plain", tmp_path / "plain-run")
    for _ in range(3):
        trained.train_step()
    trained.save()
    searching = tmp_path / "plain-hq"
    searching.mkdir()
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    (searching / "config.json").write_text(json.dumps({**config, "source": "../plain"}))
    trainer = Trainer(image_config(), data_dir, tmp_path / "next", tmp_path / "next-run")
    trainer.warm_start(searching)
    exported = trained.ema.model.state_dict()
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, exported[name]), name


def test_a_frozen_encoder_and_quantizer_keep_every_audio_token(
    data_dir: Path, tmp_path: Path
) -> None:
    config = audio_config(freeze=["encoder", "quantizer"], steps=10)
    trainer = Trainer(config, data_dir, tmp_path / "model", tmp_path / "run")
    wave = trainer.task.sampler.batch(4)
    lengths = torch.full((4,), wave.shape[-1])
    decoder = [p.detach().clone() for p in trainer.model.decoder.parameters()]
    with torch.no_grad():
        tokens, _ = trainer.ema.model.encode(wave, lengths)
    for _ in range(10):
        trainer.train_step()
    with torch.no_grad():
        assert torch.equal(trainer.ema.model.encode(wave, lengths)[0], tokens)
    after = trainer.model.decoder.parameters()
    assert any(not torch.equal(a, b) for a, b in zip(decoder, after, strict=True))


def test_freezing_an_unknown_part_names_the_parts(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'decoder', 'encoder', 'quantizer'"):
        Trainer(image_config(freeze=["encodr"]), data_dir, tmp_path / "model", tmp_path / "run")


def test_audio_segments_come_from_the_groups_in_their_weighted_shares(data_dir: Path) -> None:
    groups = [sorted((data_dir / "audio" / g).iterdir()) for g in ("speech", "music")]
    segments = AudioSegments(groups, SAMPLE_RATE, 0.25, random.Random(0), weights=[3.0, 1.0])
    picks = [segments.pick(segments.rng)[0] for _ in range(4000)]
    speech_share = sum(p.parent.name == "speech" for p in picks) / len(picks)
    assert 0.72 < speech_share < 0.78


def test_image_batches_are_the_same_for_any_number_of_workers(data_dir: Path) -> None:
    files = sorted((data_dir / "images").iterdir())
    one, four = (ImageCrops(files, 32, (48, 80), random.Random(7), workers=n) for n in (1, 4))
    for _ in range(3):
        batch = one.batch(8)
        assert batch.shape == (8, 3, 32, 32)
        assert torch.equal(batch, four.batch(8))


def test_audio_batches_are_the_same_for_any_number_of_workers(data_dir: Path) -> None:
    groups = [sorted((data_dir / "audio" / g).iterdir()) for g in ("speech", "music")]
    one, four = (
        AudioSegments(groups, SAMPLE_RATE, 0.25, random.Random(7), workers=n) for n in (1, 4)
    )
    for _ in range(3):
        batch = one.batch(8)
        assert batch.shape == (8, 1, SAMPLE_RATE // 4)
        assert torch.equal(batch, four.batch(8))


def test_audio_group_weights_must_match_the_groups(data_dir: Path) -> None:
    groups = [sorted((data_dir / "audio" / "speech").iterdir())]
    with pytest.raises(ValueError, match="2 group weights for 1 groups"):
        AudioSegments(groups, SAMPLE_RATE, 0.25, random.Random(0), weights=[3.0, 1.0])


def test_a_minutes_budget_fits_the_cosine_length_from_the_measured_step_rate(
    data_dir: Path, tmp_path: Path
) -> None:
    config = image_config(steps=10**9, checkpoint_minutes=60)
    trainer = Trainer(config, data_dir, tmp_path / "model", tmp_path / "run", minutes=0.05)
    trainer.run()
    assert BUDGET_WARMUP_STEPS + BUDGET_PROBE_STEPS < config.steps < 10**9
    assert trainer.step == config.steps
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_pack_keeps_the_training_images_at_their_largest_training_scale(
    data_dir: Path, tmp_path: Path
) -> None:
    config = image_config()
    pack_images(config, data_dir, tmp_path / "packed")
    train = split_files(data_dir / "images", IMAGE_SUFFIXES, 0.1, validation=False)
    packed = sorted((tmp_path / "packed" / "images").iterdir())
    assert [p.stem for p in packed] == sorted(p.stem for p in train)
    with Image.open(packed[0]) as image:
        assert min(image.size) == 64  # short_side [48, 64]
    packed_config = image_config(data={**config.data, "val_fraction": 0.0})
    trainer = Trainer(packed_config, tmp_path / "packed", tmp_path / "m", tmp_path / "r")
    assert trainer.task.sampler.batch(2).shape == (2, 3, 32, 32)


def test_pack_copies_at_most_the_audio_budget_per_group(data_dir: Path, tmp_path: Path) -> None:
    one_clip_mb = (data_dir / "audio" / "speech" / "speech-0.wav").stat().st_size / 1e6
    pack_audio(audio_config(), data_dir, tmp_path / "packed", max_mb=3.5 * one_clip_mb)
    for group in ("speech", "music"):
        copied = list((tmp_path / "packed" / "audio" / group).iterdir())
        assert len(copied) == 3
        assert not set(p.name for p in copied) & {
            p.name
            for p in split_files(data_dir / "audio" / group, AUDIO_SUFFIXES, 0.1, validation=True)
        }


def test_pack_refuses_a_config_that_holds_nothing_out(data_dir: Path, tmp_path: Path) -> None:
    config = image_config(data={"crop": 32, "short_side": [48, 64], "val_fraction": 0.0})
    with pytest.raises(ValueError, match="val_fraction > 0"):
        pack_images(config, data_dir, tmp_path / "packed")


def test_resume_continues_exactly_where_an_uninterrupted_run_would_be(
    data_dir: Path, tmp_path: Path
) -> None:
    straight = Trainer(audio_config(), data_dir, tmp_path / "a", tmp_path / "run-a")
    straight.run()

    first = Trainer(audio_config(steps=2), data_dir, tmp_path / "b", tmp_path / "run-b")
    first.run()
    resumed = Trainer(audio_config(), data_dir, tmp_path / "b", tmp_path / "run-b")
    resumed.resume()
    assert resumed.step == 2
    assert resumed.optimizer.state_dict()["state"][0]["step"] == 2
    resumed.run()

    assert resumed.step == straight.step == 4
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, msg=name)
    assert (tmp_path / "b" / "config.json").is_file()
    assert (tmp_path / "b" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def tone_24k() -> np.ndarray:
    """2 s of a modulated 220 Hz tone in light noise at 24 kHz."""
    t = np.arange(48000) / 24000
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)
    noise = 0.05 * np.random.default_rng(0).standard_normal(t.size)
    return (tone + noise).astype(np.float32)


@pytest.mark.parametrize("target_bps", [8000, 16000, 32000])
def test_opus_takes_the_largest_payload_that_fits_a_reachable_bitrate(
    tone_24k: np.ndarray, target_bps: int
) -> None:
    decoded, bps = opus_at_bitrate(tone_24k, 24000, target_bps)
    assert 0.9 * target_bps < bps <= target_bps
    assert decoded.shape == tone_24k.shape


def test_opus_below_its_floor_answers_the_floor_for_any_lower_target(
    tone_24k: np.ndarray,
) -> None:
    floors = {opus_at_bitrate(tone_24k, 24000, target)[1] for target in (500, 1000, 3000)}
    assert len(floors) == 1
    assert 3000 < floors.pop() < 6500


def test_eval_reports_codec_figures_beside_jpeg_webp_and_opus(
    data_dir: Path, tmp_path: Path
) -> None:
    Trainer(image_config(steps=1), data_dir, tmp_path / "image", tmp_path / "run-i").run()
    Trainer(audio_config(steps=1), data_dir, tmp_path / "audio", tmp_path / "run-a").run()

    image = evaluate_model(tmp_path / "image", data_dir, limit=2)
    for codec in ("tokenizer", "jpeg", "webp"):
        assert {"psnr", "ssim", "bpp"} <= set(image[codec])
    assert {"used_fraction", "perplexity"} <= set(image["codebook_usage"])
    assert image["codebook_usage_full_size"]["tokens"] > image["codebook_usage"]["tokens"]

    audio = evaluate_model(tmp_path / "audio", data_dir, limit=2)
    for section in ("codebooks_2", "codebooks_1"):
        assert audio[section]["speech"]["codec"].keys() >= {
            "mel_distance",
            "stft_distance",
            "si_snr",
            "stoi",
        }
        assert "bitrate" in audio[section]["music"]["opus"]
    assert len(audio["codebook_usage"]) == 2
