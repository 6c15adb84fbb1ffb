"""``python -m bench.bulk``: what ``tokserve bulk`` gets out of a model, against the in-process
ceiling and against what users write today, a loop that posts one file per request.

Per modality (``--images`` photos with image-fsq-256, ``--audio-seconds`` of speech with
audio-rvq-24k), in order:

* ceiling: a child process loads the model into an Engine, reads every file into memory, then
  submits all items, one per call, at most ``--window`` calls in flight (4 of the model's
  batches unless given); items/s from the first call to the last answer. No reading, no writing.
* local: ``tokserve bulk --engine local`` on the folder, a child process; items/s over its
  manifest's ``seconds`` (the job: planning, reading, tokenizing, writing shards) and over its
  whole life (start-up and model load included).
* local_tenth: the same on a list of every tenth file: its peak RSS against local's says
  whether memory stays flat as the number of items grows tenfold.
* http_loop: ``tokserve serve`` with only that model and its memory cache off, and a plain loop
  here that posts one file per request with httpx (multipart) and parses the JSON answer.
* server: ``tokserve bulk --server URL`` against that same server.
* ray: ``tokserve bulk --engine ray`` (it starts a local Ray of its own) when Ray is
  installed; otherwise null, and ``skipped`` says why.

The inputs are written once under bench/.work/ (git-ignored): the photos repeated, every copy
with its own JPEG comment (bench.media.unique_copy), so no two files share bytes and neither a
cache nor single-flight answers one from another; and the speech clips in name order until
their durations add up to ``--audio-seconds``. Peak RSS of each child is the kernel's
high-water mark from os.wait4 (exact); of the server, VmRSS sampled every 20 ms during each
phase; for Ray, also the driver's own VmHWM and the PSS summed over it and every process under
it (Ray's raylet and workers), sampled twice a second. Every figure and ratio comes from this
one run. One JSON document goes to stdout (and ``--out``); progress to stderr.

    python -m bench.bulk [--images 1000] [--audio-seconds 3600] [--skip ray,http_loop,...]
        [--out bench/results/<date>-bulk.json]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import soundfile as sf

from bench import machine
from bench.media import AUDIO_SUFFIXES, IMAGE_SUFFIXES, unique_copy
from bench.memory import RssSampler, rss_bytes
from bench.report import emit
from bench.server import REPO_ROOT, server_process
from bench.soak import ServerProcess, goal

log = logging.getLogger("bench")

MODALITIES = ("image", "audio")
MODELS = {"image": "image-fsq-256", "audio": "audio-rvq-24k"}
ROUTES = {"image": "/v1/images/encode", "audio": "/v1/audio/encode"}
PHASES = ("ceiling", "local", "local_tenth", "http_loop", "server", "ray")
WORK_DIR = REPO_ROOT / "bench" / ".work"
COMPLETE = ".complete.json"  # written last into an input folder; no image or audio suffix
CEILING_WINDOW_BATCHES = 4
GOAL_LOCAL_OVER_CEILING = 0.9
MEMORY_SAMPLE_EVERY = 10
TREE_INTERVAL_S = 0.5
MIB = 1024 * 1024


# --- inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """One modality's input folder and what is in it."""

    modality: str
    model: str
    folder: Path
    files: list[Path]
    bytes: int
    audio_seconds: float | None
    description: str

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "items": len(self.files),
            "bytes": self.bytes,
            **({"audio_seconds": round(self.audio_seconds, 1)} if self.audio_seconds else {}),
            "folder": relative(self.folder),
            "inputs": self.description,
        }


def relative(path: Path) -> str:
    """``path`` from the repository, where every child runs."""
    return os.path.relpath(path, REPO_ROOT)


