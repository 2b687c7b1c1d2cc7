"""The Redis store of the control plane: request outcomes, windowed SLO metrics, targets.

One module, used by the admission service (writes outcomes, reads targets) and the
operator (writes targets, reads windowed violation rates and percentiles).

Keys (``prefix`` defaults to ``layerkv``):

* ``{prefix}:outcome:{request_id}`` hash: one record per request, expires after
  ``outcome_ttl_s``.
* ``{prefix}:bucket:{slo_class}:{start}`` hash: aggregates of the outcomes that finished
  in ``[start, start + bucket_s)``: ``n``, ``errors``, ``v_ttft``, ``v_tpot``, ``v_any``,
  ``ttft:{i}`` / ``tpot:{i}`` histogram counts (bounds in ``slo.LATENCY_BUCKETS_S``),
  ``newest``, and the quality of the admission's TTFT predictions: ``pred_n`` outcomes
  with a prediction, ``pred_err_sum`` (predicted - measured, s), ``pred_abs_err_sum``,
  ``pred_ape_sum`` (sum of |error| / measured). Expires after ``retention_s``, so
  memory is bounded by classes x retention / bucket_s.
* ``{prefix}:target:{slo_class}`` hash: the class's targets (written by the operator).
* ``{prefix}:classes`` set: class names that have targets or outcomes.

Each outcome is applied by one server-side script (Redis runs a script atomically), so
readers never see a request counted in ``n`` but not in its histograms; a batch of
outcomes goes in one MULTI/EXEC round trip.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, fields

import redis
from redis.exceptions import NoScriptError

from layerkv.common.load import WorkerLoadReport
from layerkv.common.slo import (
    LATENCY_BUCKETS_S,
    RequestOutcome,
    SloTarget,
    WindowStats,
    histogram_index,
    violations,
)

log = logging.getLogger(__name__)

_NB = len(LATENCY_BUCKETS_S)
_OUTCOME_FIELDS = tuple(f.name for f in fields(RequestOutcome))

# One outcome. KEYS: outcome hash, bucket hash, class set. ARGV: outcome TTL, bucket
# TTL, class, finished_at, n, n field/value pairs of the record, m, m integer
# increments of the bucket (field, by), then float increments (field, by) to the end.
# Server-side because the admission service writes an outcome per request: one command
# instead of ~15, batched, is CPU not taken from the requests the same process serves
# (docs/decisions/0004-hot-path-costs.md).
_RECORD_OUTCOME_LUA = """
local i = 6
local rec = {}
for _ = 1, tonumber(ARGV[5]) do
  rec[#rec + 1] = ARGV[i]
  rec[#rec + 1] = ARGV[i + 1]
  i = i + 2
end
redis.call('HSET', KEYS[1], unpack(rec))
redis.call('EXPIRE', KEYS[1], ARGV[1])
local m = tonumber(ARGV[i])
i = i + 1
for _ = 1, m do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i < #ARGV do
  redis.call('HINCRBYFLOAT', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('HSET', KEYS[2], 'newest', ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
return 1
"""
_RECORD_OUTCOME_SHA = hashlib.sha1(_RECORD_OUTCOME_LUA.encode()).hexdigest()


class MetricsStore:
    """Synchronous store over one redis-py client. Methods raise ``redis.RedisError``
    when Redis is unreachable; callers decide whether that is fatal."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "layerkv",
        bucket_s: int = 5,
        retention_s: int = 3600,
        outcome_ttl_s: int = 3600,
    ) -> None:
        if bucket_s < 1 or retention_s < bucket_s:
            raise ValueError("need 1 <= bucket_s <= retention_s")
        self.client = client
        self.prefix = prefix
        self.bucket_s = bucket_s
        self.retention_s = retention_s
        self.outcome_ttl_s = outcome_ttl_s

    @classmethod
    def from_url(cls, url: str, **kwargs) -> MetricsStore:
        """``redis://[:password@]host:port/db`` or ``unix:///path/to/socket``.
        Short timeouts: a slow Redis must not stall request handling."""
        client = redis.Redis.from_url(
            url, socket_timeout=1.0, socket_connect_timeout=1.0, decode_responses=True
        )
        return cls(client, **kwargs)

    # -- keys --------------------------------------------------------------------------

    def _outcome_key(self, request_id: str) -> str:
        return f"{self.prefix}:outcome:{request_id}"

    def _bucket_key(self, slo_class: str, start: int) -> str:
        return f"{self.prefix}:bucket:{slo_class}:{start}"

    def _target_key(self, slo_class: str) -> str:
        return f"{self.prefix}:target:{slo_class}"

    @property
    def _classes_key(self) -> str:
        return f"{self.prefix}:classes"

    def _bucket_start(self, t: float) -> int:
        return int(t // self.bucket_s) * self.bucket_s

    # -- outcomes ----------------------------------------------------------------------

    def record_outcome(self, outcome: RequestOutcome, target: SloTarget | None) -> None:
        """Store one request's outcome and fold it into its class's time bucket."""
        self.record_outcomes([(outcome, target)])

    def record_outcomes(self, batch: Sequence[tuple[RequestOutcome, SloTarget | None]]) -> int:
        """Store several outcomes in one round trip. Returns how many Redis refused
        (a key of the wrong type, out of memory...): the others are stored. Raises
        ``redis.RedisError`` when none could be stored, so the caller keeps them all
        and tries again."""
        if not batch:
            return 0
        for attempt in range(2):
            # One script call is atomic on its own; MULTI/EXEC only ties a batch together.
            pipe = self.client.pipeline(transaction=len(batch) > 1)
            for outcome, target in batch:
                pipe.evalsha(_RECORD_OUTCOME_SHA, 3, *self._outcome_script_args(outcome, target))
            results = pipe.execute(raise_on_error=False)
            errors = [r for r in results if isinstance(r, Exception)]
            if not errors:
                return 0
            # A Redis that restarted (or flushed its scripts) does not know the script:
            # then no command of the transaction did anything, so load it and retry.
            if attempt == 0 and all(isinstance(e, NoScriptError) for e in errors):
                self.client.script_load(_RECORD_OUTCOME_LUA)
                continue
            if len(errors) == len(batch):
                raise errors[0]
            # Written again, the others would be counted twice: report these as lost.
            log.warning("Redis refused %d of %d outcomes: %s", len(errors), len(batch), errors[0])
            return len(errors)
        raise AssertionError("unreachable")

    def _outcome_script_args(self, outcome: RequestOutcome, target: SloTarget | None) -> list:
        v = violations(outcome, target)
        record: list = []
        for name in _OUTCOME_FIELDS:
            value = getattr(outcome, name)
            record += (name, "" if value is None else value)
        record += ("ttft_violated", int(v.ttft), "tpot_violated", int(v.tpot))
        counts: list = ["n", 1]
        if outcome.status in ("error", "rejected"):
            counts += ("errors", 1)
        if v.ttft:
            counts += ("v_ttft", 1)
        if v.tpot:
            counts += ("v_tpot", 1)
        if v.any:
            counts += ("v_any", 1)
        if outcome.ttft_s is not None:
            counts += (f"ttft:{histogram_index(outcome.ttft_s)}", 1)
        if outcome.tpot_s is not None:
            counts += (f"tpot:{histogram_index(outcome.tpot_s)}", 1)
        sums: list = []
        if outcome.predicted_ttft_s is not None and outcome.ttft_s is not None:
            # Prediction quality: sums, so windows add up (mean error, MAPE).
            err = outcome.predicted_ttft_s - outcome.ttft_s
            counts += ("pred_n", 1)
            sums += ("pred_err_sum", err, "pred_abs_err_sum", abs(err))
            sums += ("pred_ape_sum", abs(err) / max(outcome.ttft_s, 1e-6))
        return [
            self._outcome_key(outcome.request_id),
            self._bucket_key(outcome.slo_class, self._bucket_start(outcome.finished_at)),
            self._classes_key,
            self.outcome_ttl_s,
            self.retention_s + self.bucket_s,
            outcome.slo_class,
            outcome.finished_at,
            len(record) // 2,
            *record,
            len(counts) // 2,
            *counts,
            *sums,
        ]

    def get_outcome(self, request_id: str) -> dict[str, str] | None:
        """The stored record of one request (all values as strings), or None."""
        return self.client.hgetall(self._outcome_key(request_id)) or None

    def window_stats(
        self, slo_class: str, window_s: float, now: float | None = None
    ) -> WindowStats:
        """Aggregates over the buckets that overlap ``[now - window_s, now]``.

        Bucket granularity: the oldest bucket counts whole, so the window is up to
        ``bucket_s`` longer than asked."""
        now = time.time() if now is None else now
        window_s = min(window_s, self.retention_s)
        first = self._bucket_start(now - window_s)
        last = self._bucket_start(now)
        pipe = self.client.pipeline(transaction=False)
        for start in range(first, last + 1, self.bucket_s):
            pipe.hgetall(self._bucket_key(slo_class, start))
        totals = {"n": 0, "errors": 0, "v_ttft": 0, "v_tpot": 0, "v_any": 0, "pred_n": 0}
        sums = dict.fromkeys(("pred_err_sum", "pred_abs_err_sum", "pred_ape_sum"), 0.0)
        ttft, tpot = [0] * _NB, [0] * _NB
        newest: float | None = None
        for bucket in pipe.execute():
            for name, value in bucket.items():
                if name in totals:
                    totals[name] += int(value)
                elif name in sums:
                    sums[name] += float(value)
                elif name == "newest":
                    newest = max(newest or 0.0, float(value))
                else:
                    kind, _, idx = name.partition(":")
                    (ttft if kind == "ttft" else tpot)[int(idx)] += int(value)
        return WindowStats(
            slo_class=slo_class,
            window_s=window_s,
            requests=totals["n"],
            errors=totals["errors"],
            ttft_violations=totals["v_ttft"],
            tpot_violations=totals["v_tpot"],
            violations=totals["v_any"],
            ttft_hist=tuple(ttft),
            tpot_hist=tuple(tpot),
            newest_at=newest,
            predicted=totals["pred_n"],
            ttft_pred_err_sum_s=sums["pred_err_sum"],
            ttft_pred_abs_err_sum_s=sums["pred_abs_err_sum"],
            ttft_pred_ape_sum=sums["pred_ape_sum"],
        )

    # -- targets -----------------------------------------------------------------------

    def put_target(self, target: SloTarget) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self._target_key(target.name), mapping=asdict(target))
        pipe.sadd(self._classes_key, target.name)
        pipe.execute()

    def get_target(self, slo_class: str) -> SloTarget | None:
        raw = self.client.hgetall(self._target_key(slo_class))
        return _target_from_hash(raw) if raw else None

    def list_targets(self) -> list[SloTarget]:
        names = sorted(self.client.smembers(self._classes_key))
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self._target_key(name))
        return [_target_from_hash(raw) for raw in pipe.execute() if raw]

    def delete_class(self, slo_class: str) -> int:
        """Remove a class's target and all its buckets; returns the keys deleted."""
        keys = [self._target_key(slo_class)]
        keys += list(self.client.scan_iter(match=self._bucket_key(slo_class, "*"), count=500))
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(*keys)
        pipe.srem(self._classes_key, slo_class)
        deleted, _ = pipe.execute()
        return int(deleted)

    def ping(self) -> bool:
        return bool(self.client.ping())

    # -- worker load (admission writes, the operator reads) ----------------------------
    #
    # Keys: ``{prefix}:load:{pool}`` sorted set of worker addresses scored by report time,
    # and ``{prefix}:load:{pool}:{worker}`` hash, one per worker, expiring after
    # ``ttl_s``. ``pool`` names the worker Deployment, so the operator finds the load of
    # the workers it scales. The index is trimmed on every write and expires with its
    # last worker, so memory stays bounded by the live workers.

    def _load_index_key(self, pool: str) -> str:
        return f"{self.prefix}:load:{pool}"

    def _load_key(self, pool: str, worker: str) -> str:
        return f"{self.prefix}:load:{pool}:{worker}"

    def put_worker_load(self, pool: str, report: WorkerLoadReport, ttl_s: int = 30) -> None:
        """Store one worker's latest load report in one transaction."""
        if ttl_s < 1:
            raise ValueError("ttl_s must be >= 1")
        record = {k: (int(v) if isinstance(v, bool) else v) for k, v in asdict(report).items()}
        index = self._load_index_key(pool)
        key = self._load_key(pool, report.worker)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping=record)
        pipe.expire(key, ttl_s)
        pipe.zadd(index, {report.worker: report.reported_at})
        pipe.zremrangebyscore(index, "-inf", report.reported_at - ttl_s)
        pipe.expire(index, ttl_s)
        pipe.execute()

    def worker_loads(self, pool: str) -> list[WorkerLoadReport]:
        """The latest report of every worker of ``pool`` whose report has not expired."""
        workers = self.client.zrange(self._load_index_key(pool), 0, -1)
        pipe = self.client.pipeline(transaction=False)
        for worker in workers:
            pipe.hgetall(self._load_key(pool, worker))
        return [_load_from_hash(raw) for raw in pipe.execute() if raw]


def _target_from_hash(raw: dict[str, str]) -> SloTarget:
    kwargs = {}
    for f in fields(SloTarget):
        if f.name in raw:
            kwargs[f.name] = raw[f.name] if f.name == "name" else float(raw[f.name])
    return SloTarget(**kwargs)


def _load_from_hash(raw: dict[str, str]) -> WorkerLoadReport:
    kwargs: dict[str, object] = {}
    for f in fields(WorkerLoadReport):
        if f.name not in raw:
            continue
        value = raw[f.name]
        if f.name == "worker":
            kwargs[f.name] = value
        elif f.name == "reported_at":
            kwargs[f.name] = float(value)
        elif f.name == "draining":
            kwargs[f.name] = value not in ("0", "", "False", "false")
        else:
            kwargs[f.name] = int(value)
    return WorkerLoadReport(**kwargs)
