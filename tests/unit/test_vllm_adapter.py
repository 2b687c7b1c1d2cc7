"""The vLLM adapter (layerkv.plugin.vllm_adapter): the one place LayerKV touches vLLM
internals, and the version check in front of it.

Imports the installed vLLM (no engine is started), like the project's other tests that
need it; the subprocess test pays one more vLLM import.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from layerkv.plugin.vllm_version import SUPPORTED_VLLM_VERSION, check_vllm_version, is_supported
from layerkv.policy.settings import LayerKVConfigError

PACKAGE = Path(__file__).resolve().parents[2] / "services" / "layerkv"
# The only modules allowed to touch vLLM internals.
ADAPTER_MODULES = {Path("plugin/vllm_adapter.py"), Path("plugin/vllm_version.py")}
# What touching vLLM internals looks like in this code base: importing vLLM's internal
# packages, reading the connector base class's private state, overriding the
# scheduler's private methods, or patching the KV cache manager's allocation.
INTERNAL_TOUCH = re.compile(
    r"from vllm\.v1|import vllm\.v1|vllm\.distributed|\._kv_cache_manager|\._role\b"
    r"|_preempt_request|_free_request|\.allocate_slots\s*=(?!=)"
)


def test_every_private_vllm_name_the_adapter_uses_exists():
    from layerkv.plugin import vllm_adapter as va

    names = {f"{path}.{attribute}" for path, attribute in va.PRIVATE_NAMES}
    for expected in (
        "vllm.v1.core.sched.scheduler.Scheduler._preempt_request",
        "vllm.v1.core.sched.scheduler.Scheduler._free_request",
        "vllm.v1.core.kv_cache_utils.get_kv_cache_groups",
        "vllm.v1.kv_cache_spec_registry.KVCacheSpecRegistry._ensure_registered",
        "vllm.distributed.kv_transfer.kv_connector.v1.base.KVConnectorBase_V1"
        ".bind_kv_cache_manager._kv_cache_manager",
        "vllm.v1.core.kv_cache_manager.KVCacheManager.__init__.watermark_blocks",
    ):
        assert expected in names
    assert va.missing_private_names() == []


def test_a_vanished_private_name_is_reported(monkeypatch):
    from layerkv.plugin import vllm_adapter as va

    gone = (
        ("vllm.v1.core.sched.scheduler.Scheduler", "_no_such_method"),
        ("vllm.v1.core.sched.scheduler.Scheduler.__init__", "no_such_attribute"),
        ("vllm.v1.no_such_module.Thing", "attribute"),
    )
    monkeypatch.setattr(va, "PRIVATE_NAMES", (*va.PRIVATE_NAMES[:1], *gone))
    assert va.missing_private_names() == [f"{p}.{a}" for p, a in gone]


def test_intercepted_allocation_goes_to_the_handler_which_can_call_the_original():
    from layerkv.plugin import vllm_adapter as va

    class Manager:
        def allocate_slots(self, request, num_new_tokens, **kwargs):
            return ("blocks", request, num_new_tokens)

    manager = Manager()
    original = va.intercept_allocate_slots(
        manager, lambda request, n, **kw: None if request == "refused" else original(request, n)
    )
    assert manager.allocate_slots("r", 3, has_scheduled_reqs=True) == ("blocks", "r", 3)
    assert manager.allocate_slots("refused", 3) is None


def test_scheduler_hooks_run_around_vllms_preemption_and_before_its_free(monkeypatch):
    from layerkv.plugin import vllm_adapter as va

    calls = []
    monkeypatch.setattr(
        va.Scheduler, "_preempt_request", lambda self, r, t, drop: calls.append(("vllm", r, drop))
    )
    monkeypatch.setattr(va.Scheduler, "_free_request", lambda self, r, **kw: calls.append("free"))

    class Hooks(va.HookedScheduler):
        def before_preempt(self, request):
            calls.append(("before", request))
            return "token"

        def after_preempt(self, request, before):
            calls.append(("after", request, before))

        def on_free(self, request):
            calls.append(("on_free", request))

    scheduler = object.__new__(Hooks)  # the hooks need none of vLLM's state
    scheduler._preempt_request("r1", 0.0)
    scheduler._free_request("r2", delay_free_blocks=True)
    assert calls == [
        ("before", "r1"),
        ("vllm", "r1", False),
        ("after", "r1", "token"),
        ("on_free", "r2"),
        "free",
    ]


def test_only_the_supported_release_passes_the_version_check():
    assert SUPPORTED_VLLM_VERSION == "0.32.0"
    check_vllm_version("0.32.0+cpu")
    assert is_supported("0.32.0") and not is_supported("0.32.1")
    with pytest.raises(LayerKVConfigError, match=r"supports vLLM 0\.32\.0 only.*found vLLM 0\.33"):
        check_vllm_version("0.33.0")


def test_on_another_vllm_release_the_worker_refuses_and_the_entry_point_stays_out():
    """The entry point runs in every vLLM process, so it must not fail; the worker must."""
    script = """
import sys
import vllm
vllm.__version__ = "0.33.0"
import layerkv.plugin
layerkv.plugin.register()
assert "layerkv.plugin.vllm_adapter" not in sys.modules
from layerkv.policy.settings import LayerKVConfigError
try:
    import layerkv.worker.server
except LayerKVConfigError as e:
    print(e)
else:
    sys.exit("the worker imported")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "supports vLLM 0.32.0 only" in done.stdout
    assert "found vLLM 0.33.0" in done.stdout


def test_no_module_but_the_adapter_touches_vllm_internals():
    """A plain text scan of every module under services/layerkv: a line matching
    ``INTERNAL_TOUCH`` outside the adapter is a vLLM internal used without going through
    it. Textual on purpose, to stay simple: it flags comments and docstrings too, and
    sees only the spellings listed, the ones this code base uses."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative in ADAPTER_MODULES:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if INTERNAL_TOUCH.search(line):
                offenders.append(f"{relative}:{number}: {line.strip()}")
    assert offenders == []
