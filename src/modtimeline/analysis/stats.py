"""Small, dependency-free statistics for comparing per-step timings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

EXACT_LIMIT = 400  # exact Mann-Whitney distribution while n1 * n2 is at most this (and no ties)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("median of no values")
    middle = n // 2
    return float(ordered[middle]) if n % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def relative_spread(values: Sequence[float]) -> float:
    """Median absolute deviation over the median: a robust coefficient of variation."""
    center = median(values)
    if center == 0:
        return 0.0
    return median([abs(v - center) for v in values]) / abs(center)


def _ranks(values: list[float]) -> tuple[list[float], list[int]]:
    """Average ranks (1-based) and the sizes of tied groups."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    ties: list[int] = []
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        if j > i:
            ties.append(j - i + 1)
        i = j + 1
    return ranks, ties


@lru_cache(maxsize=256)
def _u_distribution(n1: int, n2: int) -> tuple[int, ...]:
    """Number of arrangements giving each U = 0 .. n1*n2 (no ties)."""
    # counts[i][j] is the distribution for sizes (i, j); built up row by row.
    previous = [[1] for _ in range(n2 + 1)]  # i = 0: only U = 0
    for i in range(1, n1 + 1):
        current = [[1]]  # j = 0: only U = 0
        for j in range(1, n2 + 1):
            # the largest value is from sample 1 (adds j to U) or from sample 2
            size = i * j + 1
            row = [0] * size
            for u, count in enumerate(previous[j]):
                row[u + j] += count
            for u, count in enumerate(current[j - 1]):
                row[u] += count
            current.append(row)
        previous = current
    return tuple(previous[n2])


def mann_whitney_u(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test that ``a`` and ``b`` come from one
    distribution: exact for small samples without ties, else the normal approximation
    with tie and continuity corrections."""
    n1, n2 = len(a), len(b)
    if n1 == 0 or n2 == 0:
        return 1.0
    ranks, ties = _ranks(list(a) + list(b))
    u1 = sum(ranks[:n1]) - n1 * (n1 + 1) / 2
    u = min(u1, n1 * n2 - u1)
    if not ties and n1 * n2 <= EXACT_LIMIT:
        counts = _u_distribution(n1, n2)
        total = sum(counts)
        tail = sum(counts[: int(u) + 1])
        return min(1.0, 2 * tail / total)
    n = n1 + n2
    tie_term = sum(t**3 - t for t in ties) / (n * (n - 1)) if n > 1 else 0.0
    variance = n1 * n2 / 12 * ((n + 1) - tie_term)
    if variance <= 0:
        return 1.0
    z = (abs(u1 - n1 * n2 / 2) - 0.5) / math.sqrt(variance)
    return min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2)))


@lru_cache(maxsize=1024)
def smallest_p(n1: int, n2: int) -> float:
    """The smallest p-value ``mann_whitney_u`` gives samples of these sizes: every value
    of one below every value of the other. (How few steps can never be significant.)"""
    return mann_whitney_u(range(n1), range(n1, n1 + n2))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error control)."""
    m = len(p_values)
    order = sorted(range(m), key=p_values.__getitem__)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (false discovery rate control)."""
    m = len(p_values)
    order = sorted(range(m), key=p_values.__getitem__, reverse=True)
    adjusted = [0.0] * m
    running = 1.0
    for position, i in enumerate(order):
        rank = m - position
        running = min(running, p_values[i] * m / rank)
        adjusted[i] = min(1.0, running)
    return adjusted
