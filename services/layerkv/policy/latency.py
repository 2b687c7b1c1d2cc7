"""Engine latency: the step-time model, its coefficients, and the fitter. Pure: no I/O.

One model of how long the engine takes, used by everyone who predicts time (the TTFT
predictor, the TPOT guard, the LayerKV scheduler's slack gate):

* prefill of one request of ``P`` prompt tokens: ``a + b*P + c*P^2`` seconds
  (:func:`prefill_time_s`; the quadratic term is attention over the prompt);
* a decode step with ``n`` running requests holding ``C`` tokens of context together:
  ``d0 + d1*n + d2*C`` seconds (attention reads every request's KV each step).

Two online estimators feed it, from two vantage points, through one fitter
(:func:`least_squares_nonneg`, non-negative coefficients: a negative slope would
predict negative time for long prompts):

* :class:`OnlineLatencyModel` (the worker): from what vLLM reports, per finished
  request and per engine step, on the lower envelope of the samples
  (:func:`lower_envelope_fit`: sharing a step only lengthens one);
* :class:`OnlineStepTimeModel` (the LayerKV engine scheduler): each engine step it
  times itself, ``seconds ~ a + b*tokens + c*attention_pairs``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from layerkv.policy.linalg import solve_linear


def prefill_time_s(a: float, b: float, c: float, prompt_tokens: int) -> float:
    """Prefill time of a prompt computed from scratch: ``a + b*P + c*P^2`` (>= 0)."""
    p = float(prompt_tokens)
    return max(0.0, a + b * p + c * p * p)


@dataclass(frozen=True)
class LatencyCoefficients:
    prefill_a_s: float = 0.01
    prefill_b_s: float = 5e-5
    prefill_c_s: float = 0.0
    decode_step_s: float = 0.01
    decode_step_s_per_seq: float = 0.0
    samples: int = 0  # measurements behind the fit; 0 = all prior
    # Per token of context the running requests hold (0: the fit is by count alone).
    decode_step_s_per_token: float = 0.0

    def prefill_s(self, prompt_tokens: int) -> float:
        return prefill_time_s(self.prefill_a_s, self.prefill_b_s, self.prefill_c_s, prompt_tokens)

    def prefill_added_s(self, prompt_tokens: int) -> float:
        """What one more prompt adds to a step already prefilling others: its tokens'
        work and its own attention, but not the step's fixed cost again. Attention is
        per request, so a shared step costs ``c * sum(P_i^2)``, not ``c * sum(P_i)^2``."""
        p = float(prompt_tokens)
        return max(0.0, self.prefill_b_s * p + self.prefill_c_s * p * p)

    def decode_step(self, running: int, context_tokens: float = 0.0) -> float:
        """One decode step of ``running`` requests that hold ``context_tokens`` of
        context together."""
        return max(
            0.0,
            self.decode_step_s
            + self.decode_step_s_per_seq * running
            + self.decode_step_s_per_token * context_tokens,
        )


# Prefill-dominated engine steps the LayerKV plug-in's own fit needs before a worker
# reports it instead of the per-request fit: below that the plug-in answers with its
# priors (set for a GPU, far off on a CPU) or a fit of a handful of prompt lengths.
ENGINE_FIT_MIN_SAMPLES = 16


def reported_prefill_fit(
    per_request: LatencyCoefficients,
    engine_fit: tuple[float, float, float] | None,
    engine_fit_samples: int,
) -> tuple[float, float, float]:
    """The prefill coefficients ``(a, b, c)`` a worker reports: the LayerKV plug-in's
    per-step fit once it rests on ``ENGINE_FIT_MIN_SAMPLES`` steps (it times each step
    in the engine, free of queueing), else the fit from vLLM's per-request timings."""
    if engine_fit is not None and engine_fit_samples >= ENGINE_FIT_MIN_SAMPLES:
        return engine_fit
    return (per_request.prefill_a_s, per_request.prefill_b_s, per_request.prefill_c_s)


def least_squares(
    rows: list[list[float]], ys: list[float], ridge: float = 1e-9
) -> list[float] | None:
    """Least squares ``X w ~ y``; None when the system is singular. Columns are scaled
    to unit magnitude first, so P and P^2 (up to ~1e7) stay well conditioned."""
    if not rows:
        return None
    k = len(rows[0])
    scale = [max(max(abs(r[j]) for r in rows), 1e-12) for j in range(k)]
    xtx = [[0.0] * k for _ in range(k)]
    xty = [0.0] * k
    for r, y in zip(rows, ys, strict=True):
        x = [r[j] / scale[j] for j in range(k)]
        for i, xi in enumerate(x):
            xty[i] += xi * y
            for j, xj in enumerate(x):
                xtx[i][j] += xi * xj
    for i in range(k):
        xtx[i][i] += ridge
    w = solve_linear(xtx, xty)
    return None if w is None else [w[j] / scale[j] for j in range(k)]


