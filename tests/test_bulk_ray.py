"""The Ray bulk engine on a real Ray cluster: ``tokserve bulk --engine ray`` writes the shards
the local engine writes, row for row and byte for byte; TokenizeBatch works in a Ray Data
pipeline of one's own; and k8s/bulk's RayJob runs a command tokserve accepts on the images the
Deployment runs.

One cluster (``ray start --head``, 2 CPUs) serves the whole module: starting Ray is most of
its time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from app.cli import build_parser, main
from tests.support import REPO_ROOT, SHARED_DATA
from tests.test_deploy import K8S, K8S_VERSIONS, find, kustomize_build, pod_spec

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

IMAGES = sorted((SHARED_DATA / "images").glob("*.jpg"))[:12]
CLIPS = sorted((SHARED_DATA / "audio" / "speech").glob("*.ogg"))[:4]
ROWS_PER_SHARD = 5
RAYJOB = K8S / "bulk" / "rayjob.yaml"
# The cluster and its drivers: offline, and without token authentication, which would make
# them share a token file in ~/.ray with every other Ray user of the machine.
RAY_ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A one-node Ray cluster of 2 CPUs on free ports (others may run Ray on this machine),
    killed afterwards."""
    # a short folder: Ray's socket paths must fit in 107 characters
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    port, dashboard, agent, agent_grpc, runtime_env, metrics = free_ports(6)
    log = temp / "start.log"
    command = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus=2",
        "--object-store-memory=200000000",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
        f"--port={port}",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}",
    ]
    with log.open("w") as output:
        head = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=RAY_ENV, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None, f"ray start failed:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"ray start hangs:\n{log.read_text()}"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(head, temp)
        shutil.rmtree(temp, ignore_errors=True)


