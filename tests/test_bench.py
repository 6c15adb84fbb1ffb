"""The benchmark's machinery end to end in --quick mode: tiny models, real server processes."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from app.compute import auto_instances, usable_cpus
from app.media import decode_audio, decode_image
from app.registry import ModelRegistry
from bench.ceiling import Ceiling
from bench.cpu_split import main as cpu_split_main
from bench.latency import main as latency_main
from bench.loadgen import LevelStats
from bench.media import audio_clips, image_file, unique_copy, wav_file
from bench.report import op_summary
from bench.run import main
from bench.scenarios import Sweep
from bench.server import litserve_serving
from bench.soak import (
    HOSTILE,
    WELL_FORMED,
    big_png,
    binary_tokens_body,
    list_tokens_body,
    many_items_body,
    multipart,
    one_hertz_wav,
    truncated,
    weighted_cycle,
)
from bench.soak import main as soak_main
from bench.workloads import OPS, audio_workloads, image_workloads
from tests.support import png_bytes, settings_for, wav_bytes


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A media folder laid out like /work/shared/data: four photos, two 6 s recordings."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "audio" / "music").mkdir(parents=True)
    for seed in range(4):
        (root / "images" / f"photo-{seed}.png").write_bytes(png_bytes(96, 80, seed=seed))
    for index, freq in enumerate((220.0, 330.0)):
        (root / "audio" / "music" / f"tone-{index}.wav").write_bytes(wav_bytes(6.0, freq=freq))
    return root


def check_level(level: dict[str, Any]) -> None:
    assert level["throughput_rps"] > 0 and level["requests"] > 0, level
    assert 0 < level["p50_ms"] <= level["p90_ms"] <= level["p99_ms"] <= level["max_ms"]
    assert set(level["statuses"]) == {"200"}, level["statuses"]
    assert level["transport_errors"] == 0 and level["unexpected"] == 0
    assert level["client_cpu_cores"] > 0
    # instances in a forward pass on average: the server runs TOKSERVE_INSTANCES=auto
    instances = auto_instances("cpu", usable_cpus())
    assert level["server"]["batches"] >= 0 and 0 <= level["server"]["model_busy"] < instances + 0.1


def test_quick_run_writes_every_field_with_sane_values(
    repo: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    # 1 s levels (3 s at most): enough for two rounds at concurrency 2 on a loaded machine
    argv = ["--quick", "--device", "cpu", "--duration-s", "1.0"]
    argv += ["--model-dir", str(repo), "--data-dir", str(data_dir), "--out-dir", str(out)]
    assert main(argv) == 0

    (path,) = out.glob("*-quick.json")
    results = json.loads(path.read_text())
    assert path.with_suffix(".png").stat().st_size > 0
    table = path.with_suffix(".md").read_text()
    assert all(f"| {op} |" in table for op in OPS) and "QUICK run" in table

    assert results["quick"] is True and results["device"] == "cpu"
    assert set(results["served_versions"]) == {"tiny-image", "tiny-audio"}
    assert results["machine"]["cpu_count"] >= 1 and results["machine"]["other_cpu_cores_busy"] >= 0
    assert list(results["ops"]) == list(OPS)
    for op, entry in results["ops"].items():
        ceiling = entry["ceiling"]
        assert ceiling["items_per_s"] > 0 and ceiling["single_item_ms"] > 0, op
        assert str(ceiling["best_batch_size"]) in ceiling["items_per_s_by_batch_size"]
        for service in ("batched", "unbatched"):
            assert [level["concurrency"] for level in entry[service]["levels"]] == [1, 2], op
            for level in entry[service]["levels"]:
                check_level(level)
        summary = entry["summary"]
        assert summary["highest_concurrency"]["concurrency"] == 2
        assert summary["saturation"]["mean_batch_size"] >= 1
        assert summary["saturation_over_ceiling"]["value"] > 0
        assert summary["p99_over_p50_at_saturation"]["value"] >= 1
        assert math.isfinite(summary["p50_c1_minus_in_process_ms"]["value"])
        assert summary["batched_over_unbatched"]["value"] > 0
        assert summary["batched_over_unbatched"]["concurrency"] == 2
        assert summary["server_errors_not_503"] == {"value": 0, "target": "== 0", "met": True}
        assert summary["rejected_503"] == 0
        # the LitServe peer: the same levels (the second one skipped, with its reason, where
        # LitServe's first did not settle on a loaded machine), every answer a 200
        peer = entry["litserve"]
        measured = [level["concurrency"] for level in peer["levels"]]
        assert measured + [s["concurrency"] for s in peer["skipped"]] == [1, 2], op
        for level in entry["litserve"]["levels"]:
            assert set(level["statuses"]) == {"200"} and level["requests"] > 0, op
        versus = summary["versus_litserve"]
        assert versus["c1"]["litserve_p50_ms"] > 0 and versus["saturation"]["litserve_rps"] > 0
        assert versus["ahead"] in (True, False)
    assert "| tokserve ahead at both |" in table

    cache = results["cache"]
    for level in cache["levels"].values():
        check_level(level)  # hits said cached: true, misses cached: false
    assert 0 < cache["hit_p50_ms"] <= cache["hit_p99_ms"]
    # inside the server (its Server-Timing) a hit takes less than the client saw
    assert 0 < cache["hit_server_p50_ms"] < cache["hit_p50_ms"]
    assert cache["hit_throughput_rps"] > 0 and cache["miss_throughput_rps"] > 0
    assert cache["summary"]["hit_over_miss_throughput"]["value"] > 0


def test_cpu_split_counts_each_server_threads_cpu_per_request_beside_the_ceiling(
    repo: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--ops", "image_decode,audio_encode", "--concurrency", "2", "--duration-s", "1.0"]
    assert cpu_split_main([*argv, "--model-dir", str(repo), "--data-dir", str(data_dir)]) == 0
    results = json.loads(capsys.readouterr().out)
    for op, model in (("image_decode", "tiny-image-decode"), ("audio_encode", "tiny-audio-encode")):
        row = results["ops"][op]
        threads = row["cpu_ms_per_request"]
        # the op's model instances did the forwards, no other queue's; the event loop served
        forwards = [name for name in threads if name.startswith("tiny-")]
        assert forwards and all(name.startswith(f"{model}-cpu/") for name in forwards), threads
        assert threads["MainThread"] > 0
        assert row["server_cpu_ms_per_request"] == pytest.approx(sum(threads.values()), abs=0.01)
        assert row["load_generator_cpu_ms_per_request"] > 0
        assert 0 <= row["machine_idle_share"] < 1
        assert row["in_process"]["ceiling_items_per_s"] > 0 and row["throughput_rps"] > 0
        assert row["bound"] > 0 and row["ratio"] > 0


def test_the_litserve_peer_answers_the_tokens_and_files_of_the_same_model(
    repo: Path, data_dir: Path
) -> None:
    registry = ModelRegistry.load(settings_for(repo))
    image = image_workloads(registry.models["tiny-image"], data_dir, 2)
    audio = audio_workloads(registry.models["tiny-audio"], data_dir, 1)
    with litserve_serving(repo, "cpu", ["tiny-image", "tiny-audio"]) as url:
        for op, workload in (image | audio).items():
            call = workload.peer_calls()
            answer = httpx.post(
                url + call.path, content=call.body, headers=call.headers, timeout=60
            )
            assert answer.status_code == 200, (op, answer.text)
            body = answer.content
            if op.endswith("encode"):
                tokens = msgpack.unpackb(body)["tokens"]
                expected = workload.run_batch(workload.items[:1])[0]
                assert tokens["shape"] == list(expected.shape), op
                # same loader, same media code, same runner: the same tokens
                assert (
                    np.frombuffer(tokens["data"], expected.dtype).tolist()
                    == expected.reshape(-1).tolist()
                ), op
            else:
                assert body[:4] in (b"\x89PNG", b"RIFF"), op


def test_recordings_too_short_for_every_clip_asked_give_each_clip_they_hold(data_dir: Path) -> None:
    # two 6 s recordings hold one 5 s clip each, however many are asked for
    clips = audio_clips(data_dir, 24_000, 1, 5.0, 8)
    assert [clip.shape for clip in clips] == [(120_000, 1), (120_000, 1)]
    assert not np.array_equal(clips[0], clips[1])


def test_unique_copies_are_new_bytes_that_decode_to_the_same_media() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    for fmt in ("jpeg", "png"):
        original = image_file(image, fmt)
        copies = {unique_copy(original, nonce) for nonce in range(3)}
        assert len(copies | {original}) == 4
        for copy in copies:
            assert (decode_image(copy, (64, 64)) == decode_image(original, (64, 64))).all()
    wav = wav_file(np.sin(np.arange(16000, dtype=np.float32))[:, None] * 0.3, 16000)
    copy = unique_copy(wav, 7)
    assert copy != wav
    assert (decode_audio(copy, 16000)[0] == decode_audio(wav, 16000)[0]).all()


def level(concurrency: int, throughput_rps: float) -> LevelStats:
    return LevelStats(
        concurrency=concurrency,
        elapsed_s=1.0,
        window_s=1.0,
        requests=int(throughput_rps),
        throughput_rps=throughput_rps,
        p50_ms=10.0,
        p90_ms=11.0,
        p99_ms=12.0,
        server_p50_ms=9.0,
        mean_ms=10.0,
        max_ms=12.0,
        statuses={"200": int(throughput_rps)},
        transport_errors=0,
        unexpected=0,
        client_cpu_cores=0.1,
        server={"mean_batch_size": 1.0, "model_busy": 0.5},
        complete=throughput_rps > 0,
    )


def test_batching_gain_skips_levels_where_the_unbatched_server_answered_nothing() -> None:
    ceiling = Ceiling(2, 60.0, 16.0, {1: 50.0, 2: 60.0})
    batched = Sweep([level(1, 40.0), level(2, 55.0)], [])
    starved = Sweep([level(1, 30.0), level(2, 0.0)], [])
    gain = op_summary(ceiling, batched, starved)["batched_over_unbatched"]
    assert gain["value"] == pytest.approx(40.0 / 30.0, abs=1e-3) and gain["concurrency"] == 1
    nothing = Sweep([level(1, 0.0), level(2, 0.0)], [])
    assert op_summary(ceiling, batched, nothing)["batched_over_unbatched"]["value"] is None


def test_a_batching_gain_below_target_says_how_much_of_the_models_own_gain_it_kept() -> None:
    ceiling = Ceiling(8, 80.0, 20.0, {1: 50.0, 8: 80.0})
    batched = Sweep([level(32, 60.0)], [])
    unbatched = Sweep([level(32, 50.0)], [])
    gain = op_summary(ceiling, batched, unbatched)["batched_over_unbatched"]
    assert gain["value"] == pytest.approx(1.2) and gain["met"] is False
    assert "gives 1.60x" in gain["note"] and "shows 75% of that gain" in gain["note"]


def test_latency_times_each_model_as_served_and_in_float32_in_every_round(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model-dir", str(repo), "--models", "tiny-image", "tiny-audio"]
    assert latency_main([*argv, "--rounds", "2", "--repeats", "2", "--threads", "1"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["threads"] == 1
    entries = results["models"]
    assert sorted(entries) == sorted(
        f"{name} {label}"
        for name in ("tiny-image", "tiny-audio")
        for label in ("served", "float32")
    )
    for key, entry in entries.items():
        assert len(entry["round_medians_ms"]) == 2 and all(v > 0 for v in entry["round_medians_ms"])
        assert entry["median_ms"] == pytest.approx(
            float(np.median(entry["round_medians_ms"])), abs=0.01
        )
        assert entry["met"] == (entry["median_ms"] < entry["target_ms"]), key
    assert entries["tiny-image float32"]["dtype"] == "float32"
    assert entries["tiny-audio served"]["item"] == "10 s of audio"


def test_soak_sends_every_kind_and_reports_statuses_latency_memory_and_descriptors(
    repo: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the hostile bodies are full size; the tiny server's limits refuse them cheaply
    limits = ["TOKSERVE_MAX_IMAGE_PIXELS=1000000", "TOKSERVE_MAX_BODY_BYTES=8388608"]
    out = tmp_path / "soak.json"
    argv = ["--model-dir", str(repo), "--data-dir", str(data_dir), "--device", "cpu"]
    argv += ["--images", "4", "--clips", "2", "--unloaded-per-kind", "2", "--idle-s", "0.2"]
    # a light load (a third of saturation) for 2 s: about two rounds of the 31-request mix
    argv += ["--saturation-s", "0.5", "--overload", "0.3", "--duration-s", "2", "--windows", "2"]
    assert soak_main([*argv, "--env", *limits, "--out", str(out)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == results

    kinds = results["requests"]["by_kind"]
    assert list(kinds) == [*WELL_FORMED, *HOSTILE]
    assert all(entry["sent"] >= 1 for entry in kinds.values()), kinds
    assert results["requests"]["total"] == sum(entry["sent"] for entry in kinds.values())
    assert kinds["disconnect_mid_upload"]["statuses"] == {
        "client_closed": kinds["disconnect_mid_upload"]["sent"]
    }
    assert results["5xx"] == sum(sum(s.values()) for s in results["5xx_by_kind"].values())
    assert results["5xx"] == results["503_shed"] + results["5xx_other_than_503"]
    assert results["saturation"]["throughput_rps"] > 0
    assert results["settings"]["rate_rps"] == pytest.approx(
        0.3 * results["saturation"]["throughput_rps"], abs=0.01
    )
    unloaded = results["latency_well_formed"]["unloaded"]
    assert unloaded["answered_2xx"] == 8 and 0 < unloaded["p50_ms"] <= unloaded["p99_ms"]
    assert results["latency_well_formed"]["soak"]["requests"] >= 4
    assert results["healthz"]["probes"] > 0 and results["healthz"]["p99_ms"] > 0
    memory = results["memory"]
    assert 0 < memory["rss_after_warmup_mb"] <= memory["rss_high_water_mb"]
    assert memory["rss_end_mb"] > 0 and memory["end_over_after_warmup"] > 0
    assert memory["cache_growth_mb"] >= 0  # the soak's unique requests were cached
    assert results["fds"]["start"] > 0 and results["threads"]["start"] > 0
    assert results["fds"]["end"] > 0 and results["threads"]["end"] > 0
    assert results["server_alive"] is True and len(results["timeline"]) == 2
    assert set(results["goals"]) == {
        "5xx_other_than_503",
        "healthz_p99_ms",
        "rss_end_vs_after_warmup",
        "rss_end_less_cache_growth_vs_after_warmup",
        "fds_equal",
        "threads_equal",
    }
    assert results["machine"]["cpu_count"] >= 1


def test_soak_hostile_bodies_are_what_they_claim() -> None:
    wav = one_hertz_wav()
    info = sf.info(io.BytesIO(wav))
    assert len(wav) == 644 and (info.samplerate, info.frames) == (1, 600)
    assert len(msgpack.unpackb(many_items_body())["tokens"]) == 100_000
    assert msgpack.unpackb(list_tokens_body(1000)) == {"tokens": [[0] * 1000]}
    item = msgpack.unpackb(binary_tokens_body(4096))["tokens"]
    assert item["shape"] == [1, 1024] and len(item["data"]) == 4096
    png = big_png((400, 250))
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (400, 250)
    half = truncated(png, 1)
    assert half.startswith(png[:33]) and len(half) < len(png)
    body, content_type = multipart([(png, "image/png"), (b"x", "image/png")], "b0")
    assert content_type == "multipart/form-data; boundary=b0" and body.count(b"--b0") == 3
    cycle = weighted_cycle({"a": 5, "b": 1})
    assert sorted(next(cycle) for _ in range(6)) == ["a"] * 5 + ["b"]
