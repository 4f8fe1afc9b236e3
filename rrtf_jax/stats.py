"""Uncertainty of evaluation figures: a bootstrap over problems, and a paired test of two models.

HumanEval has 164 problems, so a greedy pass@1 of 45% has a standard error of about 4 points:
the problems are a sample, and another sample like them would score differently. `bootstrap_mean`
resamples the problems (one value per problem, e.g. its pass@k estimate) and reports the
standard error and a percentile interval of the mean; `paired_difference` compares two models on
the same problems: the bootstrap of the per-problem differences and an exact sign test. Both use
SciPy's own implementations (`scipy.stats.bootstrap`, `scipy.stats.binomtest`), seeded, so the
same inputs and seed always give the same numbers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

RESAMPLES = 10000
CONFIDENCE = 0.95


def bootstrap_mean(
  values: Sequence[float],
  *,
  seed: int = 0,
  resamples: int = RESAMPLES,
  confidence: float = CONFIDENCE,
) -> dict:
  """The mean of `values` (one per problem), its bootstrap standard error and percentile interval.

  Returns {"mean", "se", "ci95": [lo, hi]}: `se` is the standard deviation of the `resamples`
  bootstrap means (scipy's `standard_error`), `ci95` the percentile interval at `confidence`
  (0.95 unless told; the key keeps its name). Deterministic for a `seed`. One problem, or every
  value equal, leaves nothing to resample: se 0 and the interval [mean, mean].
  """
  x = _values(values, "bootstrap_mean")
  mean = float(np.mean(x))
  if x.size == 1 or np.all(x == x[0]):
    return {"mean": mean, "se": 0.0, "ci95": [mean, mean]}
  return {"mean": mean, **_bootstrap(x, seed, resamples, confidence)}


def paired_difference(
  a: Sequence[float],
  b: Sequence[float],
  *,
  seed: int = 0,
  resamples: int = RESAMPLES,
  confidence: float = CONFIDENCE,
) -> dict:
  """Model A against model B on the same problems: `a[i]` and `b[i]` are their values on problem
  i (the pass@1 estimates c/n).

  Returns:
    difference: the mean of a - b (A's pass@1 minus B's over these problems).
    se, ci95: the standard error and percentile interval of that difference from a paired
      bootstrap over problems (a resampled problem keeps both models' values: the bootstrap of
      the differences a - b); se 0 and [d, d] when every difference is the same d.
    a_better, b_better, ties: the problems where a's value is above b's, below it, equal.
    p_value: the exact two-sided sign test, binomtest(a_better, a_better + b_better, 0.5): if
      neither model is better, each problem where they differ is a fair coin; ties carry no
      information and are left out. 1.0 when they differ nowhere. For greedy outputs (n = 1 per
      problem, values 0 or 1) a_better and b_better are the discordant pairs (solved by one
      model only) and this is exactly McNemar's exact test.
    test: what was done, in words.
  """
  from scipy.stats import binomtest

  x, y = _values(a, "paired_difference"), _values(b, "paired_difference")
  if x.shape != y.shape:
    raise ValueError(
      f"paired_difference needs one value per problem from each model, got {x.size} and {y.size}"
    )
  d = x - y
  diff = float(np.mean(d))
  if d.size == 1 or np.all(d == d[0]):
    boot = {"se": 0.0, "ci95": [diff, diff]}
  else:
    boot = _bootstrap(d, seed, resamples, confidence)
  a_better, b_better = int(np.sum(x > y)), int(np.sum(x < y))
  discordant = a_better + b_better
  p = float(binomtest(a_better, discordant, 0.5).pvalue) if discordant else 1.0
  return {
    "difference": diff,
    **boot,
    "a_better": a_better,
    "b_better": b_better,
    "ties": int(d.size - discordant),
    "p_value": p,
    "test": (
      f"paired bootstrap over problems of mean(a - b) ({resamples} resamples, seed {seed}, "
      f"{confidence:.0%} percentile interval); exact two-sided sign test over the problems "
      "where a != b (McNemar's exact test when the values are 0/1)"
    ),
  }


def _values(values: Sequence[float], who: str) -> np.ndarray:
  x = np.asarray(values, dtype=np.float64)
  if x.ndim != 1 or x.size == 0:
    raise ValueError(f"{who} needs a non-empty list of numbers, one per problem")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{who}: the values must be finite numbers")
  return x


def _bootstrap(x: np.ndarray, seed: int, resamples: int, confidence: float) -> dict:
  """scipy's percentile bootstrap of the mean of x (at least two distinct values)."""
  from scipy.stats import bootstrap

  res = bootstrap(
    (x,),
    np.mean,
    n_resamples=resamples,
    confidence_level=confidence,
    method="percentile",
    rng=np.random.default_rng(seed),
  )
  ci = res.confidence_interval
  return {"se": float(res.standard_error), "ci95": [float(ci.low), float(ci.high)]}