def _stop(head: subprocess.Popen[bytes], temp: Path) -> None:
    """Kill the cluster: ``ray start``'s process group, then the workers, which Ray starts in
    sessions of their own (each holds its log files under ``temp``). ``ray stop`` would stop
    every Ray cluster on the machine."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait()
    for pid in _holding_files_in(temp):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _holding_files_in(folder: Path) -> list[int]:
    found = []
    for process in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if process.name.isdigit() and any(
                os.readlink(fd).startswith(f"{folder}/") for fd in (process / "fd").iterdir()
            ):
                found.append(int(process.name))
    return found


def run_both(address: str, inputs: Path, out: Path, *options: str) -> tuple[Path, Path]:
    """The same job through the local engine (in this process) and through Ray (``tokserve
    bulk --engine ray`` in a process of its own, as a user runs it); their output folders."""
    assert main(["bulk", str(inputs), "--out", str(out / "local"), *options]) == 0
    command = [sys.executable, "-m", "app.cli", "bulk", str(inputs), "--out", str(out / "ray")]
    command += [*options, "--engine", "ray", "--ray-address", address]
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=RAY_ENV, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    return out / "local", out / "ray"


def assert_same_job(local: Path, remote: Path) -> None:
    """The same shards: every row and column, then counts, names, rows, errors and bytes."""
    expected = json.loads((local / "manifest.json").read_text())
    found = json.loads((remote / "manifest.json").read_text())
    for shard in expected["shards"]:
        want, got = pq.read_table(local / shard["name"]), pq.read_table(remote / shard["name"])
        assert got.schema == want.schema
        for column in want.column_names:
            assert got.column(column).to_pylist() == want.column(column).to_pylist(), column
    assert found["options"]["engine"] == "ray"
    assert found["counts"] == expected["counts"]
    assert found["shards"] == expected["shards"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 photos and a file that is not an image, named to come last."""
    folder = tmp_path_factory.mktemp("photos")
    for path in IMAGES:
        shutil.copy(path, folder / path.name)
    (folder / "zz-corrupt.jpg").write_bytes(b"not a JPEG at all")
    return folder


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 speech clips and a WAV that is noise."""
    folder = tmp_path_factory.mktemp("clips")
    for path in CLIPS:
        shutil.copy(path, folder / path.name)
    (folder / "zz-corrupt.wav").write_bytes(os.urandom(300))
    return folder


@pytest.fixture(scope="module")
def photo_jobs(
    ray_address: str, photos: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """The photos through both engines, in shards of 5 rows."""
    out = tmp_path_factory.mktemp("photo-jobs")
    options = ("--model", "image-fsq-256", "--rows-per-shard", str(ROWS_PER_SHARD))
    return run_both(ray_address, photos, out, *options)


def test_ray_engine_writes_the_local_engines_image_shards(photo_jobs):
    local, remote = photo_jobs
    assert_same_job(local, remote)
    manifest = json.loads((remote / "manifest.json").read_text())
    assert manifest["counts"] == {"rows": 13, "errors": 1}
    assert [s["rows"] for s in manifest["shards"]] == [5, 5, 3]
    last = pq.read_table(remote / "part-00002.parquet").to_pylist()[-1]
    assert last["id"] == "zz-corrupt.jpg" and last["tokens"] is None
    assert last["error"]["status"] == 415


def test_ray_engine_writes_the_local_engines_audio_shards(ray_address, clips, tmp_path):
    options = ("--model", "audio-rvq-24k", "--rows-per-shard", "3")
    local, remote = run_both(ray_address, clips, tmp_path, *options)
    assert_same_job(local, remote)
    manifest = json.loads((remote / "manifest.json").read_text())
    assert manifest["counts"] == {"rows": 5, "errors": 1}
    assert [s["rows"] for s in manifest["shards"]] == [3, 2]


@pytest.mark.parametrize(
    ("model", "inputs"), [("image-fsq-256", "photos"), ("audio-rvq-24k", "clips")]
)
async def test_rows_through_ray_are_the_local_engines_rows_exactly(model, inputs, request):
    """Every row dict, as the shard writers get them: keys in order, tokens' dtype and shape,
    figures the Parquet schema leaves out (audio's sample_rate, which WebDataset keeps)."""
    from app.bulk.batch import TokenizeBatch
    from app.bulk.inputs import Inputs
    from app.bulk.job import BulkOptions, drive
    from app.bulk.local import LocalTokenizer
    from app.bulk.ray_engine import _plan_block, _read, _rows
    from app.tokens import token_dtype

    folder = request.getfixturevalue(inputs)
    options = BulkOptions(inputs=[str(folder)], out=folder, model=model)
    tokenizer = await LocalTokenizer.open(options)
    try:
        plan = Inputs(options.inputs, tokenizer.model["modality"]).plan()
        expected = [r async for rows in drive(tokenizer, plan) for r in rows]
    finally:
        await tokenizer.close()
    items = list(Inputs(options.inputs, tokenizer.model["modality"]).plan())
    tokenize = TokenizeBatch(model)
    try:
        batch = tokenize(_read(_plan_block(items)))
    finally:
        tokenize.close()
    found = _rows(batch, tokenizer.model, token_dtype(tokenizer.model["vocab_size"]))
    assert len(found) == len(expected) == len(items)
    for got, want in zip(found, expected, strict=True):
        assert list(got) == list(want)
        if want["tokens"] is None:
            assert got == want
            continue
        assert got["tokens"].dtype == want["tokens"].dtype
        assert got["tokens"].shape == want["tokens"].shape
        assert (got["tokens"] == want["tokens"]).all()
        assert {**got, "tokens": None} == {**want, "tokens": None}
    assert found[-1]["error"] is not None


def test_tokenize_batch_in_a_pipeline_of_ones_own(ray_address, photos, photo_jobs, monkeypatch):
    from app.bulk import TokenizeBatch

    local, _ = photo_jobs
    expected = {
        r["id"]: r
        for n in range(3)
        for r in pq.read_table(local / f"part-0000{n}.parquet").to_pylist()
    }
    names = ["zz-corrupt.jpg", *(p.name for p in IMAGES[:5])]
    monkeypatch.setenv("RAY_AUTH_MODE", RAY_ENV["RAY_AUTH_MODE"])
    ray.init(address=ray_address, log_to_driver=False)
    try:
        dataset = ray.data.from_items(
            [{"name": name, "bytes": (photos / name).read_bytes()} for name in names]
        ).map_batches(
            TokenizeBatch,
            fn_constructor_kwargs={"model": "image-fsq-256"},
            compute=ray.data.ActorPoolStrategy(size=1),
            batch_size=4,
        )
        rows = sorted(dataset.take_all(), key=lambda r: names.index(r["name"]))
    finally:
        ray.shutdown()
    assert [r["name"] for r in rows] == names
    for found in rows:
        want = expected[found["name"]]
        assert "bytes" not in found
        assert found["version"] == want["version"]
        assert found["error"] == want["error"]
        if want["error"] is None:
            assert list(found["tokens"]) == want["tokens"]
            assert list(found["shape"]) == want["shape"] == [32, 32]
            figures = json.loads(found["figures"])
            assert {k: figures[k] for k in ("source_size", "crop_box", "content_box")} == {
                k: want[k] for k in ("source_size", "crop_box", "content_box")
            }
        else:
            assert found["tokens"] is None and found["figures"] is None


def test_a_worker_with_another_model_version_stops_the_job():
    from app.bulk.ray_engine import _rows
    from app.bulk.remote import ModelChanged
    from app.tokens import token_dtype

    table = pa.table(
        {
            "index": [0],
            "id": ["a.jpg"],
            "locator": [{"kind": "file", "path": "a.jpg", "group": 0, "row": 0, "column": ""}],
            "version": ["v2"],
            "figures": ["{}"],
            "shape": pa.array([[1, 1]], pa.list_(pa.int32())),
            "error": pa.array([None], pa.struct([("status", pa.int32())])),
            "tokens": pa.array([[7]], pa.list_(pa.uint16())),
        }
    )
    model = {"name": "m", "version": "v1", "vocab_size": 10}
    with pytest.raises(ModelChanged, match="version v2; this job uses version v1"):
        _rows(table, model, token_dtype(10))


# --------------------------------------------------------------------------------------------
# k8s/bulk: the RayJob


# The fields of KubeRay's ray.io/v1 RayJob that k8s/bulk uses, which kubernetes-validate has no
# schema for (ray-operator/apis/ray/v1/rayjob_types.go, raycluster_types.go).
RAYJOB_FIELDS = {
    "entrypoint",
    "backoffLimit",
    "shutdownAfterJobFinishes",
    "ttlSecondsAfterFinished",
    "submitterPodTemplate",
    "rayClusterSpec",
}
CLUSTER_FIELDS = {"rayVersion", "headGroupSpec", "workerGroupSpecs"}
HEAD_FIELDS = {"rayStartParams", "template"}
WORKER_FIELDS = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "rayStartParams",
    "template",
}


def rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def ray_pods(job: dict) -> dict[str, dict]:
    """The RayJob's pod templates by role: head, each worker group, the submitter."""
    cluster = job["spec"]["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster["workerGroupSpecs"]:
        pods[group["groupName"]] = group["template"]
    pods["submitter"] = job["spec"]["submitterPodTemplate"]
    return pods


def test_rayjob_uses_only_fields_kuberay_knows():
    job = rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert set(job["spec"]) <= RAYJOB_FIELDS
    cluster = job["spec"]["rayClusterSpec"]
    assert set(cluster) <= CLUSTER_FIELDS
    assert set(cluster["headGroupSpec"]) == HEAD_FIELDS
    for group in cluster["workerGroupSpecs"]:
        assert set(group) == WORKER_FIELDS
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    assert all(isinstance(v, str) for v in cluster["headGroupSpec"]["rayStartParams"].values())


def test_rayjob_runs_a_bulk_command_tokserve_accepts():
    job = rayjob()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "tokserve"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "bulk" and args.engine == "ray"
    assert args.resume, "a rerun of the job continues it"
    assert (REPO_ROOT / "models" / args.model).is_dir(), "the image ships the model"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] > 0


def test_rayjob_runs_the_deployments_cuda_image_with_a_gpu_per_worker():
    server = pod_spec(find(kustomize_build(K8S / "overlays/gpu"), "Deployment", "tokserve"))
    [deployed] = server["containers"]
    pods = ray_pods(rayjob())
    for role, template in pods.items():
        for container in template["spec"]["containers"]:
            assert container["image"] == deployed["image"], role
    workers = [t for role, t in pods.items() if role not in ("head", "submitter")]
    assert workers
    for template in workers:
        [container] = template["spec"]["containers"]
        assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
        assert str(container["resources"]["requests"].get("nvidia.com/gpu", "1")) == "1"
    for role in ("head", "submitter"):
        for container in pods[role]["spec"]["containers"]:
            assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})


def test_rayjob_pods_are_valid_restricted_and_outside_the_servers_network_policy():
    job = rayjob()
    base = kustomize_build(K8S / "base")
    policy = find(base, "NetworkPolicy", "tokserve")["spec"]["podSelector"]["matchLabels"]
    for role, template in ray_pods(job).items():
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"tokserve-bulk-{role}", **template.get("metadata", {})},
            "spec": template["spec"],
        }
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(pod, version, strict=True)
        # the namespace enforces the restricted Pod Security Standard
        security = template["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["seccompProfile"]["type"] == "RuntimeDefault"
        for container in template["spec"]["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
        # the server's policy would cut the Ray pods off from each other
        labels = template.get("metadata", {}).get("labels", {})
        assert not policy.items() <= labels.items(), role
        # the Service tokserve's link variables would set TOKSERVE_PORT=tcp://...
        assert template["spec"]["enableServiceLinks"] is False, role
    assert job["metadata"]["namespace"] == "tokserve"


def test_rayjob_volumes_are_claims_that_k8s_bulk_defines():
    claims = [doc for doc in yaml.safe_load_all((K8S / "bulk" / "pvc.yaml").read_text()) if doc]
    for claim in claims:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(claim, version, strict=True)
    names = {claim["metadata"]["name"] for claim in claims}
    for template in ray_pods(rayjob()).values():
        for volume in template["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in names
