"""Chart tests run the real helm binary the Makefile fetches into <repo>/.tools."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from chart_testkit import CRD, HELM


@pytest.fixture(scope="session")
def helm() -> Path:
    if not HELM.is_file():
        pytest.fail(
            f"helm not found at {HELM}: run `make tools` (or `make test`, which fetches it)",
            pytrace=False,
        )
    return HELM


@pytest.fixture(scope="session")
def crd() -> dict:
    return yaml.safe_load(CRD.read_text())


@pytest.fixture(scope="session")
def slo_schema(crd: dict) -> dict:
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]
