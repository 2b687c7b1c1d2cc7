"""The local stack's CPU confinement of worker processes (a pod's cpuset, locally)."""

from __future__ import annotations

import os
import sys

import pytest

from layerkv.tools import local_stack


def test_parse_cpus():
    assert local_stack.parse_cpus("0,2-3") == {0, 2, 3}
    assert local_stack.parse_cpus("1") == {1}
    assert local_stack.parse_cpus(None) is None
    assert local_stack.parse_cpus("") is None


def test_a_spawned_process_and_its_children_keep_to_the_given_cpus(tmp_path):
    cpu = max(os.sched_getaffinity(0))
    # The child starts a grandchild, as a worker starts its engine processes.
    code = (
        "import os, subprocess, sys; print(sorted(os.sched_getaffinity(0)), flush=True); "
        "subprocess.run([sys.executable, '-c', "
        "'import os; print(sorted(os.sched_getaffinity(0)))'])"
    )
    proc = local_stack._spawn("affinity", [sys.executable, "-c", code], tmp_path, cpus={cpu})
    assert proc.popen.wait(30) == 0
    assert proc.log_tail().splitlines() == [str([cpu]), str([cpu])]


def test_unconfined_without_cpus(tmp_path):
    proc = local_stack._spawn(
        "free", [sys.executable, "-c", "import os; print(len(os.sched_getaffinity(0)))"], tmp_path
    )
    assert proc.popen.wait(30) == 0
    assert proc.log_tail().strip() == str(len(os.sched_getaffinity(0)))


@pytest.mark.parametrize("spec", ["x", "1-", "a-b"])
def test_bad_cpu_specs_raise(spec):
    with pytest.raises(ValueError):
        local_stack.parse_cpus(spec)


def test_a_worker_on_cpus_this_machine_does_not_have_is_refused_before_it_starts(tmp_path):
    missing = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(ValueError, match="not all available"):
        local_stack.start_worker(
            local_stack.free_port(), model="unused", log_dir=tmp_path, cpus=str(missing)
        )
    assert not list(tmp_path.iterdir())  # nothing was spawned
