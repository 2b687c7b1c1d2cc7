"""Per-request LayerKV plans, on the scheduler side.

A plan says which KV groups of a request are resident (own device blocks) and which are
offloaded (KV in a host range, attended through the request's staging blocks). Plans
change only when the request (re)enters the running queue: worker block tables are
append-only, so a running request's layout can only change through vLLM's
preempt-and-resume path (used by promotion).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from layerkv.policy.host_ranges import HostRangeAllocator
from layerkv.policy.placement import offloaded_groups, resident_groups


@dataclass
class RequestPlan:
    resident: tuple[int, ...]
    offloaded: tuple[int, ...]
    # Host range holding the offloaded groups' KV (start block, length in blocks).
    host_start: int | None = None
    host_blocks: int = 0
    # Promotion: tokens whose KV (all groups) sits in the host range, to be restored
    # into device blocks when the request is resumed.
    restore_tokens: int = 0
    promoting: bool = False

    @property
    def staging_owner(self) -> int | None:
        return self.offloaded[0] if self.offloaded else None


@dataclass(frozen=True)
class BlockCopy:
    """Copy whole blocks of some layers between device blocks and a host range."""

    request_id: str
    layers: tuple[int, ...]
    block_ids: tuple[int, ...]
    host_start: int


@dataclass
class PlanBook:
    num_groups: int
    host: HostRangeAllocator
    managers: tuple[Any, ...] = ()
    plans: dict[str, RequestPlan] = field(default_factory=dict)
    # Copies of resident groups to host, for requests being promoted this step.
    pending_saves: list[BlockCopy] = field(default_factory=list)

    def get(self, request_id: str) -> RequestPlan | None:
        return self.plans.get(request_id)

    def mirror_source(self, request_id: str, group_id: int) -> int | None:
        plan = self.plans.get(request_id)
        if plan is None or not plan.offloaded:
            return None
        owner = plan.offloaded[0]
        if group_id == owner or group_id not in plan.offloaded:
            return None
        return owner

    def make_plan(self, num_resident: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        res = resident_groups(self.num_groups, num_resident)
        return res, offloaded_groups(self.num_groups, res)

    def offload(self, request_id: str, num_resident: int, host_blocks: int) -> bool:
        """Plan ``request_id`` with ``num_resident`` resident groups and a host range of
        ``host_blocks`` blocks (keeping the range it may already have). False, with
        nothing changed, when the host range cannot be had."""
        plan = self.plans.get(request_id)
        resident, offloaded = self.make_plan(num_resident)
        if plan is not None and plan.host_start is not None:
            plan.resident, plan.offloaded = resident, offloaded
            return True
        start = self.host.allocate(host_blocks)
        if start is None:
            return False
        self.plans[request_id] = RequestPlan(resident, offloaded, start, host_blocks)
        return True

    def set_all_resident(self, request_id: str) -> None:
        """All groups resident. A request being restored keeps its host range (the
        restore reads it); anyone else drops the plan."""
        plan = self.plans.get(request_id)
        if plan is None:
            return
        if plan.restore_tokens:
            plan.resident, plan.offloaded = tuple(range(self.num_groups)), ()
        else:
            self.release(request_id)

    def release(self, request_id: str) -> None:
        plan = self.plans.pop(request_id, None)
        if plan is not None and plan.host_start is not None:
            self.host.free(plan.host_start)

    def release_host(self, request_id: str) -> None:
        """Drop the host range of a request that no longer offloads anything."""
        plan = self.plans.get(request_id)
        if plan is not None and not plan.offloaded:
            self.release(request_id)
