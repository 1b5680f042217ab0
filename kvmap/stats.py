"""Small statistics helpers: Wilson and bootstrap intervals, a median that accepts no values."""
from __future__ import annotations

import math
import statistics


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial rate (Wilson 1927); (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def median(xs: list[float]) -> float | None:
    """The median of ``xs``; None when there are none."""
    return statistics.median(xs) if xs else None


def mean_ci(xs: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``xs`` (for scores that are not 0/1)."""
    import random

    if not xs:
        return 0.0, 1.0
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(xs, k=len(xs))) / len(xs) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]
