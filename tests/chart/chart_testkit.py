"""Paths and the helm runner for the chart tests (helm is fetched by the Makefile)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts/layerkv"
HELM = REPO / ".tools/helm"
CRD = CHART / "crds/servingslos.layerkv.io.yaml"


def run_helm(helm: Path, *args: str) -> str:
    done = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"helm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout
