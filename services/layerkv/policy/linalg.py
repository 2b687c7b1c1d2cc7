"""Small dense linear algebra for the online latency fits (no numpy on the hot path)."""

from __future__ import annotations


def solve_linear(m: list[list[float]], v: list[float], eps: float = 1e-12) -> list[float] | None:
    """Solve ``m x = v`` by Gaussian elimination with partial pivoting; None when a
    pivot is below ``eps`` in magnitude (singular or ill-posed: keep the prior)."""
    n = len(v)
    a = [[*row, rhs] for row, rhs in zip(m, v, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < eps:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                for k in range(col, n + 1):
                    a[r][k] -= f * a[col][k]
    return [a[i][n] / a[i][i] for i in range(n)]
