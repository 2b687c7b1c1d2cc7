"""The LayerKV KV connector: per-layer offload and fetch-back, plus promotion copies.

Scheduler side (engine core): owns the ``PlanBook`` (plans, host ranges) and turns each
step's plans into ``LayerKVMetadata``. Worker side: owns the host buffers (one tensor
per layer; a host block holds one block of one layer, a request's range is contiguous)
and runs the copies from vLLM's per-layer hooks, in this order for one step:

* ``handle_preemptions``: save resident groups of requests being promoted to host
  (before anything can overwrite their freed blocks);
* ``start_load_kv`` (before the forward pass): restore promoted requests' layers into
  their new device blocks, then fetch each offloaded request's first offloaded layer;
* ``save_kv_layer(j)`` (after layer j's attention, which wrote this step's KV into
  staging): copy layer j's new blocks to host, then fetch the request's next offloaded
  layer into staging. A layer's KV must be in staging *before* its forward, which
  writes the step's new tokens into the cache ahead of ``wait_for_layer_load``.

On CUDA the copies run on a side stream; the compute stream waits for a fetch only at
the hook right before the layer that needs it, so the fetch overlaps the compute of the
resident layers in between (placement interleaves them). On CPU copies are plain.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from layerkv.plugin import vllm_adapter as va
from layerkv.plugin.kv_copy import (
    BlockIndex,
    block_view,
    device_to_host,
    host_to_device,
    load_blocks,
    save_blocks,
)
from layerkv.plugin.kv_groups import LayerKVAttentionSpec, group_layer_indices, settings_of
from layerkv.plugin.plans import BlockCopy, PlanBook
from layerkv.plugin.stats import LayerKVConnectorStats, make_stats
from layerkv.policy.host_ranges import HostRangeAllocator
from layerkv.policy.settings import LayerKVConfigError, ModelGeometry, resolve
from layerkv.policy.sizing import cdiv


@dataclass(frozen=True)
class OffloadedStep:
    """One step of one request that has offloaded layers."""

    request_id: str
    layers: tuple[int, ...]  # offloaded model layers, ascending
    staging_block_ids: tuple[int, ...]
    host_start: int
    num_computed: int  # tokens whose KV exists before this step
    num_new: int  # tokens computed this step


@dataclass
class _StepCopies:
    """The copies of one offloaded request in one step, indexed once for all layers."""

    step: OffloadedStep
    fetch: BlockIndex  # staging blocks holding the tokens computed before this step
    save: BlockIndex  # staging blocks this step writes new tokens into
    save_host: int  # host block of ``save``'s first block
    next_layer: dict[int, int]  # offloaded layer -> the request's next offloaded layer


@dataclass
class LayerKVMetadata(va.KVConnectorMetadata):
    steps: list[OffloadedStep] = field(default_factory=list)
    promotion_saves: list[BlockCopy] = field(default_factory=list)
    restores: list[BlockCopy] = field(default_factory=list)


class LayerKVConnector(va.KVConnectorBase_V1, va.SupportsHMA):
    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        settings = settings_of(vllm_config)
        if settings is None or kv_cache_config is None:
            raise LayerKVConfigError("LayerKVConnector needs the LayerKV kv_transfer_config")
        groups = kv_cache_config.kv_cache_groups
        if not groups or not all(isinstance(g.kv_cache_spec, LayerKVAttentionSpec) for g in groups):
            raise LayerKVConfigError(
                "the LayerKV connector is configured but the KV cache was not split into "
                "LayerKV groups: is the plug-in entry point installed (vllm.general_plugins: "
                "layerkv = layerkv.plugin:register)?"
            )
        spec = groups[0].kv_cache_spec
        self.settings = settings
        self.block_size = spec.block_size
        self.group_layers = group_layer_indices(kv_cache_config)
        self.num_layers = sum(len(g) for g in self.group_layers)
        self.geometry = ModelGeometry(
            num_layers=self.num_layers,
            max_model_len=vllm_config.model_config.max_model_len,
            block_size=spec.block_size,
            layer_block_bytes=spec.page_size_bytes,
        )
        self.layout = resolve(settings, self.geometry)
        self.num_device_blocks = kv_cache_config.num_blocks
        if role == va.KVConnectorRole.SCHEDULER:
            self._init_scheduler()
        else:
            self._init_worker()

    # ==== scheduler side ==============================================================

    def _init_scheduler(self) -> None:
        self.book = PlanBook(len(self.group_layers), HostRangeAllocator(self.layout.host_blocks))
        self._pending_restores: list[BlockCopy] = []
        self._release_after_meta: list[str] = []
        self.counters: dict[str, int] = defaultdict(int)
        # Set by the LayerKV scheduler: a callable returning its model/gauge values.
        self.scheduler_gauges: Any = None

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        managers = tuple(va.group_managers(kv_cache_manager))
        self.book.managers = managers
        for manager in managers:
            manager.plans = self.book

    def layers_of(self, group_ids: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(i for g in group_ids for i in self.group_layers[g]))

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        plan = self.book.get(request.request_id)
        if plan is not None and plan.restore_tokens > num_computed_tokens:
            return plan.restore_tokens - num_computed_tokens, False
        return 0, False

    def get_loaded_kv_cache_group_ids(self, request) -> tuple[int, ...]:
        return tuple(range(len(self.group_layers)))

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        plan = self.book.get(request.request_id)
        if plan is None or not plan.restore_tokens:
            return
        if num_external_tokens > 0:
            n = cdiv(plan.restore_tokens, self.block_size)
            block_ids = blocks.get_block_ids()
            for g in plan.resident:
                self._pending_restores.append(
                    BlockCopy(
                        request.request_id,
                        tuple(self.group_layers[g]),
                        tuple(block_ids[g][:n]),
                        plan.host_start,
                    )
                )
            self.counters["promotions"] += 1
            if not plan.offloaded:
                self._release_after_meta.append(request.request_id)
        plan.restore_tokens = 0
        plan.promoting = False

    def build_connector_meta(self, scheduler_output) -> LayerKVMetadata:
        meta = LayerKVMetadata()
        kv_cache_manager = va.connector_kv_cache_manager(self)
        computed: dict[str, int] = {
            r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs
        }
        cached = scheduler_output.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens, strict=False))
        for req_id, num_new in scheduler_output.num_scheduled_tokens.items():
            plan = self.book.get(req_id)
            if plan is None or not plan.offloaded:
                continue
            staging = kv_cache_manager.get_block_ids(req_id)[plan.staging_owner]
            num_computed = computed[req_id]
            assert cdiv(num_computed + num_new, self.block_size) <= plan.host_blocks, (
                f"request {req_id} outgrew its host range"
            )
            meta.steps.append(
                OffloadedStep(
                    request_id=req_id,
                    layers=self.layers_of(plan.offloaded),
                    staging_block_ids=tuple(staging),
                    host_start=plan.host_start,
                    num_computed=num_computed,
                    num_new=num_new,
                )
            )
        meta.promotion_saves, self.book.pending_saves = self.book.pending_saves, []
        meta.restores, self._pending_restores = self._pending_restores, []
        # The restores above read the host ranges before this step's forward pass.
        for req_id in self._release_after_meta:
            self.book.release_host(req_id)
        self._release_after_meta = []
        if meta.steps or meta.restores:
            va.set_sync_kv_loads(scheduler_output)
        return meta

    def request_finished(self, request, block_ids):
        self.book.release(request.request_id)
        return False, None

    def request_finished_all_groups(self, request, block_ids):
        self.book.release(request.request_id)
        return False, None

    def get_kv_connector_stats(self):
        if va.connector_role(self) != va.KVConnectorRole.SCHEDULER:
            return self._worker_stats()
        kv_cache_manager = va.connector_kv_cache_manager(self)
        offloading = [p for p in self.book.plans.values() if p.offloaded]
        staging = 0
        for req_id, plan in self.book.plans.items():
            if plan.offloaded:
                staging += len(self.book.managers[plan.staging_owner].req_to_blocks.get(req_id, ()))
        values: dict[str, Any] = {
            "requests_with_offloaded_layers": len(offloading),
            "resident_layers": sum(len(self.layers_of(p.resident)) for p in offloading),
            "offloaded_layers": sum(len(self.layers_of(p.offloaded)) for p in offloading),
            "staging_blocks": staging,
            "host_blocks_used": self.book.host.num_blocks - self.book.host.num_free,
            "host_blocks_total": self.book.host.num_blocks,
            "device_blocks_free": va.num_free_blocks(kv_cache_manager),
            "device_blocks_total": va.num_total_blocks(kv_cache_manager),
            # Per request, so that admission counts the blocks each one really holds.
            "offloaded_groups_by_request": {
                va.external_request_id(rid): len(p.offloaded)
                for rid, p in self.book.plans.items()
                if p.offloaded
            },
            **self.counters,
        }
        if self.scheduler_gauges is not None:
            values.update(self.scheduler_gauges())
        return make_stats(values)

    @classmethod
    def build_kv_connector_stats(cls, data=None):
        return LayerKVConnectorStats(data=dict(data or {}))

    # ==== worker side =================================================================

    def _init_worker(self) -> None:
        self.kv: dict[int, torch.Tensor] = {}
        self.host: dict[int, torch.Tensor] = {}
        self._layer_of_name: dict[str, int] = {}
        self._meta: LayerKVMetadata | None = None
        self._by_layer: dict[int, list[_StepCopies]] = {}
        self._copies: list[_StepCopies] = []
        self._stream: torch.cuda.Stream | None = None
        self._fetched: dict[int, Any] = {}  # layer -> CUDA event of its pending fetch
        self.worker_counters: dict[str, float] = dict.fromkeys(
            (
                "bytes_offloaded",
                "bytes_fetched",
                "bytes_promotion_saved",
                "bytes_restored",
                "copy_seconds",
            ),
            0,
        )

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv.clear()
        self.host.clear()
        for name, tensor in kv_caches.items():
            index = va.layer_index(name)
            self._layer_of_name[name] = index
            view = block_view(tensor, self.num_device_blocks)
            self.kv[index] = view
            self.host[index] = torch.empty(
                (self.layout.host_blocks, *view.shape[1:]),
                dtype=view.dtype,
                device="cpu",
                pin_memory=view.is_cuda,
            )
        if any(t.is_cuda for t in self.kv.values()):
            self._stream = torch.cuda.Stream()

    def _side(self):
        return torch.cuda.stream(self._stream) if self._stream else contextlib.nullcontext()

    def _copy_to_host(self, layer: int, block_ids, host_start: int, first: int = 0) -> int:
        n = len(block_ids)
        dst = self.host[layer][host_start + first : host_start + first + n]
        return device_to_host(self.kv[layer], list(block_ids), dst, self._stream is not None)

    def _copy_to_device(self, layer: int, block_ids, host_start: int) -> int:
        n = len(block_ids)
        src = self.host[layer][host_start : host_start + n]
        return host_to_device(src, self.kv[layer], list(block_ids), self._stream is not None)

    def bind_connector_metadata(self, connector_metadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._meta = connector_metadata
        by_layer: dict[int, list[_StepCopies]] = defaultdict(list)
        copies = []
        bs = self.block_size
        device = next(iter(self.kv.values())).device if self.kv else "cpu"
        for step in connector_metadata.steps:
            staging = step.staging_block_ids
            n_fetch = cdiv(step.num_computed, bs)
            first = step.num_computed // bs
            last = cdiv(step.num_computed + step.num_new, bs)
            # Every offloaded layer's fetch is needed: one staging list serves all of a
            # request's offloaded layers, so at the start of a step it holds the last
            # one's KV, never the first's (unless only one layer is offloaded).
            c = _StepCopies(
                step=step,
                fetch=BlockIndex(staging[:n_fetch], device),
                save=BlockIndex(staging[first:last], device),
                save_host=step.host_start + first,
                next_layer=dict(itertools.pairwise(step.layers)),
            )
            copies.append(c)
            for layer in step.layers:
                by_layer[layer].append(c)
        self._copies = copies
        self._by_layer = by_layer
        self._fetched = {}

    def handle_preemptions(self, kv_connector_metadata) -> None:
        meta = kv_connector_metadata
        if not isinstance(meta, LayerKVMetadata) or not meta.promotion_saves:
            return
        t0 = time.perf_counter()
        for copy in meta.promotion_saves:
            for layer in copy.layers:
                self.worker_counters["bytes_promotion_saved"] += self._copy_to_host(
                    layer, copy.block_ids, copy.host_start
                )
        self._sync()
        self.worker_counters["copy_seconds"] += time.perf_counter() - t0

    def start_load_kv(self, forward_context, **kwargs) -> None:
        meta = self._meta
        if meta is None or not (meta.steps or meta.restores):
            return
        t0 = time.perf_counter()
        for copy in meta.restores:
            for layer in copy.layers:
                self.worker_counters["bytes_restored"] += self._copy_to_device(
                    layer, copy.block_ids, copy.host_start
                )
        self._sync()
        with self._side():
            for c in self._copies:
                self._fetch(c, c.step.layers[0])
        self._wait_fetched(0)
        self.worker_counters["copy_seconds"] += time.perf_counter() - t0

    def _fetch(self, c: _StepCopies, layer: int) -> None:
        """Bring ``layer``'s KV of the tokens computed so far into the staging blocks."""
        n = len(c.fetch)
        if n:
            src = self.host[layer][c.step.host_start : c.step.host_start + n]
            self.worker_counters["bytes_fetched"] += load_blocks(
                src, self.kv[layer], c.fetch, self._stream is not None
            )
        if self._stream is not None:
            event = torch.cuda.Event()
            event.record(self._stream)
            self._fetched[layer] = event

    def _wait_fetched(self, layer: int) -> None:
        event = self._fetched.pop(layer, None)
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def _sync(self) -> None:
        if self._stream is not None:
            torch.cuda.current_stream().synchronize()
            self._stream.synchronize()

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._wait_fetched(self._layer_of_name[layer_name])

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        layer = self._layer_of_name[layer_name]
        copies = self._by_layer.get(layer)
        if copies:
            t0 = time.perf_counter()
            if self._stream is not None:
                # The side stream may copy the new KV only once attention wrote it.
                written = torch.cuda.Event()
                written.record(torch.cuda.current_stream())
                self._stream.wait_event(written)
            with self._side():
                for c in copies:
                    # Only the blocks this step wrote: the rest is on host already.
                    n = len(c.save)
                    dst = self.host[layer][c.save_host : c.save_host + n]
                    self.worker_counters["bytes_offloaded"] += save_blocks(
                        self.kv[layer], c.save, dst, self._stream is not None
                    )
                    later = c.next_layer.get(layer)
                    if later is not None:
                        self._fetch(c, later)
            self.worker_counters["copy_seconds"] += time.perf_counter() - t0
        # The next layer's forward writes its new KV before our next hook runs.
        self._wait_fetched(layer + 1)

    def wait_for_save(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    def _worker_stats(self) -> LayerKVConnectorStats:
        return make_stats(dict(self.worker_counters))
