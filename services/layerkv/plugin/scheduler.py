"""LayerKV's engine scheduler: vLLM's scheduler minus the head-of-line stop.

Stock vLLM stops admitting at the first waiting request whose blocks (for every layer)
do not fit. This subclass wraps ``kv_cache_manager.allocate_slots``: when a waiting
request does not fit, it is admitted with as many resident KV groups as the free blocks
allow (the rest offloaded to host) -- but only while the running requests' TPOT slack
covers its predicted prefill time. Before each step it also promotes offloaded running
requests back to device blocks when the blocks are free. ``schedule()`` itself is
vLLM's.
"""

from __future__ import annotations

import time
from typing import Any

from layerkv.plugin import vllm_adapter as va
from layerkv.plugin.connector import LayerKVConnector
from layerkv.plugin.plans import BlockCopy
from layerkv.policy.prefill_model import OnlineStepTimeModel, PrefillCoefficients
from layerkv.policy.settings import LayerKVConfigError, cdiv
from layerkv.policy.sizing import (
    max_resident_groups,
    promotion_target,
    residency_leaving_room,
)
from layerkv.policy.slack import DecodeProgress, admit_early, min_slack

SLO_KEY = "layerkv"


def request_slo(request: Any) -> dict[str, float]:
    """The ``{"ttft_s", "tpot_s"}`` targets a request carries in
    ``SamplingParams.extra_args["layerkv"]`` (empty if none)."""
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    return dict(extra.get(SLO_KEY) or {})


