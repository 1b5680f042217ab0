"""Small statistics helpers: Wilson and bootstrap intervals (plain, and paired over clusters), a median that accepts no values."""
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


def paired_clustered_ci(diffs: list[float], clusters: list[str], resamples: int = 9999,
                        seed: int = 0) -> tuple[float, float, float]:
    """Mean of paired differences with a 95% cluster-bootstrap interval: (mean, low, high).

    ``diffs[i]`` is method A's score minus method B's on example i (same example, same run);
    ``clusters[i]`` names what examples share (a story and its questions, one haystack), so that
    questions of one story are resampled together rather than treated as independent draws. The
    statistic is the pooled mean (sum of differences over sum of examples of the resampled clusters);
    the interval is scipy's percentile bootstrap over clusters (paired: a cluster's sum and size
    travel together). With one cluster the interval is the point itself.
    """
    import numpy as np
    from scipy.stats import bootstrap

    if not diffs:
        raise ValueError("no paired examples")
    if len(diffs) != len(clusters):
        raise ValueError("one cluster name per difference")
    names = sorted(set(clusters))
    sums = np.array([sum(d for d, c in zip(diffs, clusters) if c == name) for name in names], dtype=float)
    sizes = np.array([clusters.count(name) for name in names], dtype=float)
    mean = float(sums.sum() / sizes.sum())
    if len(names) < 2 or np.all(sums / sizes == mean):
        return mean, mean, mean
    result = bootstrap((sums, sizes), lambda s, n, axis=-1: s.sum(axis=axis) / n.sum(axis=axis), paired=True,
                       vectorized=True, n_resamples=resamples, method="percentile", rng=np.random.default_rng(seed))
    return mean, float(result.confidence_interval.low), float(result.confidence_interval.high)
