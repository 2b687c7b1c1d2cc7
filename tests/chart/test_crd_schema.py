"""The ServingSLO CRD: its schema accepts the example and rejects nonsense, its defaults
match the operator's, and the printer columns show what the issue asks for."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
from chart_testkit import CHART, run_helm

from layerkv_operator.spec import DEFAULTS, InvalidSpec, parse_spec

VALID: dict[str, Any] = {
    "apiVersion": "layerkv.io/v1alpha1",
    "kind": "ServingSLO",
    "metadata": {"name": "chat"},
    "spec": {
        "workerDeployment": "chat-worker",
        "ttftMs": 2000,
        "tpotMs": 100,
        "percentile": 95,
        "maxViolationRate": 0.05,
        "windowSeconds": 60,
        "minReplicas": 1,
        "maxReplicas": 8,
    },
}


def with_spec(**changes: Any) -> dict[str, Any]:
    cr = copy.deepcopy(VALID)
    for key, value in changes.items():
        if value is None:
            del cr["spec"][key]
        else:
            cr["spec"][key] = value
    return cr


INVALID: dict[str, dict[str, Any]] = {
    "no spec": {k: v for k, v in VALID.items() if k != "spec"},
    "no workerDeployment": with_spec(workerDeployment=None),
    "no ttftMs": with_spec(ttftMs=None),
    "no maxReplicas": with_spec(maxReplicas=None),
    "ttft zero": with_spec(ttftMs=0),
    "ttft negative": with_spec(ttftMs=-5),
    "ttft a string": with_spec(ttftMs="fast"),
    "tpot fractional": with_spec(tpotMs=1.5),
    "budget above 1": with_spec(maxViolationRate=1.5),
    "budget negative": with_spec(maxViolationRate=-0.1),
    "percentile 100": with_spec(percentile=100),
    "percentile 10": with_spec(percentile=10),
    "window too short": with_spec(windowSeconds=1),
    "window too long": with_spec(windowSeconds=86400),
    "zero min replicas": with_spec(minReplicas=0),
    "huge max replicas": with_spec(maxReplicas=100000),
    "deployment not a DNS name": with_spec(workerDeployment="Chat_Worker"),
    "class not a DNS label": with_spec(sloClass="Chat!"),
    "unknown field": with_spec(ttft=2000),
    "scaleUp step zero": with_spec(scaleUp={"maxStep": 0}),
    "scaleUp unknown field": with_spec(scaleUp={"cooldown": 5}),
    "scaleDown fraction zero": with_spec(scaleDown={"violationRateFraction": 0}),
    "scaleDown fraction too close to budget": with_spec(scaleDown={"violationRateFraction": 0.9}),
    "negative cooldown": with_spec(scaleDown={"cooldownSeconds": -1}),
}


def validator(schema: dict[str, Any]) -> jsonschema.Draft4Validator:
    # CRD schemas are OpenAPI v3.0 (boolean exclusiveMinimum): JSON Schema draft 4.
    return jsonschema.Draft4Validator(schema)


def test_example_is_accepted(slo_schema: dict[str, Any]) -> None:
    validator(slo_schema).validate(VALID)
    assert parse_spec(VALID["spec"], "chat").policy.max_replicas == 8


@pytest.mark.parametrize("name", sorted(INVALID))
def test_nonsense_is_rejected(slo_schema: dict[str, Any], name: str) -> None:
    errors = list(validator(slo_schema).iter_errors(INVALID[name]))
    assert errors, f"{name!r} was accepted"


def test_min_above_max_is_rejected_by_a_cel_rule_and_by_the_operator(
    slo_schema: dict[str, Any],
) -> None:
    # jsonschema cannot evaluate CEL; check the rule is declared, and that the operator
    # (which must cope with servers that skip it) refuses the spec too.
    rules = slo_schema["properties"]["spec"]["x-kubernetes-validations"]
    assert any("self.minReplicas <= self.maxReplicas" in r["rule"] for r in rules)
    with pytest.raises(InvalidSpec, match="minReplicas"):
        parse_spec(with_spec(minReplicas=5, maxReplicas=2)["spec"], "chat")


def test_crd_defaults_are_the_operator_defaults(slo_schema: dict[str, Any]) -> None:
    props = slo_schema["properties"]["spec"]["properties"]

    def crd_defaults(properties: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, prop in properties.items():
            if "properties" in prop:
                out[key] = crd_defaults(prop["properties"])
            elif "default" in prop:
                out[key] = prop["default"]
        return out

    assert crd_defaults(props) == DEFAULTS
    parsed = parse_spec(
        {"workerDeployment": "w", "ttftMs": 500, "tpotMs": 50, "maxReplicas": 3}, "x"
    )
    assert parsed.policy.scale_down_cooldown_s == DEFAULTS["scaleDown"]["cooldownSeconds"]
    assert parsed.target.percentile == DEFAULTS["percentile"]


def test_status_subresource_printer_columns_and_short_name(crd: dict[str, Any]) -> None:
    (version,) = crd["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    assert "slo" in crd["spec"]["names"]["shortNames"]
    columns = {c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert {
        ".spec.ttftMs",
        ".spec.tpotMs",
        ".status.violationRate",
        ".status.ttftPercentileMs",
        ".status.replicas",
    } <= columns


def test_chart_example_servingslo_is_valid(helm: Any, slo_schema: dict[str, Any]) -> None:
    import yaml

    out = run_helm(helm, "template", "rel", str(CHART), "--show-only", "templates/servingslo.yaml")
    (cr,) = [d for d in yaml.safe_load_all(out) if d]
    validator(slo_schema).validate(cr)
    parse_spec(cr["spec"], cr["metadata"]["name"])
