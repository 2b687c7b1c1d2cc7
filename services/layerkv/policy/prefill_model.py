"""Online model of engine step time, fitted from the engine's own measurements.

Each step is one sample ``(tokens, attention_pairs, seconds)``: ``tokens`` is the
number of tokens it computed, ``attention_pairs`` the sum over its requests of
``new_tokens * context_length`` (the quadratic part of attention). A least-squares
fit of ``seconds = a + b*tokens + c*attention_pairs`` over a sliding window gives,
for a prompt of ``P`` tokens computed from scratch, ``a + b*P + c*P^2``.

Only prefill-dominated steps (at least ``min_prefill_tokens`` prompt tokens) enter the
fit: decode steps of long contexts have many attention pairs per token and, being
the vast majority of steps, would otherwise drive the fit (one decode step of eight
2K-token requests has 16K pairs and lasts as long as a 300-token prefill).
Decode-only steps feed an EWMA of the decode step time used by the slack instead.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from layerkv.common.linalg import solve_linear


@dataclass(frozen=True)
class PrefillCoefficients:
    a: float
    b: float
    c: float

    def predict(self, prompt_tokens: int) -> float:
        p = float(prompt_tokens)
        return max(0.0, self.a + self.b * p + self.c * p * p)


class OnlineStepTimeModel:
    """Sliding-window least squares for prefill time plus an EWMA of decode steps."""

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
        full = self._least_squares(use_quadratic=True)
        if full is not None and full.c >= 0 and full.b >= 0:
            return full
        # A negative term would predict shorter prefills for longer prompts; drop the
        # quadratic term (it is the weakest-determined one) and refit.
        linear = self._least_squares(use_quadratic=False)
        if linear is not None and linear.b >= 0:
            return linear
        return self._prior

    def _least_squares(self, use_quadratic: bool) -> PrefillCoefficients | None:
        """Unconstrained least squares (negative b or c are returned as such, so the
        caller can reject the fit: clipping one term of a joint fit leaves the others
        wrong)."""
        # Normal equations X^T X w = X^T y with features (1, tokens, pairs); the pair
        # feature is scaled to keep the system well conditioned.
        scale = 1e-6
        xtx = [[0.0] * 3 for _ in range(3)]
        xty = [0.0] * 3
        for tokens, pairs, secs in self._samples:
            x = (1.0, tokens, pairs * scale if use_quadratic else 0.0)
            for i in range(3):
                xty[i] += x[i] * secs
                for j in range(3):
                    xtx[i][j] += x[i] * x[j]
        if not use_quadratic:
            xtx[2][2] = 1.0  # pins c = 0
        w = solve_linear(xtx, xty, eps=1e-18)
        if w is None:
            return None
        return PrefillCoefficients(a=max(w[0], 0.0), b=w[1], c=w[2] * scale)