class LayerKVScheduler(va.Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.connector, LayerKVConnector):
            raise LayerKVConfigError(
                "LayerKVScheduler needs the LayerKV KV connector: build the engine with "
                "layerkv.plugin.engine_overrides()"
            )
        self.lkv: LayerKVConnector = self.connector
        self.book = self.lkv.book
        self.settings = self.lkv.settings
        self.num_groups = len(self.lkv.group_layers)
        self.kv_block_size = self.lkv.block_size
        s = self.settings
        self.step_model = OnlineStepTimeModel(
            PrefillCoefficients(s.prefill_a_s, s.prefill_b_s, s.prefill_c_s), s.decode_step_s
        )
        self.first_token_s: dict[str, float] = {}
        self._inserted_prefill_s = 0.0
        self._step: tuple[float, int, int, bool] | None = None
        self._allocate_slots = self.kv_cache_manager.allocate_slots
        self.kv_cache_manager.allocate_slots = self._allocate_or_offload
        self.lkv.scheduler_gauges = self._gauges

    # ---- admission ------------------------------------------------------------------

    def _allocate_or_offload(self, request, num_new_tokens, *args, **kwargs):
        if not va.is_fresh_admission(request):
            return self._allocate_slots(request, num_new_tokens, *args, **kwargs)
        plan = self.book.get(request.request_id)
        if plan is None or not plan.restore_tokens:
            self.book.set_all_resident(request.request_id)
            # Taking every group for this request would leave the next waiting one
            # stuck behind it: offload some of this one's groups instead.
            cap = self._residency_leaving_room(request, kwargs)
            if cap is not None:
                blocks = self._admit_with_offload(request, num_new_tokens, args, kwargs, cap)
                if blocks is not None:
                    return blocks
        blocks = self._allocate_slots(request, num_new_tokens, *args, **kwargs)
        if blocks is not None:
            return blocks
        return self._admit_with_offload(request, num_new_tokens, args, kwargs)

    def _free_for_admission(self, kwargs) -> int:
        free = va.num_free_blocks(self.kv_cache_manager)
        if kwargs.get("has_scheduled_reqs"):
            free -= va.watermark_blocks(self.kv_cache_manager)
        return free

    def _blocks_per_group(self, request) -> int:
        """Blocks per group the request will hold at its end. Early admission plans for
        the whole output, not just the prompt: a pool filled to the brim by early
        admissions would force vLLM to preempt (and recompute) at every block boundary."""
        total = request.num_prompt_tokens + request.max_tokens
        return cdiv(min(total, self.max_model_len), self.kv_block_size)

    def _residency_leaving_room(self, request, kwargs) -> int | None:
        following = next((r for r in self.waiting if r is not request), None)
        if following is None:
            return None
        return residency_leaving_room(
            self._free_for_admission(kwargs),
            self.num_groups,
            self._blocks_per_group(request),
            self._blocks_per_group(following),
            self.settings.min_resident_groups,
        )

    def _admit_with_offload(self, request, num_new_tokens, args, kwargs, cap=None):
        rid = request.request_id
        counters = self.lkv.counters
        tokens = min(request.num_tokens, self.max_model_len)
        per_group = self._blocks_per_group(request)
        num_resident = max_resident_groups(
            self._free_for_admission(kwargs),
            self.num_groups,
            per_group,
            self.settings.min_resident_groups,
        )
        if num_resident is None or not self._staging_fits(per_group):
            counters["deferred_no_memory"] += 1
            return None
        if cap is not None:
            num_resident = min(num_resident, cap)
        plan = self.book.get(rid)
        restore = plan.restore_tokens if plan is not None else 0
        predicted = self.step_model.predict_prefill_s(max(tokens - restore, 1))
        if self.settings.slo_aware:
            slack = min_slack(
                (self._progress(r) for r in self.running),
                time.monotonic(),
                self.step_model.decode_step_s,
            )
            if not admit_early(slack, self._inserted_prefill_s, predicted):
                counters["deferred_tpot_slack"] += 1
                return None
        host_blocks = cdiv(
            min(request.num_prompt_tokens + request.max_tokens, self.max_model_len),
            self.kv_block_size,
        )
        if not self.book.offload(rid, num_resident, host_blocks):
            counters["deferred_no_memory"] += 1
            return None
        blocks = self._allocate_slots(request, num_new_tokens, *args, **kwargs)
        if blocks is None:
            self.book.set_all_resident(rid)
            counters["deferred_no_memory"] += 1
            return None
        counters["admitted_early"] += 1
        self._inserted_prefill_s += predicted
        return blocks

    def _staging_fits(self, per_group: int) -> bool:
        cap = self.settings.max_staging_blocks
        if cap is None:
            return True
        in_use = sum(
            len(self.book.managers[p.staging_owner].req_to_blocks.get(rid, ()))
            for rid, p in self.book.plans.items()
            if p.offloaded
        )
        return in_use + per_group <= cap

    def _progress(self, request) -> DecodeProgress:
        tpot = request_slo(request).get("tpot_s", self.settings.default_tpot_s)
        return DecodeProgress(
            tpot_target_s=tpot,
            output_tokens=request.num_output_tokens,
            first_token_time_s=self.first_token_s.get(request.request_id),
            remaining_tokens=max(request.max_tokens - request.num_output_tokens, 0),
        )

    # ---- promotion ------------------------------------------------------------------

    def _promote(self) -> None:
        """Give offloaded layers of decoding requests device blocks again, through
        vLLM's preempt-and-resume path: resident layers are saved to host (the
        offloaded ones are there already) and every newly resident layer is restored
        from host when the request is resumed, in the same step."""
        s = self.settings
        if not s.promotion or not va.waiting_is_empty(self):
            return
        promoted = 0
        for request in list(self.running):
            if promoted >= s.max_promotions_per_step:
                break
            rid = request.request_id
            plan = self.book.get(rid)
            if (
                plan is None
                or not plan.offloaded
                or request.num_output_tokens < 1
                or request.num_computed_tokens != request.num_tokens - 1
                or request.spec_token_ids
                or request.num_output_placeholders
                or request.skip_reading_prefix_cache
            ):
                continue
            per_group = self._blocks_per_group(request)
            target = promotion_target(
                va.num_free_blocks(self.kv_cache_manager),
                self.num_groups,
                len(plan.resident),
                per_group,
                s.promotion_headroom_blocks + len(self.running) * self.num_groups,
            )
            if target is None:
                continue
            block_ids = self.kv_cache_manager.get_block_ids(rid)
            n = cdiv(request.num_computed_tokens, self.kv_block_size)
            for g in plan.resident:
                self.book.pending_saves.append(
                    BlockCopy(
                        rid, self.lkv.group_layers[g], tuple(block_ids[g][:n]), plan.host_start
                    )
                )
            plan.restore_tokens = request.num_computed_tokens
            plan.promoting = True
            va.preempt_running(self, request, time.monotonic())
            plan.resident, plan.offloaded = self.book.make_plan(target)
            promoted += 1

    def _preempt_request(self, request, timestamp, drop_stale_output: bool = False) -> None:
        plan = self.book.get(request.request_id)
        super()._preempt_request(request, timestamp, drop_stale_output)
        if plan is not None and not plan.promoting:
            # Ordinary (recompute) preemption: the request starts over with a new plan.
            self.book.release(request.request_id)
        if plan is None or not plan.promoting:
            self.lkv.counters["preemptions_recompute"] += 1

    # ---- step timing ----------------------------------------------------------------

    def schedule(self, *args, **kwargs):
        self._inserted_prefill_s = 0.0
        self._promote()
        output = super().schedule(*args, **kwargs)
        pairs = 0
        decode_only = True
        for rid, n in output.num_scheduled_tokens.items():
            request = self.requests.get(rid)
            context = request.num_computed_tokens if request is not None else n
            pairs += n * context
            decode_only &= n == 1
        self._step = (time.monotonic(), output.total_num_scheduled_tokens, pairs, decode_only)
        return output

    def update_from_output(self, scheduler_output, model_runner_output):
        if self._step is not None:
            started, tokens, pairs, decode_only = self._step
            self.step_model.observe(tokens, pairs, time.monotonic() - started, decode_only)
            self._step = None
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        now = time.monotonic()
        for rid in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(rid)
            if request is None:
                self.first_token_s.pop(rid, None)
            elif request.num_output_tokens > 0 and rid not in self.first_token_s:
                self.first_token_s[rid] = now
        return outputs

    def _free_request(self, request, *args, **kwargs):
        self.first_token_s.pop(request.request_id, None)
        return super()._free_request(request, *args, **kwargs)

    def _gauges(self) -> dict[str, float]:
        coef = self.step_model.coefficients
        return {
            "prefill_a_s": coef.a,
            "prefill_b_s": coef.b,
            "prefill_c_s": coef.c,
            "decode_step_s": self.step_model.decode_step_s,
            "step_samples": self.step_model.samples_seen,
        }
