"""helm lint and helm template of the chart, each rendered manifest validated against the
Kubernetes schemas (kubernetes-validate) and custom resources against their CRDs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_testkit import CHART, run_helm

K8S_VERSION = "1.37.0"

VARIANTS: dict[str, list[str]] = {
    "default": [],
    "gpu": ["--set", "worker.variant=gpu"],
    "external-redis": [
        "--set", "redis.enabled=false",
        "--set", "redis.external.url=redis://:secret@redis.example:6379/0",
    ],
    "external-redis-secret": [
        "--set", "redis.enabled=false",
        "--set", "redis.external.urlSecret.name=redis-url",
    ],
    "no-network-policy": ["--set", "networkPolicy.enabled=false"],
    "cluster-wide": ["--set", "operator.clusterWide=true", "--set", "servingSlo.create=false"],
}  # fmt: skip


def render(helm: Path, *args: str) -> list[dict[str, Any]]:
    out = run_helm(helm, "template", "rel", str(CHART), "--namespace", "serving", *args)
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    schemas = {}
    for path in (CHART / "crds").glob("*.yaml"):
        for crd in yaml.safe_load_all(path.read_text()):
            for version in crd["spec"]["versions"]:
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lint_strict(helm: Path, variant: str) -> None:
    out = run_helm(helm, "lint", "--strict", str(CHART), *VARIANTS[variant])
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_manifest_is_valid(helm: Path, variant: str) -> None:
    docs = render(helm, "--include-crds", *VARIANTS[variant])
    custom = crd_schemas()
    assert len(docs) > 10
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if key in custom:  # kubernetes-validate only warns on custom resources
            jsonschema.Draft4Validator(custom[key]).validate(doc)
        else:
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{variant}: {where} is invalid: {e.message} at {list(e.path)}")


def test_pods_are_locked_down(helm: Path) -> None:
    docs = render(helm, *VARIANTS["default"])
    workloads = {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}
    assert set(workloads) == {
        "rel-layerkv-operator",
        "rel-layerkv-admission",
        "rel-layerkv-worker",
        "rel-layerkv-redis",
    }
    for name, workload in workloads.items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken", True) is (name == "rel-layerkv-operator")
        for container in pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["capabilities"]["drop"] == ["ALL"], name
            assert container["resources"]["requests"], name
            assert container["livenessProbe"], name


def test_grpc_probes_and_operator_owned_worker_count(helm: Path) -> None:
    docs = render(helm)
    deployments = by_kind(docs, "Deployment")
    worker = deployments["rel-layerkv-worker"]
    assert "replicas" not in worker["spec"]  # owned by the operator, not by helm upgrade
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50061
    (admission,) = deployments["rel-layerkv-admission"]["spec"]["template"]["spec"]["containers"]
    assert admission["readinessProbe"]["grpc"]["port"] == 50051
    env = {e["name"]: e for e in admission["env"]}
    assert env["LAYERKV_WORKERS"]["value"] == (
        "dns:///rel-layerkv-worker-headless.serving.svc.cluster.local:50061"
    )
    assert env["LAYERKV_WORKER_POOL"]["value"] == "rel-layerkv-worker"
    assert env["LAYERKV_REDIS_URL"]["value"].startswith("redis://:$(LAYERKV_REDIS_PASSWORD)@")
    headless = by_kind(docs, "Service")["rel-layerkv-worker-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    (slo,) = by_kind(docs, "ServingSLO").values()
    assert slo["spec"]["workerDeployment"] == "rel-layerkv-worker"


def test_gpu_variant_requests_gpus_and_uses_the_gpu_image(helm: Path) -> None:
    cpu = by_kind(render(helm), "Deployment")["rel-layerkv-worker"]
    gpu = by_kind(render(helm, *VARIANTS["gpu"]), "Deployment")["rel-layerkv-worker"]
    (cpu_c,) = cpu["spec"]["template"]["spec"]["containers"]
    (gpu_c,) = gpu["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in cpu_c["resources"].get("limits", {})
    assert gpu_c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "/worker-gpu:" in gpu_c["image"] and "/worker:" in cpu_c["image"]
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["spec"]["template"]["spec"]["tolerations"])


def test_redis_internal_with_auth_or_external(helm: Path) -> None:
    internal = render(helm)
    (redis,) = by_kind(internal, "StatefulSet").values()
    command = redis["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--requirepass" in command
    assert "redis-password" in by_kind(internal, "Secret")["rel-layerkv-redis"]["data"]

    external = render(helm, *VARIANTS["external-redis"])
    assert not by_kind(external, "StatefulSet") and not by_kind(external, "Secret")
    (operator,) = by_kind(external, "Deployment")["rel-layerkv-operator"]["spec"]["template"][
        "spec"
    ]["containers"]
    env = {e["name"]: e for e in operator["env"]}
    assert env["LAYERKV_REDIS_URL"]["value"] == "redis://:secret@redis.example:6379/0"


def test_external_redis_needs_a_url(helm: Path) -> None:
    import subprocess

    done = subprocess.run(
        [str(helm), "template", "rel", str(CHART), "--set", "redis.enabled=false"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "redis.external.url" in done.stderr


def test_network_policies_only_when_enabled(helm: Path) -> None:
    on = by_kind(render(helm), "NetworkPolicy")
    off = by_kind(render(helm, *VARIANTS["no-network-policy"]), "NetworkPolicy")
    assert set(on) == {
        "rel-layerkv-worker",
        "rel-layerkv-admission",
        "rel-layerkv-operator",
        "rel-layerkv-redis",
    }
    assert off == {}
    worker_grpc = on["rel-layerkv-worker"]["spec"]["ingress"][0]
    assert (
        worker_grpc["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        == "admission"
    )
    # The operator only lets scrapers reach its metrics port.
    (operator_rule,) = on["rel-layerkv-operator"]["spec"]["ingress"]
    assert operator_rule["ports"] == [{"port": 9092}]


@pytest.mark.parametrize("variant", ["default", "cluster-wide"])
def test_operator_rbac_is_least_privilege(helm: Path, variant: str) -> None:
    docs = render(helm, *VARIANTS[variant])
    kind = "ClusterRole" if variant == "cluster-wide" else "Role"
    (role,) = by_kind(docs, kind).values()
    grants = {
        (group, resource): sorted(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    peering = "clusterkopfpeerings" if variant == "cluster-wide" else "kopfpeerings"
    expected = {
        ("layerkv.io", "servingslos"): ["get", "list", "patch", "watch"],
        ("layerkv.io", "servingslos/status"): ["get", "patch"],
        ("apps", "deployments"): ["get"],
        ("apps", "deployments/scale"): ["patch"],
        ("", "events"): ["create"],
        ("kopf.dev", peering): ["get", "list", "patch", "watch"],
    }
    if variant == "cluster-wide":
        expected[("apiextensions.k8s.io", "customresourcedefinitions")] = ["list", "watch"]
    assert grants == expected
    assert not any("*" in verbs for verbs in grants.values())
    (binding,) = by_kind(docs, f"{kind}Binding").values()
    assert binding["subjects"][0]["name"] == "rel-layerkv-operator"