def least_squares_nonneg(
    rows: list[list[float]], ys: list[float], ridge: float = 1e-9
) -> list[float] | None:
    """:func:`least_squares` with ``w >= 0``, by dropping the most negative coefficient
    and refitting (exact for the 2-3 features used here)."""
    if not rows:
        return None
    k = len(rows[0])
    # "Most negative" in unit-magnitude columns: coefficients of P^2 are tiny in
    # seconds per token squared, and would never look the most negative.
    scale = [max(max(abs(r[j]) for r in rows), 1e-12) for j in range(k)]
    active = list(range(k))
    while active:
        w = least_squares([[r[j] for j in active] for r in rows], ys, ridge)
        if w is None:
            return None
        worst = min(range(len(w)), key=lambda i: w[i] * scale[active[i]])
        if w[worst] >= 0:
            out = [0.0] * k
            for i, j in enumerate(active):
                out[j] = w[i]
            return out
        active.pop(worst)
    return [0.0] * k


def lower_envelope_fit(
    rows: list[list[float]], ys: list[float], keep: float = 0.4, rounds: int = 2
) -> list[float] | None:
    """``least_squares_nonneg`` refitted on the samples at or below the ``keep``
    quantile of the residuals, ``rounds`` times: the lower envelope of the data.

    A request's measured prefill time is its own prefill only when it had the engine
    step to itself; when other prompts shared the step (or it waited behind one) the
    sample is longer, never shorter. The TTFT predictor models that sharing itself,
    so it needs the solo cost: the envelope, not the mean of contaminated samples."""
    w = least_squares_nonneg(rows, ys)
    for _ in range(rounds):
        if w is None or len(rows) < 8:
            return w
        resid = [
            y - sum(wi * xi for wi, xi in zip(w, r, strict=True))
            for r, y in zip(rows, ys, strict=True)
        ]
        cut = sorted(resid)[max(int(keep * len(resid)) - 1, 0)]
        kept = [i for i, e in enumerate(resid) if e <= cut]
        if len(kept) < len(rows[0]) + 1:
            return w
        w = least_squares_nonneg([rows[i] for i in kept], [ys[i] for i in kept])
    return w


class OnlineLatencyModel:
    """Sliding-window fits of prefill time and decode step time."""

    def __init__(
        self,
        prior: LatencyCoefficients | None = None,
        *,
        window: int = 256,
        decode_window: int = 512,
        min_samples: int = 4,
    ) -> None:
        self.prior = prior or LatencyCoefficients()
        self._prefill: deque[tuple[int, float]] = deque(maxlen=window)
        # Decode samples come once per engine step (hundreds a second), prefill ones
        # once per request: a longer window keeps several batch sizes in the fit.
        self._decode: deque[tuple[int, int, float]] = deque(maxlen=decode_window)
        self.min_samples = min_samples
        self._cached: LatencyCoefficients | None = None
        self._by_count: tuple[float, float] = (0.0, 0.0)
        self._with_context: tuple[float, float, float] | None = None

    def observe_prefill(self, prompt_tokens: int, seconds: float) -> None:
        if prompt_tokens > 0 and seconds > 0:
            self._prefill.append((prompt_tokens, seconds))
            self._cached = None

    def observe_decode(
        self, running: int, seconds_per_step: float, context_tokens: int = 0
    ) -> None:
        """One decode step of ``running`` requests holding ``context_tokens`` of context
        together (0: not known; the fit then stays by count alone)."""
        if running > 0 and seconds_per_step > 0:
            self._decode.append((running, max(context_tokens, 0), seconds_per_step))
            self._cached = None

    @property
    def samples(self) -> int:
        return len(self._prefill) + len(self._decode)

    def decode_observations(self) -> list[tuple[int, int, float]]:
        """What the decode fit rests on: ``(requests, context tokens, seconds)`` per
        step, oldest first."""
        return list(self._decode)

    def coefficients(self) -> LatencyCoefficients:
        """Both fits; the decode step with its context term once there is one."""
        if self._cached is None:
            self._cached = self._fit()
        return self._cached

    def decode_fit_by_count(self) -> tuple[float, float]:
        """``(d0, d1)`` of the step fitted by request count alone (``d0 + d1*n``): what
        workers reported before the context term, kept for admission services that
        read only that."""
        self.coefficients()
        return self._by_count

    def decode_fit_with_context(self) -> tuple[float, float, float] | None:
        """``(d0, d1, d2)`` of ``d0 + d1*n + d2*C``; None until the observed contexts
        vary enough to fit it."""
        self.coefficients()
        return self._with_context

    def _fit(self) -> LatencyCoefficients:
        a, b, c = self.prior.prefill_a_s, self.prior.prefill_b_s, self.prior.prefill_c_s
        d0, d1 = self.prior.decode_step_s, self.prior.decode_step_s_per_seq
        used = 0
        if len(self._prefill) >= self.min_samples:
            used += len(self._prefill)
            ps = [p for p, _ in self._prefill]
            ys = [s for _, s in self._prefill]
            # A quadratic needs spread in P; with few distinct lengths fit a line.
            cols = 3 if len(set(ps)) >= 3 else 2
            rows = [[1.0, float(p), float(p) * p][:cols] for p in ps]
            w = lower_envelope_fit(rows, ys)
            if w is not None:
                a, b, c = w[0], w[1], (w[2] if cols == 3 else 0.0)
        self._by_count = (d0, d1)
        self._with_context = None
        d2 = 0.0
        if len(self._decode) >= self.min_samples:
            used += len(self._decode)
            ns = [n for n, _, _ in self._decode]
            cs = [ctx for _, ctx, _ in self._decode]
            ys = [s for _, _, s in self._decode]
            if len(set(ns)) >= 2:
                w = lower_envelope_fit([[1.0, float(n)] for n in ns], ys)
                if w is not None:
                    d0, d1 = w
            else:
                d0, d1 = sum(ys) / len(ys), 0.0
            self._by_count = (d0, d1)
            # The context term needs contexts that vary apart from the count. A fit
            # with next to no fixed cost per step (under a tenth of the fastest step
            # seen) or no context cost could not tell the two apart on its samples: on
            # a LayerKV worker whose requests all held long contexts the fit put the
            # whole step on the context (d0 = d1 = 0), which predicts a step of nothing
            # for a short request; keep the fit by count there.
            if len(set(cs)) >= 3 and len(set(zip(ns, cs, strict=True))) >= 4:
                w = lower_envelope_fit(
                    [[1.0, float(n), float(c)] for n, c in zip(ns, cs, strict=True)], ys
                )
                if w is not None and w[0] >= 0.1 * min(ys) and w[2] > 0:
                    d0, d1, d2 = w
                    self._with_context = (d0, d1, d2)
        return LatencyCoefficients(a, b, c, d0, d1, used, d2)


