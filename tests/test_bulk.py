"""`tokserve bulk`: real media from ../shared/data to shards whose rows equal the HTTP API's
answers, bad files as error rows, every input kind, and resuming after SIGKILL."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from app.bulk import BulkOptions, run
from app.bulk.progress import Progress
from app.bulk.shards import JobMismatch
from bench.server import free_port, server_process
from tests.support import REPO_ROOT, SHARED_DATA, TINY_IMAGE, ffmpeg_audio, write_model

MODELS = REPO_ROOT / "models"
IMAGE_MODEL, AUDIO_MODEL = "image-fsq-256", "audio-rvq-24k"


def first_files(folder: Path, count: int) -> list[Path]:
    return sorted(folder.iterdir())[:count]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten real photos in two subfolders, a truncated JPEG and a text file that is skipped."""
    root = tmp_path_factory.mktemp("photos")
    for number, source in enumerate(first_files(SHARED_DATA / "images", 10)):
        target = root / ("a" if number % 2 else "b") / source.name
        target.parent.mkdir(exist_ok=True)
        shutil.copy(source, target)
    (root / "b" / "broken.jpg").write_bytes(sorted(root.glob("a/*.jpg"))[0].read_bytes()[:600])
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real speech clips, the first again as a 48 kHz stereo M4A (a phone's recording),
    and one that is not audio at all."""
    root = tmp_path_factory.mktemp("clips")
    for source in first_files(SHARED_DATA / "audio" / "speech", 4):
        shutil.copy(source, root / source.name)
    speech, rate = sf.read(first_files(SHARED_DATA / "audio" / "speech", 1)[0], dtype="float32")
    stereo = np.stack([speech, 0.5 * speech]).repeat(2, axis=1)
    (root / "phone.m4a").write_bytes(ffmpeg_audio(stereo, 2 * rate, "ipod", "aac"))
    (root / "noise.ogg").write_bytes(b"OggS" + bytes(200))
    return root


def bulk(inputs: list[Path | str], out: Path, model: str = IMAGE_MODEL, **options: Any) -> Any:
    return run(
        BulkOptions(inputs=[str(p) for p in inputs], out=out, model=model, **options),
        Progress(0, io.StringIO()),
    )


def rows(out: Path) -> list[dict[str, Any]]:
    """Every row of a job's Parquet shards, in order."""
    tables = [pq.read_table(out / s["name"]) for s in manifest(out)["shards"]]
    return pa.concat_tables(tables).to_pylist() if tables else []


def manifest(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "manifest.json").read_text()))


