"""``layerkv.policy`` is the pure home of every decision: importing all of it loads none
of the heavy or I/O libraries, and does no I/O (checked in a fresh interpreter, with
an audit hook watching files, sockets and processes)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import layerkv.policy

SOURCES = str(Path(layerkv.policy.__file__).parents[2])  # services/
FORBIDDEN = ("vllm", "torch", "grpc", "redis", "kopf", "kubernetes", "prometheus_client")

PROBE = r"""
import importlib, json, sys

events = []
allowed_roots = tuple(p for p in sys.path if p) + (SOURCES,)  # module code

def hook(event, args):
    if event == "open":
        path, mode = str(args[0]), str(args[1] or "r")
        reads_code = path.endswith((".py", ".pyc", ".pth", ".so")) or "__pycache__" in path
        if any(c in mode for c in "wax+") or not (reads_code and path.startswith(allowed_roots)):
            events.append(f"open {path} {mode}")
    elif event.startswith(("socket.", "subprocess.", "os.system", "os.exec", "os.spawn")):
        events.append(event)

sys.addaudithook(hook)
for name in NAMES:
    importlib.import_module(name)
loaded = sorted({m.split(".")[0] for m in sys.modules})
print(json.dumps({"loaded": loaded, "io": events}))
"""


def policy_modules() -> list[str]:
    path = Path(layerkv.policy.__file__).parent
    return [f"layerkv.policy.{m.name}" for m in pkgutil.iter_modules([str(path)])]


def test_every_policy_module_is_pure():
    names = policy_modules()
    assert {"layerkv.policy.residency", "layerkv.policy.ttft", "layerkv.policy.scaling"} <= set(
        names
    )
    out = subprocess.run(
        [sys.executable, "-c", f"NAMES = {names!r}\nSOURCES = {SOURCES!r}\n{PROBE}"],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    heavy = [m for m in FORBIDDEN if m in result["loaded"]]
    assert heavy == [], f"layerkv.policy imports {heavy}"
    assert result["io"] == [], result["io"]