# -- the LayerKV engine scheduler's own estimator ----------------------------------------


@dataclass(frozen=True)
class PrefillCoefficients:
    a: float
    b: float
    c: float

    def predict(self, prompt_tokens: int) -> float:
        return prefill_time_s(self.a, self.b, self.c, prompt_tokens)


class OnlineStepTimeModel:
    """The engine scheduler's own fit: each step is one sample ``(tokens,
    attention_pairs, seconds)``, ``attention_pairs`` the sum over its requests of
    ``new_tokens * context_length``; ``seconds ~ a + b*tokens + c*pairs`` over a sliding
    window gives a prompt of ``P`` tokens ``a + b*P + c*P^2``.

    Only prefill-dominated steps (``min_prefill_tokens`` prompt tokens or more) enter
    the fit: decode steps of long contexts have many attention pairs per token and,
    being most steps, would drive it. Decode-only steps feed an EWMA of the decode step
    (the slack's step) instead."""

    def __init__(
        self,
        prior: PrefillCoefficients,
        prior_decode_step_s: float,
        window: int = 256,
        min_samples: int = 4,
        ewma_alpha: float = 0.1,
        min_prefill_tokens: int = 32,
    ) -> None:
        self._prior = prior
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=window)
        self._min_samples = min_samples
        self._alpha = ewma_alpha
        self._min_prefill_tokens = min_prefill_tokens
        self._coef = prior
        self._dirty = False
        self.decode_step_s = prior_decode_step_s
        self.samples_seen = 0

    def observe(
        self,
        tokens: int,
        attention_pairs: int,
        seconds: float,
        decode_only: bool,
        prefill_tokens: int | None = None,
    ) -> None:
        """One engine step. ``prefill_tokens``: the step's tokens that were not single
        decode tokens (None: all of ``tokens``)."""
        if tokens <= 0 or seconds <= 0:
            return
        self.samples_seen += 1
        if decode_only:
            self.decode_step_s += self._alpha * (seconds - self.decode_step_s)
            return
        if (tokens if prefill_tokens is None else prefill_tokens) < self._min_prefill_tokens:
            return
        self._samples.append((float(tokens), float(attention_pairs), seconds))
        self._dirty = True

    @property
    def prefill_samples(self) -> int:
        return len(self._samples)

    @property
    def coefficients(self) -> PrefillCoefficients:
        if self._dirty:
            self._coef = self._fit()
            self._dirty = False
        return self._coef

    def predict_prefill_s(self, prompt_tokens: int) -> float:
        return self.coefficients.predict(prompt_tokens)

    def _fit(self) -> PrefillCoefficients:
        samples = self._samples
        if len(samples) < self._min_samples or len({s[0] for s in samples}) < 3:
            return self._prior
        ys = [secs for _, _, secs in samples]
        full = least_squares([[1.0, tokens, pairs] for tokens, pairs, _ in samples], ys)
        if full is not None and full[1] >= 0 and full[2] >= 0:
            return PrefillCoefficients(max(full[0], 0.0), full[1], full[2])
        # A negative term would predict shorter prefills for longer prompts; drop the
        # quadratic term (the weakest-determined one) and refit. Unlike the worker's
        # fit, the intercept is clipped rather than dropped: the engine's slack gate was
        # tuned with this rule (docs/decisions/0002-step-time-model.md).
        linear = least_squares([[1.0, tokens] for tokens, _, _ in samples], ys)
        if linear is not None and linear[1] >= 0:
            return PrefillCoefficients(max(linear[0], 0.0), linear[1], 0.0)
        return self._prior