def written_once(folder: Path, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """The record of ``folder``, built by ``build(staging)`` in a staging folder and renamed
    into place unless a complete one is already there."""
    marker = folder / COMPLETE
    if marker.is_file():
        record: dict[str, Any] = json.loads(marker.read_text())
        if all((folder / name).is_file() for name in record["files"]):
            return record
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    record = build(staging)
    (staging / COMPLETE).write_text(json.dumps(record))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return record


def prepared(
    modality: str, folder: Path, build: Callable[[Path], dict[str, Any]], description: str
) -> Dataset:
    """The dataset in ``folder``, written by ``build`` unless it is there; ``description``
    may name the record's fields."""
    record = written_once(folder, build)
    files = [folder / name for name in record["files"]]
    return Dataset(
        modality,
        MODELS[modality],
        folder,
        files,
        sum(f.stat().st_size for f in files),
        record.get("audio_seconds"),
        description.format(**record),
    )


def image_dataset(data_dir: Path, count: int, work_dir: Path) -> Dataset:
    """``count`` JPEGs: the data's photos in name order, repeated, each with its own comment."""
    folder = work_dir / f"bulk-images-{count}"

    def build(staging: Path) -> dict[str, Any]:
        sources = sorted(
            p for p in (data_dir / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not sources:
            raise FileNotFoundError(f"no images in {data_dir / 'images'}")
        blobs = {source: source.read_bytes() for source in sources}
        names = []
        for index in range(count):
            source = sources[index % len(sources)]
            name = f"{index:05d}-{source.name}"
            (staging / name).write_bytes(unique_copy(blobs[source], index))
            names.append(name)
        return {"files": names, "sources": len(sources)}

    log.info("images: %d distinct files in %s", count, folder)
    return prepared(
        "image",
        folder,
        build,
        "the {sources} photos of data/images in name order, repeated; every copy has its own "
        "JPEG comment segment (distinct bytes, the same pixels)",
    )


def audio_dataset(data_dir: Path, seconds: float, work_dir: Path) -> Dataset:
    """Speech clips in name order until their durations add up to ``seconds``."""
    folder = work_dir / f"bulk-audio-{seconds:g}s"

    def build(staging: Path) -> dict[str, Any]:
        total, names = 0.0, []
        for path in sorted((data_dir / "audio" / "speech").iterdir()):
            if total >= seconds:
                break
            if path.suffix.lower() in AUDIO_SUFFIXES:
                total += sf.info(path).duration
                shutil.copyfile(path, staging / path.name)
                names.append(path.name)
        if total < seconds:
            raise FileNotFoundError(f"only {total:.0f} s of speech in {data_dir}/audio/speech")
        return {"files": names, "audio_seconds": total}

    log.info("audio: %g s of speech clips in %s", seconds, folder)
    return prepared(
        "audio",
        folder,
        build,
        "data/audio/speech clips (24 kHz mono Ogg Vorbis) in name order, unchanged, until "
        "their durations add up to the audio seconds asked for",
    )


# --- child processes ----------------------------------------------------------------------------


def descendants(root: int) -> list[int]:
    """``root`` and every process under it, from the parent ids in /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue += children.get(pid, [])
    return found


def pss_kb(pid: int) -> int:
    """A process's proportional set size (its RSS, each shared page split among its sharers,
    so that a sum over processes counts Ray's shared object store once); 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


class TreeWatcher:
    """A process's own high-water mark, and the highest PSS summed over it and every process
    under it, sampled every TREE_INTERVAL_S on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.own_peak_kb = 0
        self.tree_peak_kb = 0
        self.most_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bulk-tree", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(TREE_INTERVAL_S):
            pids = descendants(self.pid)
            self.tree_peak_kb = max(self.tree_peak_kb, sum(pss_kb(pid) for pid in pids))
            self.most_processes = max(self.most_processes, len(pids))
            self.own_peak_kb = max(
                self.own_peak_kb, ServerProcess(self.pid).status_kb("VmHWM") or 0
            )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def to_json(self) -> dict[str, Any]:
        return {
            "driver_peak_rss_mib": round(self.own_peak_kb / 1024, 1),
            "peak_tree_pss_mib": round(self.tree_peak_kb / 1024, 1),
            "most_processes": self.most_processes,
        }


@dataclass(frozen=True)
class Finished:
    """A child's exit status, life in seconds, peak RSS (wait4) and stdout."""

    returncode: int
    wall_s: float
    peak_rss_mib: float
    stdout: bytes
    tree: dict[str, Any] | None


def run_child(command: list[str], env: dict[str, str], tree: bool = False) -> Finished:
    """Run ``command`` in the repository, its stderr on ours; its peak RSS is the kernel's
    ru_maxrss for it (the larger of its own and of any child it waited for)."""
    log.info("$ %s", " ".join(command))
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, **env}, stdout=out)
        watcher = TreeWatcher(process.pid) if tree else None
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            if watcher:
                watcher.stop()
        wall_s = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        stdout = out.read()
    return Finished(
        process.returncode,
        wall_s,
        usage.ru_maxrss / 1024,  # kB on Linux
        stdout,
        watcher.to_json() if watcher else None,
    )


def failed(finished: Finished, command: list[str]) -> dict[str, Any]:
    log.error("exit status %d: %s", finished.returncode, " ".join(command))
    return {
        "failed": f"exit status {finished.returncode}; its stderr went to this run's stderr",
        "command": command_text(command),
    }


def command_text(command: list[str]) -> str:
    """A child's command as a person would type it."""
    if command[1:3] == ["-m", "app.cli"]:
        return " ".join(["tokserve", *command[3:]])
    return " ".join(["python", *command[1:]])


def rates(dataset: Dataset, items: int, seconds: float) -> dict[str, Any]:
    """items/s, and for audio the seconds of audio per second."""
    rate = items / seconds if seconds > 0 else 0.0
    figures: dict[str, Any] = {"items_per_s": round(rate, 3)}
    if dataset.audio_seconds:
        per_item = dataset.audio_seconds / len(dataset.files)
        figures["audio_s_per_s"] = round(rate * per_item, 1)
    return figures


# --- the phases ---------------------------------------------------------------------------------


def ceiling_phase(dataset: Dataset, args: argparse.Namespace, env: dict[str, str]) -> dict:
    """The in-process engine in a child of its own (``--ceiling``), so its RSS is its own."""
    command = [
        sys.executable,
        "-m",
        "bench.bulk",
        "--ceiling",
        relative(dataset.folder),
        "--model",
        dataset.model,
        "--model-dir",
        relative(args.model_dir),
        *(["--window", str(args.window)] if args.window else []),
    ]
    finished = run_child(command, env)
    if finished.returncode != 0:
        return failed(finished, command)
    lines = finished.stdout.decode().strip().splitlines()
    figures: dict[str, Any] = json.loads(lines[-1])
    return {
        **figures,
        **rates(dataset, figures["items"], figures["seconds"]),
        "wall_s": round(finished.wall_s, 2),
        "peak_rss_mib": round(finished.peak_rss_mib, 1),
    }


def bulk_phase(
    name: str,
    dataset: Dataset,
    args: argparse.Namespace,
    env: dict[str, str],
    extra: list[str],
    tree: bool = False,
    files: list[Path] | None = None,
) -> dict[str, Any]:
    """``tokserve bulk`` on the folder (or on a list of some of its ``files``) into a fresh
    output folder; rates from its manifest."""
    out = args.work_dir / "out" / f"{dataset.modality}-{name}"
    shutil.rmtree(out, ignore_errors=True)
    source = dataset.folder
    if files is not None:
        source = args.work_dir / f"{dataset.modality}-{name}.txt"
        source.write_text("".join(f"{path.resolve()}\n" for path in files))
    files = dataset.files if files is None else files
    command = [
        sys.executable,
        "-m",
        "app.cli",
        "bulk",
        relative(source),
        "--model",
        dataset.model,
        "--out",
        relative(out),
        *extra,
    ]
    finished = run_child(command, env, tree)
    if finished.returncode != 0:
        return failed(finished, command)
    sys.stderr.buffer.write(finished.stdout)
    manifest = json.loads((out / "manifest.json").read_text())
    rows, errors = manifest["counts"]["rows"], manifest["counts"]["errors"]
    if rows != len(files) or errors:
        log.warning("%s: %d rows, %d errors for %d files", name, rows, errors, len(files))
    return {
        "command": command_text(command),
        "version": manifest["version"],
        "rows": rows,
        "errors": errors,
        "seconds": manifest["seconds"],
        **rates(dataset, rows, manifest["seconds"]),
        "wall_s": round(finished.wall_s, 2),
        "items_per_s_wall": round(rows / finished.wall_s, 3),
        "peak_rss_mib": round(finished.peak_rss_mib, 1),
        **(finished.tree or {}),
    }


def http_loop(url: str, dataset: Dataset) -> dict[str, Any]:
    """One file per request, in order, as a user's script posts them; JSON answers parsed."""
    errors, version = 0, None
    route = ROUTES[dataset.modality]
    with httpx.Client(base_url=url, timeout=300.0) as http:
        started = time.perf_counter()
        for path in dataset.files:
            with path.open("rb") as file:
                response = http.post(route, params={"model": dataset.model}, files={"files": file})
            if response.status_code != 200:
                errors += 1
                continue
            answer = response.json()
            version = answer["version"]
            if not answer["items"][0]["tokens"]:
                errors += 1
        seconds = time.perf_counter() - started
    return {
        "code": "httpx.Client().post(route, params={'model': model}, "
        "files={'files': open(path, 'rb')}).json(), one file at a time",
        "version": version,
        "rows": len(dataset.files),
        "errors": errors,
        "seconds": round(seconds, 3),
        **rates(dataset, len(dataset.files), seconds),
    }


def served_phases(
    dataset: Dataset, args: argparse.Namespace, env: dict[str, str]
) -> dict[str, Any]:
    """http_loop and server against one ``tokserve serve`` with only the model, cache off, and
    the server's settings and RSS once ready (``served_by``)."""
    settings = {
        "TOKSERVE_MODELS": dataset.model,
        "TOKSERVE_CACHE_MAX_BYTES": "0",
        "TOKSERVE_LOG_LEVEL": "WARNING",
        "TOKSERVE_DEVICE": args.device,
    }
    found: dict[str, Any] = {}
    log.info("%s: starting tokserve serve", dataset.modality)
    with (
        server_process(args.model_dir, 300.0, **settings) as (process, url),
        RssSampler(process.pid) as sampler,
    ):
        started_mib = round(rss_bytes(process.pid) / MIB, 1)
        found["served_by"] = {"env": settings, "rss_after_start_mib": started_mib}
        for phase in ("http_loop", "server"):
            if phase in args.skip:
                continue
            log.info("%s: %s", dataset.modality, phase)
            sampler.take_peak()
            if phase == "http_loop":
                found[phase] = http_loop(url, dataset)
            else:
                found[phase] = bulk_phase(phase, dataset, args, env, ["--server", url])
            found[phase]["server_peak_rss_mib"] = round(sampler.take_peak() / MIB, 1)
    return found


def ray_phase(
    dataset: Dataset, args: argparse.Namespace, env: dict[str, str]
) -> tuple[dict[str, Any] | None, str | None]:
    """``tokserve bulk --engine ray``, or None and why it did not run."""
    if importlib.util.find_spec("ray") is None:
        return None, "ray is not installed"
    if os.environ.get("RAY_ADDRESS"):
        return None, "RAY_ADDRESS is set: the job would run on that cluster, not this machine"
    return bulk_phase("ray", dataset, args, env, ["--engine", "ray"], tree=True), None


def median_round(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The round with the median items/s, and every round's rate beside it."""
    if not results:
        return None
    ranked = sorted(results, key=lambda r: r.get("items_per_s") or 0.0)
    rates = [r.get("items_per_s") for r in results]
    return {**ranked[len(ranked) // 2], "rounds_items_per_s": rates}


def rate_of(phases: dict[str, Any], phase: str, key: str = "items_per_s") -> float | None:
    figures = phases.get(phase)
    return figures.get(key) if figures else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 3) if numerator and denominator else None


def measure(dataset: Dataset, args: argparse.Namespace) -> dict[str, Any]:
    """Every phase not skipped, in order, and the ratios between them."""
    env = {"TOKSERVE_DEVICE": args.device, "TOKSERVE_LOG_LEVEL": "WARNING"}
    phases: dict[str, Any] = dict.fromkeys(PHASES)
    skipped = {phase: "--skip" for phase in PHASES if phase in args.skip}
    model_dir = ["--model-dir", relative(args.model_dir)]
    rounds: dict[str, list[dict[str, Any]]] = {"ceiling": [], "local": []}
    for number in range(args.rounds):  # interleaved: a busy spell slows both alike
        for phase, results in rounds.items():
            if phase not in args.skip:
                log.info("%s: %s, round %d", dataset.modality, phase, number + 1)
                if phase == "ceiling":
                    results.append(ceiling_phase(dataset, args, env))
                else:
                    results.append(bulk_phase(phase, dataset, args, env, model_dir))
                log.info("%s %s: %s", dataset.modality, phase, json.dumps(results[-1]))
    for phase, results in rounds.items():
        phases[phase] = median_round(results)
    if "local" not in args.skip and "local_tenth" not in args.skip:
        # memory flat however many items: the same job on every tenth file
        sample = dataset.files[::MEMORY_SAMPLE_EVERY]
        phases["local_tenth"] = bulk_phase(
            "local_tenth", dataset, args, env, model_dir, files=sample
        )
    if not {"http_loop", "server"} <= args.skip:
        phases.update(served_phases(dataset, args, env))
    if "ray" not in args.skip:
        log.info("%s: ray", dataset.modality)
        phases["ray"], reason = ray_phase(dataset, args, env)
        if reason:
            skipped["ray"] = reason
    local = rate_of(phases, "local")
    per_round = [
        ratio(ours.get("items_per_s"), best.get("items_per_s"))
        for ours, best in zip(rounds["local"], rounds["ceiling"], strict=False)
    ]
    known = sorted(r for r in per_round if r is not None)
    ratios = {
        # the median of each round's ratio: the two ran back to back, on the same machine state
        "local_over_ceiling": known[len(known) // 2] if known else None,
        "local_over_ceiling_rounds": per_round,
        "local_wall_over_ceiling": ratio(
            rate_of(phases, "local", "items_per_s_wall"), rate_of(phases, "ceiling")
        ),
        "local_over_http_loop": ratio(local, rate_of(phases, "http_loop")),
        "server_over_http_loop": ratio(rate_of(phases, "server"), rate_of(phases, "http_loop")),
        "server_over_local": ratio(rate_of(phases, "server"), local),
        "ray_over_local": ratio(rate_of(phases, "ray"), local),
        "local_peak_rss_over_tenth": ratio(
            rate_of(phases, "local", "peak_rss_mib"), rate_of(phases, "local_tenth", "peak_rss_mib")
        ),
    }
    value = ratios["local_over_ceiling"]
    met = None if value is None else value >= GOAL_LOCAL_OVER_CEILING
    return {
        **dataset.to_json(),
        **phases,
        "skipped": skipped,
        "ratios": ratios,
        "goals": {"local_over_ceiling": goal(value, f">= {GOAL_LOCAL_OVER_CEILING}", met)},
    }


def model_versions(results: dict[str, Any]) -> dict[str, Any]:
    """Each model's version string as the phases reported it (a list if they disagree)."""
    versions: dict[str, Any] = {}
    for modality in MODALITIES:
        if modality not in results:
            continue
        seen = sorted(
            {
                figures["version"]
                for figures in (results[modality].get(phase) for phase in PHASES)
                if figures and "version" in figures
            }
        )
        versions[MODELS[modality]] = seen[0] if len(seen) == 1 else seen or None
    return versions


METHOD = {
    "ceiling": "bench.bulk --ceiling in a child: Engine.build + start (warm-up) with the cache "
    "off, every file's bytes read into memory first, then every item submitted one per "
    "encode call with at most `window` calls in flight; items / (first call to last answer)",
    "local": "tokserve bulk --engine local as a child; items_per_s = rows / manifest seconds "
    "(the job after the model is loaded: plan, read, tokenize, write Parquet); "
    "items_per_s_wall = rows / the child's whole life (start-up, model load, warm-up included)",
    "http_loop": "a sequential httpx loop in the benchmark process, one multipart file per "
    "request, JSON answers parsed, against tokserve serve (only the model, memory cache off); "
    "items / loop time (the server was started and ready before)",
    "server": "tokserve bulk --server URL as a child against the same server; rates as local",
    "ray": "tokserve bulk --engine ray as a child, a local Ray of its own; rates as local",
    "rss": "peak_rss_mib: the child's ru_maxrss from os.wait4; server_peak_rss_mib: the "
    "server's VmRSS sampled every 20 ms during that phase; ray: also the driver's own VmHWM "
    "(driver_peak_rss_mib) and the highest PSS summed over it and every process under it "
    "(peak_tree_pss_mib: raylet, GCS, workers; shared pages counted once), sampled every 0.5 s",
    "allocator": "glibc's default in every process",
}


# --- the ceiling's own process ------------------------------------------------------------------


async def ceiling(folder: Path, model: str, model_dir: Path, window: int | None) -> dict:
    """The engine alone: every item of ``folder`` from memory, ``window`` calls in flight."""
    from app.bulk.inputs import Inputs
    from app.config import Settings
    from app.engine import Engine
    from app.errors import ProblemError

    settings = Settings(models=[model], model_dir=[str(model_dir)], cache_max_bytes=0)
    engine = Engine.build(settings)
    await engine.start()
    try:
        loaded = engine.endpoints[model].model
        description = loaded.describe()
        modality = description["modality"]
        plan = Inputs([str(folder)], modality).plan()
        blobs = [Path(item.locator.path).read_bytes() for item in plan]
        window = window or CEILING_WINDOW_BATCHES * loaded.serving.max_batch_size
        gate = asyncio.Semaphore(window)
        encode = engine.encode_images if modality == "image" else engine.encode_audio

        async def one(blob: bytes) -> Any:
            async with gate:
                try:
                    answer = await encode([blob], model)
                except ProblemError as exc:
                    return exc
            return answer.items[0]

        started = time.perf_counter()
        results = await asyncio.gather(*(one(blob) for blob in blobs))
        seconds = time.perf_counter() - started
    finally:
        await engine.stop()
    return {
        "version": description["version"],
        "max_batch_size": loaded.serving.max_batch_size,
        "window": window,
        "media_threads": engine.media_pool._max_workers,
        "items": len(results),
        "errors": sum(isinstance(r, ProblemError) for r in results),
        "seconds": round(seconds, 3),
    }


# --- the run ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.bulk", description=__doc__)
    parser.add_argument("--images", type=int, default=1000, help="distinct image files")
    parser.add_argument("--audio-seconds", type=float, default=3600.0, help="of speech clips")
    parser.add_argument(
        "--skip",
        default="",
        help=f"comma-separated phases or modalities to leave out: {','.join(PHASES + MODALITIES)}",
    )
    parser.add_argument("--window", type=int, help="ceiling: calls in flight (4 batches)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="ceiling and local, interleaved; medians reported"
    )
    parser.add_argument("--device", default="auto", help="TOKSERVE_DEVICE of every process")
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="inputs and outputs")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--ceiling", type=Path, help=argparse.SUPPRESS)  # the child's mode
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    unknown = args.skip - set(PHASES + MODALITIES)
    if unknown:
        parser.error(f"unknown --skip {sorted(unknown)}; choose from {PHASES + MODALITIES}")
    return args


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Prepare the inputs, measure each modality, and build the results document."""
    contention = machine.Contention()
    started = time.perf_counter()
    datasets = []
    if "image" not in args.skip:
        datasets.append(image_dataset(args.data_dir, args.images, args.work_dir))
    if "audio" not in args.skip:
        datasets.append(audio_dataset(args.data_dir, args.audio_seconds, args.work_dir))
    results: dict[str, Any] = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": ["python", "-m", "bench.bulk", *argv],
    }
    measured = {dataset.modality: measure(dataset, args) for dataset in datasets}
    return {
        **results,
        "machine": machine.describe(args.device) | contention.report(),
        "models": model_versions(measured),
        "method": METHOD,
        **measured,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure; print the results JSON on stdout (and write --out), progress on stderr. In
    ``--ceiling`` mode (a child of the run), the ceiling's figures as one line of JSON."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    if args.ceiling:
        figures = asyncio.run(ceiling(args.ceiling, args.model, args.model_dir, args.window))
        sys.stdout.write(json.dumps(figures) + "\n")
        return 0
    results = run(args, argv)
    emit(results, args.out)
    phases = (results.get(m, {}).get(p) for m in MODALITIES for p in PHASES)
    return 1 if any(figures and "failed" in figures for figures in phases) else 0


if __name__ == "__main__":
    raise SystemExit(main())
