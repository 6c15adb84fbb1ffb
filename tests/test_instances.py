"""Several instances of a model on one device (TOKSERVE_DEVICES, TOKSERVE_INSTANCES): one queue
per model × op, each instance with its own worker thread, whichever is free taking the next
batch."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from app.compute import auto_instances, usable_cpus
from app.config import Settings
from app.endpoints import Media, Tokens
from app.engine import Engine
from app.registry import ModelRegistry, instance_devices
from tests.support import png_bytes, sample, settings_for, wav_bytes

IMAGES = [png_bytes(seed=seed) for seed in range(8)]


def test_devices_and_instances_name_every_instance_s_device() -> None:
    assert instance_devices(Settings(devices="cpu,cpu", instances=1)) == ["cpu", "cpu"]
    assert instance_devices(Settings(device="cpu", instances=3)) == ["cpu", "cpu", "cpu"]
    # what CUDA device each instance is on is known without one: the names are kept as given
    assert Settings(devices="cuda:0, cuda:1", instances=2).devices == ["cuda:0", "cuda:1"]


def test_auto_instances_are_one_per_gpu_and_one_per_cpu_core_up_to_four() -> None:
    assert [auto_instances("cpu", cpus) for cpus in (1, 2, 3, 4, 5, 64)] == [1, 2, 3, 4, 4, 4]
    assert auto_instances("cuda", 64) == 1


def test_instances_are_auto_by_default_as_many_as_the_usable_cores_give(repo: Path) -> None:
    settings = Settings(model_dir=[str(repo)], device="cpu")
    assert settings.instances == "auto"
    assert instance_devices(settings) == ["cpu"] * auto_instances("cpu", usable_cpus())


def test_instances_are_a_count_or_auto() -> None:
    with pytest.raises(ValidationError):
        Settings(instances=0)
    with pytest.raises(ValidationError):
        Settings(instances="all")


def test_instances_on_one_device_share_its_weights_and_split_its_threads(repo: Path) -> None:
    registry = ModelRegistry.load(settings_for(repo, instances=2))
    for name, model in registry.models.items():
        instances = registry.instances[name]
        assert list(instances) == ["cpu/0", "cpu/1"]
        assert all(loaded is model for loaded in instances.values())
    assert torch.get_num_threads() == max(1, usable_cpus() // 2)


async def encode(settings: Settings, images: list[bytes]) -> list[np.ndarray]:
    """Each image's tokens from a started engine, which is stopped after."""
    engine = Engine.build(settings)
    await engine.start()
    try:
        answer = await engine.encode_images(images)
    finally:
        await engine.stop()
    tokens = []
    for result in answer.items:
        assert isinstance(result, Tokens)
        tokens.append(result.tokens)
    return tokens


async def test_two_cpu_instances_both_compute_and_answer_the_tokens_of_one(repo: Path) -> None:
    # one item per batch, so the second item of the request starts beside the first
    two = settings_for(repo, devices=["cpu", "cpu"], max_batch_size=1, cache_max_bytes=0)
    labels = {"model": "tiny-image", "op": "encode"}
    before = [
        sample("tokserve_instance_batches_total", **labels, instance=f"cpu/{i}") for i in (0, 1)
    ]
    tokens = await encode(two, IMAGES)
    after = [
        sample("tokserve_instance_batches_total", **labels, instance=f"cpu/{i}") for i in (0, 1)
    ]
    used = [later - earlier for earlier, later in zip(before, after, strict=True)]
    # the request's eight batches, shared (warm-up is not a batch)
    assert all(count > 0 for count in used) and sum(used) == len(IMAGES)
    # the same thread count (the split two instances made) with one instance: the same tokens
    reference = await encode(settings_for(repo, cache_max_bytes=0), IMAGES)
    for ours, theirs in zip(tokens, reference, strict=True):
        assert np.array_equal(ours, theirs)


async def test_the_items_of_a_failed_instance_are_answered_by_the_other(repo: Path) -> None:
    settings = settings_for(repo, instances=2, max_batch_size=1, warmup=False, cache_max_bytes=0)
    engine = Engine.build(settings)
    endpoint = engine.image("tiny-image")
    # the second instance's weights are gone from its device: each of its forwards fails
    lost = copy.copy(endpoint.runners["cpu/1"].model)
    lost.tokenizer = copy.deepcopy(lost.tokenizer).to("meta")  # type: ignore[attr-defined]
    lost.device = torch.device("meta")
    endpoint.runners["cpu/1"].model = lost
    await engine.start()
    errors = sample("tokserve_rejected_total", reason="error")
    labels = {"model": "tiny-image", "op": "encode", "instance": "cpu/1"}
    tried = sample("tokserve_instance_batches_total", **labels)
    try:
        answer = await engine.encode_images(IMAGES)
    finally:
        await engine.stop()
    assert all(isinstance(item, Tokens) for item in answer.items)
    assert sample("tokserve_instance_batches_total", **labels) > tried
    assert sample("tokserve_rejected_total", reason="error") == errors
    reference = await encode(settings_for(repo, cache_max_bytes=0), IMAGES)
    for item, theirs in zip(answer.items, reference, strict=True):
        assert isinstance(item, Tokens) and np.array_equal(item.tokens, theirs)


async def test_audio_encodes_and_decodes_on_two_warmed_up_instances(repo: Path) -> None:
    engine = Engine.build(settings_for(repo, instances=2, cache_max_bytes=0))
    await engine.start()
    try:
        (encoded,) = (await engine.encode_audio([wav_bytes(1.0)])).items
        assert isinstance(encoded, Tokens)
        (decoded,) = (await engine.decode_audio([encoded.tokens])).items
    finally:
        await engine.stop()
    assert isinstance(decoded, Media) and decoded.data[:4] == b"RIFF"
