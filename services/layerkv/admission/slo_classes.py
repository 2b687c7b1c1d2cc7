"""The SLO classes the admission service knows: defaults from its configuration,
overridden by the targets the operator writes to Redis (refreshed in the background,
so a Redis outage leaves the last known targets in force)."""

from __future__ import annotations

import asyncio
import logging

import redis

from layerkv.common.slo import SloTarget
from layerkv.common.store import MetricsStore
from layerkv.policy.routing import ClassPolicy

log = logging.getLogger(__name__)


class SloCatalog:
    def __init__(
        self,
        defaults: list[SloTarget],
        store: MetricsStore | None,
        policies: dict[str, ClassPolicy] | None = None,
        default_policy: ClassPolicy | None = None,
    ) -> None:
        self._defaults = {t.name: t for t in defaults}
        self._from_store: dict[str, SloTarget] = {}
        self.store = store
        # What a class does when no worker meets its target now (admission config;
        # targets may come from Redis, policies do not).
        self._policies = dict(policies or {})
        self._default_policy = default_policy or ClassPolicy()

    def policy(self, name: str) -> ClassPolicy:
        return self._policies.get(name, self._default_policy)

    def get(self, name: str) -> SloTarget | None:
        return self._from_store.get(name) or self._defaults.get(name)

    def names(self) -> list[str]:
        return sorted(self._defaults.keys() | self._from_store.keys())

    async def refresh(self) -> None:
        """Reload targets from Redis; raises ``redis.RedisError`` if unreachable."""
        if self.store is not None:
            targets = await asyncio.to_thread(self.store.list_targets)
            self._from_store = {t.name: t for t in targets}

    async def refresh_forever(self, interval_s: float) -> None:
        while True:
            try:
                await self.refresh()
            except (redis.RedisError, ValueError) as e:
                log.warning(
                    "cannot refresh SLO targets from Redis (keeping %s): %s", self.names(), e
                )
            await asyncio.sleep(interval_s)
