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

import json
import time
from typing import Any

from layerkv.plugin import vllm_adapter as va
from layerkv.plugin.connector import LayerKVConnector
from layerkv.plugin.plans import BlockCopy
from layerkv.policy.latency import OnlineStepTimeModel, PrefillCoefficients
from layerkv.policy.residency import (
    KvLayout,
    KvRoom,
    Placement,
    ResidencyPlan,
    final_blocks_per_group,
    growth_blocks,
    plan_residency,
)
from layerkv.policy.settings import LayerKVConfigError
from layerkv.policy.sizing import blocks_needed, cdiv, promotion_target
from layerkv.policy.slack import DecodeProgress, admit_early, min_slack

SLO_KEY = "layerkv"


def request_slo(request: Any) -> dict[str, float]:
    """The ``{"ttft_s", "tpot_s"}`` targets a request carries in
    ``SamplingParams.extra_args["layerkv"]`` (empty if none)."""
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    return dict(extra.get(SLO_KEY) or {})


class LayerKVScheduler(va.HookedScheduler):
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
        self.layout = KvLayout(
            self.num_groups,
            self.kv_block_size,
            min_resident_groups=self.settings.min_resident_groups,
            reserve_requests=self.settings.reserve_requests,
            max_model_len=self.max_model_len,
        )
        s = self.settings
        self.step_model = OnlineStepTimeModel(
            PrefillCoefficients(s.prefill_a_s, s.prefill_b_s, s.prefill_c_s), s.decode_step_s
        )
        self.first_token_s: dict[str, float] = {}
        self._inserted_prefill_s = 0.0
        self._step: tuple[float, int, int, bool] | None = None
        self._allocate_slots = va.intercept_allocate_slots(
            self.kv_cache_manager, self._allocate_or_offload
        )
        self.lkv.scheduler_gauges = self._gauges
        self._decision_log = open(s.decision_log, "a") if s.decision_log else None  # noqa: SIM115

    # ---- admission ------------------------------------------------------------------

    def _allocate_or_offload(self, request, num_new_tokens, *args, **kwargs):
        if not va.is_fresh_admission(request):
            return self._allocate_slots(request, num_new_tokens, *args, **kwargs)
        book_plan = self.book.get(request.request_id)
        # A request being restored (promotion) keeps its host range and its new plan.
        restoring = book_plan is not None and bool(book_plan.restore_tokens)
        if not restoring:
            self.book.set_all_resident(request.request_id)
        plan = self._plan(request, kwargs, restoring)
        if plan is not None and plan.placement is Placement.LEAVES_ROOM:
            blocks = self._admit_offloaded(request, plan, num_new_tokens, args, kwargs)
            if blocks is not None:
                return blocks
        blocks = self._allocate_slots(request, num_new_tokens, *args, **kwargs)
        if blocks is not None:
            self._log_decision(request, "admitted_all_resident")
            return blocks
        if plan is not None and plan.placement is Placement.LEAVES_ROOM:
            return None  # counted and logged by _admit_offloaded
        if plan is None or plan.placement is Placement.ALL_RESIDENT:
            # vLLM refused the allocation the plan counted as fitting: plan without it.
            plan = self._plan(request, kwargs, restoring, fits_fully=False)
        if plan is None:
            self.lkv.counters["deferred_no_memory"] += 1
            self._log_decision(request, "deferred_no_memory")
            return None
        return self._admit_offloaded(request, plan, num_new_tokens, args, kwargs)

    def _plan(
        self, request, kwargs, restoring: bool, fits_fully: bool | None = None
    ) -> ResidencyPlan | None:
        """The shared residency rule (``policy/residency.py``) on this engine's state:
        free blocks less vLLM's watermark, the blocks running requests will still
        decode into, the host range and staging cap, and the next waiting request."""
        free = va.num_free_blocks(self.kv_cache_manager)
        if kwargs.get("has_scheduled_reqs"):
            free -= va.watermark_blocks(self.kv_cache_manager)
        room = KvRoom(
            free,
            self._pending_growth(),
            None if restoring else self.book.host.largest_free,
            self._staging_free(),
        )
        following = None if restoring else next((r for r in self.waiting if r is not request), None)
        return plan_residency(
            self.layout,
            min(request.num_tokens, self.max_model_len),
            request.num_prompt_tokens + request.max_tokens,
            room,
            following_total_tokens=(
                following.num_prompt_tokens + following.max_tokens if following else None
            ),
            reserve_requests=0 if restoring else None,
            fits_fully=fits_fully,
        )

    def _pending_growth(self) -> int:
        growth = 0
        for request in self.running:
            plan = self.book.get(request.request_id)
            growth += growth_blocks(
                self.layout,
                len(plan.resident) if plan else self.num_groups,
                self._blocks_per_group(request),
                request.num_tokens,
            )
        return growth

    def _blocks_per_group(self, request) -> int:
        """Blocks per group the request will hold at its end (the plan sizes early
        admissions for the whole output)."""
        return final_blocks_per_group(self.layout, request.num_prompt_tokens + request.max_tokens)

    def _log_decision(self, request, outcome: str, **fields: Any) -> None:
        if self._decision_log is None:
            return
        record = {
            "t": time.monotonic(),
            "request": request.request_id,
            "prompt_tokens": request.num_prompt_tokens,
            "outcome": outcome,
            "running": len(self.running),
            "waiting": len(self.waiting),
            "free_blocks": va.num_free_blocks(self.kv_cache_manager),
            "growth_blocks": self._pending_growth(),
            **fields,
        }
        self._decision_log.write(json.dumps(record) + "\n")
        self._decision_log.flush()

    def _admit_offloaded(self, request, plan: ResidencyPlan, num_new_tokens, args, kwargs):
        """Admit ``request`` with ``plan``'s resident groups, the rest offloaded: an
        early admission (its prompt does not fit with every group) only while the
        running requests' TPOT slack covers its predicted prefill."""
        rid = request.request_id
        counters = self.lkv.counters
        tokens = min(request.num_tokens, self.max_model_len)
        cap = plan.resident_groups if plan.placement is Placement.LEAVES_ROOM else None
        book_plan = self.book.get(rid)
        restore = book_plan.restore_tokens if book_plan is not None else 0
        predicted = self.step_model.predict_prefill_s(max(tokens - restore, 1))
        # A request stock vLLM would admit now (its prompt fits with every group) is
        # offloaded only to keep room: that is not an early admission, and the TPOT
        # gate does not apply (refusing would just admit it with every group).
        early = not plan.fits_fully
        if self.settings.slo_aware and early:
            slack = min_slack(
                (self._progress(r) for r in self.running),
                time.monotonic(),
                self.step_model.decode_step_s,
            )
            if not admit_early(slack, self._inserted_prefill_s, predicted):
                counters["deferred_tpot_slack"] += 1
                self._log_decision(
                    request,
                    "deferred_tpot_slack",
                    predicted_s=predicted,
                    slack_s=slack,
                    inserted_s=self._inserted_prefill_s,
                )
                return None
        num_resident = plan.resident_groups
        if not self.book.offload(rid, num_resident, self._blocks_per_group(request)):
            counters["deferred_no_memory"] += 1
            return None
        blocks = self._allocate_slots(request, num_new_tokens, *args, **kwargs)
        if blocks is None:
            self.book.set_all_resident(rid)
            counters["deferred_no_memory"] += 1
            return None
        outcome = "admitted_early" if early else "admitted_offloaded_for_room"
        counters[outcome] += 1
        self._log_decision(
            request,
            outcome,
            resident_groups=num_resident,
            cap=cap,
            predicted_s=predicted,
            inserted_s=self._inserted_prefill_s,
        )
        self._inserted_prefill_s += predicted
        return blocks

    def _staging_free(self) -> int | None:
        """Staging blocks the cap leaves for one more offloaded request (None: no cap)."""
        cap = self.settings.max_staging_blocks
        if cap is None:
            return None
        in_use = sum(
            len(self.book.managers[p.staging_owner].req_to_blocks.get(rid, ()))
            for rid, p in self.book.plans.items()
            if p.offloaded
        )
        return cap - in_use

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
            # Room for everyone's decode growth (to max_tokens), and for
            # reserve_requests arrivals.
            reserve = s.reserve_requests * blocks_needed(
                self.num_groups, s.min_resident_groups, per_group
            )
            target = promotion_target(
                va.num_free_blocks(self.kv_cache_manager),
                self.num_groups,
                len(plan.resident),
                per_group,
                s.promotion_headroom_blocks
                + len(self.running) * self.num_groups
                + reserve
                + self._pending_growth(),
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
            self._log_decision(request, "promoted", resident_groups=target)

    def before_preempt(self, request):
        # The plan as it was before vLLM's preemption says what the preemption is.
        return self.book.get(request.request_id)

    def after_preempt(self, request, plan) -> None:
        if plan is not None and not plan.promoting:
            # Ordinary (recompute) preemption: the request starts over with a new plan.
            self.book.release(request.request_id)
        if plan is None or not plan.promoting:
            self.lkv.counters["preemptions_recompute"] += 1
            self._log_decision(request, "preempted_recompute")

    # ---- step timing ----------------------------------------------------------------

    def schedule(self, *args, **kwargs):
        self._inserted_prefill_s = 0.0
        self._promote()
        output = super().schedule(*args, **kwargs)
        pairs = 0
        prefill_tokens = 0
        for rid, n in output.num_scheduled_tokens.items():
            request = self.requests.get(rid)
            # num_computed_tokens already counts this step's tokens.
            context = request.num_computed_tokens if request is not None else n
            pairs += n * context
            if n > 1:
                prefill_tokens += n
        self._step = (time.monotonic(), output.total_num_scheduled_tokens, pairs, prefill_tokens)
        return output

    def update_from_output(self, scheduler_output, model_runner_output):
        if self._step is not None:
            started, tokens, pairs, prefill_tokens = self._step
            self.step_model.observe(
                tokens, pairs, time.monotonic() - started, prefill_tokens == 0, prefill_tokens
            )
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

    def on_free(self, request) -> None:
        self.first_token_s.pop(request.request_id, None)

    def _gauges(self) -> dict[str, float]:
        coef = self.step_model.coefficients
        return {
            "prefill_a_s": coef.a,
            "prefill_b_s": coef.b,
            "prefill_c_s": coef.c,
            "decode_step_s": self.step_model.decode_step_s,
            "step_samples": self.step_model.samples_seen,
            "prefill_samples": self.step_model.prefill_samples,
        }