@pytest.fixture(scope="module")
def photo_job(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("photo-job")
    bulk([photos], out, rows_per_shard=4)
    return out


@pytest.fixture(scope="module")
def clip_job(clips: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clip-job")
    bulk([clips], out, model=AUDIO_MODEL, codebooks=4)
    return out


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """`tokserve serve` with the shipped image and audio models."""
    models = f"{IMAGE_MODEL},{AUDIO_MODEL}"
    with server_process(MODELS, TOKSERVE_MODELS=models, TOKSERVE_CACHE_MAX_BYTES="0") as (_, url):
        yield url


def api_encode(url: str, path: Path, route: str, **params: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/{route}/encode", content=path.read_bytes(), params=params, timeout=60
    )


# Rows: what the HTTP API answers, for the same files


def test_image_rows_hold_the_http_apis_tokens_and_figures(
    photo_job: Path, photos: Path, server: str
) -> None:
    good = [r for r in rows(photo_job) if r["error"] is None]
    assert len(good) == 10
    for r in good:
        item = api_encode(server, photos / r["id"], "images").json()["items"][0]
        assert r["tokens"] == np.ravel(item["tokens"]).tolist()
        assert r["shape"] == item["shape"] == [32, 32]
        figures = ("source_size", "crop_box", "content_box", "resize_filter")
        assert {k: r[k] for k in figures} == {k: item[k] for k in figures}
        assert r["resize_filter"] == "bicubic"


def test_audio_rows_hold_the_http_apis_tokens_and_figures(
    clip_job: Path, clips: Path, server: str
) -> None:
    good = [r for r in rows(clip_job) if r["error"] is None]
    assert len(good) == 5
    for r in good:
        item = api_encode(server, clips / r["id"], "audio", codebooks=4).json()["items"][0]
        assert r["tokens"] == np.ravel(item["tokens"]).tolist()
        assert r["shape"] == item["shape"] == [4, item["frames"]]
        figures = (
            "source_sample_rate",
            "source_channels",
            "samples",
            "resampled",
            "downmixed",
            "frames",
            "duration_s",
        )
        assert {k: r[k] for k in figures} == {k: item[k] for k in figures}
        assert r["codebooks"] == 4
        phone = r["id"] == "phone.m4a"
        assert r["source_sample_rate"] == (48_000 if phone else 24_000)
        assert (r["resampled"], r["downmixed"]) == (phone, phone)


def test_a_truncated_image_is_a_row_with_the_apis_problem(
    photo_job: Path, photos: Path, server: str
) -> None:
    (broken,) = [r for r in rows(photo_job) if r["error"] is not None]
    answer = api_encode(server, photos / "b" / "broken.jpg", "images")
    assert broken["id"] == "b/broken.jpg" and broken["tokens"] is None
    assert broken["error"] == {k: answer.json()[k] for k in ("status", "title", "detail")}
    assert broken["error"]["status"] == 415


def test_a_file_that_is_not_audio_is_a_row_with_the_apis_problem(
    clip_job: Path, clips: Path, server: str
) -> None:
    (noise,) = [r for r in rows(clip_job) if r["error"] is not None]
    answer = api_encode(server, clips / "noise.ogg", "audio")
    assert noise["id"] == "noise.ogg"
    assert noise["error"] == {k: answer.json()[k] for k in ("status", "title", "detail")}


def test_the_server_engine_writes_the_rows_of_the_local_engine(
    photo_job: Path, photos: Path, server: str, tmp_path: Path
) -> None:
    bulk([photos], tmp_path, server=server, rows_per_shard=4)
    assert rows(tmp_path) == rows(photo_job)


def test_the_server_engine_waits_for_a_server_that_is_not_up_yet(
    photos: Path, tmp_path: Path
) -> None:
    port = free_port()
    command = [sys.executable, "-m", "app.cli", "bulk", str(photos / "a"), "--model", IMAGE_MODEL]
    command += ["--out", str(tmp_path), "--server", f"http://127.0.0.1:{port}"]
    job = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # refused connections meanwhile: the job retries, its items do not fail
    environment = {**os.environ, "TOKSERVE_PORT": str(port), "TOKSERVE_MODELS": IMAGE_MODEL}
    serve = [sys.executable, "-m", "app.cli", "serve"]
    with subprocess.Popen(
        serve, cwd=REPO_ROOT, env=environment, stderr=subprocess.DEVNULL
    ) as server:
        try:
            _, stderr = job.communicate(timeout=120)
        finally:
            server.terminate()
    assert job.returncode == 0
    assert "retrying in" in stderr
    assert manifest(tmp_path)["counts"] == {"rows": 5, "errors": 0}


# The job's record


def test_ids_are_paths_below_the_input_folder_in_sorted_order(photo_job: Path) -> None:
    ids = [r["id"] for r in rows(photo_job)]
    assert ids == sorted(ids) and len(ids) == 11
    assert all(i.startswith(("a/", "b/")) for i in ids)  # notes.txt is not an image


def test_the_manifest_lists_each_shard_with_its_rows_and_sha256(photo_job: Path) -> None:
    record = manifest(photo_job)
    assert [s["rows"] for s in record["shards"]] == [4, 4, 3]
    for shard in record["shards"]:
        assert (
            hashlib.sha256((photo_job / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
        )
    assert record["counts"] == {"rows": 11, "errors": 1}
    assert (record["model"], record["grid"], record["vocab_size"]) == (IMAGE_MODEL, [32, 32], 64000)
    assert {r["version"] for r in rows(photo_job)} == {record["version"]}


def test_the_manifest_of_an_audio_job_gives_the_frame_rate_and_codebooks(clip_job: Path) -> None:
    record = manifest(clip_job)
    assert record["modality"] == "audio" and record["options"]["codebooks"] == 4
    assert record["frame_rate"] == 75.0 and record["codebooks"] == 8


def test_tokens_are_stored_as_uint16(photo_job: Path) -> None:
    schema = pq.read_schema(photo_job / "part-00000.parquet")
    assert schema.field("tokens").type == pa.list_(pa.uint16())


# Resuming


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 real photos: more than the engine keeps in flight, so shards are written while later
    items are still being tokenized."""
    root = tmp_path_factory.mktemp("many-photos")
    for source in first_files(SHARED_DATA / "images", 80):
        shutil.copy(source, root / source.name)
    return root


def test_a_job_killed_mid_run_resumes_to_the_shards_of_an_uninterrupted_run(
    many_photos: Path, tmp_path: Path
) -> None:
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    bulk([many_photos], uninterrupted, rows_per_shard=16)
    command = [sys.executable, "-m", "app.cli", "bulk", str(many_photos), "--model", IMAGE_MODEL]
    command += ["--out", str(killed), "--rows-per-shard", "16"]
    job = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.DEVNULL)
    state = killed / ".tokserve-bulk.json"
    deadline = time.monotonic() + 120
    while not (state.exists() and json.loads(state.read_text()).get("shards")):
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not (killed / "manifest.json").exists()
    resumed = subprocess.run([*command, "--resume"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"resuming after (16|32|48|64) of 80 items", resumed.stderr)
    assert [s["sha256"] for s in manifest(killed)["shards"]] == [
        s["sha256"] for s in manifest(uninterrupted)["shards"]
    ]
    assert rows(killed) == rows(uninterrupted)


def test_resume_rewrites_a_shard_whose_file_differs_from_its_record(
    photo_job: Path, photos: Path, tmp_path: Path
) -> None:
    shutil.copytree(photo_job, tmp_path, dirs_exist_ok=True)
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "part-00001.parquet").write_bytes(b"torn")
    (tmp_path / ".part-00002.parquet.tmp").write_bytes(b"left over")
    bulk([photos], tmp_path, rows_per_shard=4, resume=True)
    assert rows(tmp_path) == rows(photo_job)
    assert not list(tmp_path.glob(".part-*"))


def test_a_new_job_in_a_folder_holding_one_is_refused(photos: Path, photo_job: Path) -> None:
    with pytest.raises(JobMismatch, match="pass --resume"):
        bulk([photos], photo_job, rows_per_shard=4)


def test_resuming_with_other_options_is_refused(photos: Path, photo_job: Path) -> None:
    with pytest.raises(JobMismatch, match="resize: was 'crop', now 'pad'"):
        bulk([photos], photo_job, rows_per_shard=4, resize="pad", resume=True)


def test_resuming_with_another_model_version_is_refused(photos: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "v1", tmp_path / "v2"
    write_model(first, TINY_IMAGE, seed=1)
    write_model(second, TINY_IMAGE, seed=2)  # the same model name, other weights
    out = tmp_path / "out"
    bulk([photos / "a"], out, model="tiny-image", model_dir=[str(first)])
    (out / "manifest.json").unlink()
    with pytest.raises(JobMismatch, match=r"version \w+; the model now is tiny-image version"):
        bulk([photos / "a"], out, model="tiny-image", model_dir=[str(second)], resume=True)


# Inputs and outputs


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("tiny-models")
    write_model(root, TINY_IMAGE)
    return str(root)


def tiny_rows(inputs: list[Path | str], out: Path, tiny_models: str, **options: Any) -> list[Any]:
    bulk(inputs, out, model="tiny-image", model_dir=[tiny_models], **options)
    return rows(out)


def tokens_by_name(job_rows: list[dict[str, Any]]) -> dict[str, list[int]]:
    return {Path(r["id"]).name.split("#")[0]: r["tokens"] for r in job_rows}


@pytest.fixture(scope="module")
def tiny_folder_rows(
    photos: Path, tiny_models: str, tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    return tiny_rows([photos / "a"], tmp_path_factory.mktemp("tiny"), tiny_models)


def test_a_glob_names_items_below_its_fixed_folders(
    photos: Path, tiny_models: str, tiny_folder_rows: list[Any], tmp_path: Path
) -> None:
    globbed = tiny_rows([f"{photos}/*/*.jpg"], tmp_path, tiny_models)
    assert [r["id"] for r in globbed if r["id"].startswith("a/")] == [
        f"a/{r['id']}" for r in tiny_folder_rows
    ]


def test_a_list_of_paths_is_read_relative_to_its_folder(
    photos: Path, tiny_models: str, tiny_folder_rows: list[Any], tmp_path: Path
) -> None:
    names = [f"a/{r['id']}" for r in tiny_folder_rows]
    listing = photos / "list.txt"
    listing.write_text("# the a folder\n" + "\n".join(names) + "\n\n")
    listed = tiny_rows([listing], tmp_path, tiny_models)
    assert [r["id"] for r in listed] == names
    assert [r["tokens"] for r in listed] == [r["tokens"] for r in tiny_folder_rows]


@pytest.mark.parametrize("kind", ["binary", "hugging-face-struct", "path"])
def test_a_parquet_column_of_bytes_structs_or_paths_gives_the_files_tokens(
    kind: str, photos: Path, tiny_models: str, tiny_folder_rows: list[Any], tmp_path: Path
) -> None:
    files = sorted((photos / "a").iterdir())
    values: list[Any] = {
        "binary": [f.read_bytes() for f in files],
        "hugging-face-struct": [{"bytes": f.read_bytes(), "path": None} for f in files],
        "path": [str(f) for f in files],
    }[kind]
    table = tmp_path / "table.parquet"
    pq.write_table(
        pa.table({"name": [f.name for f in files], "image": values}), table, row_group_size=2
    )
    out = tiny_rows([table], tmp_path / "out", tiny_models, column="image", id_column="name")
    assert [r["id"] for r in out] == [r["id"] for r in tiny_folder_rows]
    assert [r["tokens"] for r in out] == [r["tokens"] for r in tiny_folder_rows]


def test_a_jsonl_file_of_base64_bytes_gives_the_files_tokens(
    photos: Path, tiny_models: str, tiny_folder_rows: list[Any], tmp_path: Path
) -> None:
    files = sorted((photos / "a").iterdir())
    table = tmp_path / "table.jsonl"
    table.write_text(
        "".join(
            json.dumps({"image": {"bytes": base64.b64encode(f.read_bytes()).decode()}}) + "\n"
            for f in files
        )
    )
    out = tiny_rows([table], tmp_path / "out", tiny_models, column="image")
    assert [r["id"] for r in out] == [f"table.jsonl#{n}" for n in range(len(files))]
    assert [r["tokens"] for r in out] == [r["tokens"] for r in tiny_folder_rows]


def test_a_webdataset_tar_names_items_by_their_keys(
    photos: Path, tiny_models: str, tiny_folder_rows: list[Any], tmp_path: Path
) -> None:
    archive = tmp_path / "shard.tar"
    with tarfile.open(archive, "w") as tar:
        for number, f in enumerate(sorted((photos / "a").iterdir())):
            tar.add(f, arcname=f"sample{number:03d}.jpg")
            caption = json.dumps({"caption": f.name}).encode()
            info = tarfile.TarInfo(f"sample{number:03d}.json")
            info.size = len(caption)
            tar.addfile(info, io.BytesIO(caption))
    out = tiny_rows([archive], tmp_path / "out", tiny_models)
    assert [r["id"] for r in out] == [f"sample{n:03d}" for n in range(len(tiny_folder_rows))]
    assert [r["tokens"] for r in out] == [r["tokens"] for r in tiny_folder_rows]


def test_webdataset_output_holds_tokens_npy_and_json_for_each_sample(
    photos: Path, tiny_models: str, tmp_path: Path
) -> None:
    bulk([photos], tmp_path, model="tiny-image", model_dir=[tiny_models], format="webdataset")
    (shard,) = manifest(tmp_path)["shards"]
    with tarfile.open(tmp_path / shard["name"]) as tar:
        names = tar.getnames()
        first = json.loads(tar.extractfile(names[1]).read())  # type: ignore[union-attr]
        tokens = np.load(io.BytesIO(tar.extractfile(names[0]).read()))  # type: ignore[union-attr]
    assert names[:2] == ["00000000000.tokens.npy", "00000000000.json"]
    assert tokens.shape == tuple(first["shape"]) == (8, 8) and tokens.dtype == np.uint16
    assert first["id"].startswith("a/") and first["error"] is None
    assert len([n for n in names if n.endswith(".json")]) == 11
    assert len([n for n in names if n.endswith(".npy")]) == 10  # the truncated JPEG has none


def test_a_missing_input_stops_the_job_before_anything_is_written(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "app.cli", "bulk", str(tmp_path / "nowhere")]
    done = subprocess.run(
        [*command, "--model", IMAGE_MODEL, "--out", str(tmp_path / "out")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().endswith("nowhere: no such file or folder.")


def test_fail_on_error_exits_1_when_a_row_has_an_error(
    photos: Path, tiny_models: str, tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "app.cli", "bulk", str(photos), "--model", "tiny-image"]
    command += ["--model-dir", tiny_models, "--out", str(tmp_path), "--fail-on-error"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 1
    assert "1 of 11 rows have an error" in done.stderr
    assert "11 rows (1 errors)" in done.stderr  # the summary line, not a terminal: no bar


def test_a_terminal_gets_a_bar_with_rate_eta_and_errors() -> None:
    screen = io.StringIO()
    progress = Progress(100, screen, tty=True)
    progress.start(0, 0)
    progress.shown -= 1.0
    progress.advance(25, 2)
    assert screen.getvalue().startswith("\r[#######.......................] 25/100 (25%)")
    assert "ETA" in screen.getvalue() and "errors 2" in screen.getvalue()
