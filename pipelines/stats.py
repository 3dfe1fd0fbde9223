"""Intervals and paired tests for every rate the pipeline reports.

Why these three:
    * Wilson score interval for a proportion: unlike the normal approximation it stays inside [0, 1] and keeps its
      coverage at 0/n and n/n, which is where small-model safety rates sit (0 of 14 refused);
    * percentile bootstrap over *prompts* for means, goodness@q and kappa: the unit we sample is the prompt, so the
      jailbreak variants of one prompt move together and the interval is not made narrow by correlated rows;
    * exact McNemar (two-sided binomial on the discordant pairs) for base -> SFT -> RL on the same items, and a paired
      bootstrap for differences of means: two models answering the same prompts are compared item by item, which has
      far more power than comparing two independent intervals.
All functions are deterministic (a seeded numpy generator) so metrics files are byte-identical across reruns.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

from .errors import PipelineError

Z95 = 1.959963984540054  # two-sided 95% normal quantile
N_BOOT = 2000  # bootstrap resamples: the percentile ends move by < 0.01 between seeds at this count for n >= 14
ALPHA = 0.05


def _round(x: float) -> float:
    return round(float(x), 4)


def wilson(k: int, n: int, z: float = Z95) -> Tuple[float, float]:
    """Wilson score interval of k successes in n trials.

    Returns:
        (lo, hi), rounded to 4 places; n = 0 is an error (a rate over nothing is not a number).
    """
    if n <= 0:
        raise PipelineError("wilson: n must be positive (no items to measure)")
    if not 0 <= k <= n:
        raise PipelineError(f"wilson: k={k} outside 0..n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return _round(max(0.0, centre - half)), _round(min(1.0, centre + half))


def wilson_flags(flags: Sequence[bool]) -> Tuple[float, float]:
    flags = list(flags)
    return wilson(sum(bool(f) for f in flags), len(flags))


def _groups(keys: Optional[Sequence[Hashable]], n: int) -> List[np.ndarray]:
    """Row indices per resampling unit (one unit per row when keys is None), in first-seen order."""
    if keys is None:
        return [np.array([i]) for i in range(n)]
    index: Dict[Hashable, List[int]] = {}
    for i, k in enumerate(keys):
        index.setdefault(k, []).append(i)
    return [np.array(v) for v in index.values()]


def _resampled(rows: List, stat: Callable[[List], float], groups: Optional[Sequence[Hashable]], n_boot: int,
               seed: int) -> np.ndarray:
    """stat() of n_boot resamples of rows, whole groups drawn with replacement (seeded: reproducible)."""
    units = _groups(groups, len(rows))
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, len(units), len(units))
        out[b] = stat([rows[i] for u in pick for i in units[u]])
    return out


def bootstrap_ci(rows: Sequence, stat: Callable[[List], float], groups: Optional[Sequence[Hashable]] = None,
                 n_boot: int = N_BOOT, seed: int = 0) -> Tuple[float, float]:
    """Percentile bootstrap 95% interval of ``stat(rows)``, resampling whole groups (e.g. prompts) with replacement.

    Args:
        rows: the items (any objects); ``stat`` receives a resampled list of them.
        stat: the statistic, e.g. a mean or goodness@q.
        groups: one key per row; rows sharing a key are resampled together. None = each row is its own unit.
        n_boot: resamples.
        seed: fixed, so the interval is reproducible.
    """
    rows = list(rows)
    if not rows:
        raise PipelineError("bootstrap_ci: no rows")
    lo, hi = np.percentile(_resampled(rows, stat, groups, n_boot, seed), [2.5, 97.5])
    return _round(lo), _round(hi)


def mean_ci(values: Sequence[float], groups: Optional[Sequence[Hashable]] = None) -> Tuple[float, float]:
    return bootstrap_ci(list(values), lambda v: sum(v) / len(v), groups)


def mcnemar_p(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value for paired binary outcomes of two models on the same items.

    Only discordant items count: b01 (a False, b True) and b10. Under "no difference" each discordant item is a fair
    coin, so p = min(1, 2 * P[Binomial(b01 + b10, 1/2) <= min(b01, b10)]). No discordant items gives p = 1.
    """
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise PipelineError(f"mcnemar: the two models were scored on different item counts ({len(a)} vs {len(b)})")
    b01 = sum((not x) and y for x, y in zip(a, b))
    b10 = sum(x and (not y) for x, y in zip(a, b))
    n = b01 + b10
    if n == 0:
        return 1.0
    k = min(b01, b10)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return _round(min(1.0, 2 * tail))


def paired_bootstrap_p(a: Sequence[float], b: Sequence[float], groups: Optional[Sequence[Hashable]] = None,
                       stat: Optional[Callable[[List[Tuple[float, float]]], float]] = None,
                       n_boot: int = N_BOOT, seed: int = 0) -> float:
    """Two-sided paired bootstrap p-value that stat(b) - stat(a) is 0 (default stat: the mean), resampling items
    (or groups of items) shared by both models. p = 2 x the smaller share of resampled differences on either side of
    0, capped at 1."""
    a, b = list(a), list(b)
    if len(a) != len(b) or not a:
        raise PipelineError(f"paired_bootstrap_p: needs two equal, non-empty lists ({len(a)} vs {len(b)})")
    diff = stat or (lambda ps: sum(y - x for x, y in ps) / len(ps))
    d = _resampled(list(zip(a, b)), diff, groups, n_boot, seed)
    if np.all(d == 0):
        return 1.0
    p = 2 * min(np.mean(d <= 0), np.mean(d >= 0))
    return _round(min(1.0, p))


def significant(p: float, alpha: float = ALPHA) -> bool:
    return p < alpha


def fmt_ci(value: Optional[float], ci: Optional[Sequence[float]], digits: int = 3) -> str:
    """`0.571 [0.326, 0.786]` for tables; '–' for a missing value."""
    if value is None:
        return "–"
    if not ci:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def ranks(values: Sequence[float]) -> List[float]:
    """1-based ranks, ties sharing their average rank (what Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson on tie-averaged ranks); 0 when either side is constant."""
    if len(a) != len(b) or len(a) < 2:
        raise PipelineError(f"spearman: needs two equal lists of >= 2 values ({len(a)} vs {len(b)})")
    ra, rb = np.array(ranks(a)), np.array(ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return _round(float((ra * rb).sum()) / den) if den else 0.0
