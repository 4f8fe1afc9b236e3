"""rrtf_jax/stats.py: the bootstrap over problems against a direct NumPy bootstrap and the
analytic standard error, its seeding and degenerate inputs; the paired difference's interval on
constructed cases and its sign test against hand-computed binomials (McNemar's exact test for 0/1
values). No model."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from rrtf_jax.stats import bootstrap_mean, paired_difference


def _values(n=400, seed=1):
  """pass@k-like per-problem values: a third 0, a third 1, a third fractions."""
  rng = np.random.default_rng(seed)
  v = rng.random(n)
  v[: n // 3] = 0.0
  v[n // 3 : 2 * n // 3] = 1.0
  return rng.permutation(v)


def _sign_test_p(x: int, y: int) -> float:
  """The exact two-sided binomial p of x successes in x + y fair trials (a symmetric null:
  twice the smaller tail, at most 1)."""
  n = x + y
  tail = sum(math.comb(n, i) for i in range(min(x, y) + 1)) / 2**n
  return min(1.0, 2 * tail)


def test_bootstrap_mean_matches_analytic_se_and_numpy_bootstrap():
  v = _values()
  out = bootstrap_mean(v)
  assert out["mean"] == pytest.approx(v.mean(), abs=1e-15)
  analytic = v.std() / math.sqrt(v.size)  # the plug-in SE the bootstrap estimates
  assert out["se"] == pytest.approx(analytic, rel=0.04), (out["se"], analytic)
  # A direct bootstrap with another generator: the same distribution, so the same interval up
  # to Monte Carlo error (a few hundredths of an SE); a 90% or one-sided interval would not pass.
  rng = np.random.default_rng(12345)
  means = v[rng.integers(0, v.size, (20000, v.size))].mean(axis=1)
  lo, hi = np.percentile(means, [2.5, 97.5])
  assert out["ci95"][0] == pytest.approx(lo, abs=0.1 * analytic)
  assert out["ci95"][1] == pytest.approx(hi, abs=0.1 * analytic)
  # Near normal at 400 problems: mean ± 1.96 SE.
  assert out["ci95"][1] - out["ci95"][0] == pytest.approx(2 * 1.96 * analytic, rel=0.05)
  assert out["ci95"][0] < out["mean"] < out["ci95"][1]
  # confidence is honoured: a 50% interval is about a third as wide.
  half = bootstrap_mean(v, confidence=0.5)["ci95"]
  assert half[1] - half[0] == pytest.approx(2 * 0.674 * analytic, rel=0.08)


def test_bootstrap_mean_is_deterministic_for_a_seed():
  v = _values(200, seed=2)
  assert bootstrap_mean(v, seed=3) == bootstrap_mean(list(v), seed=3)
  assert bootstrap_mean(v) == bootstrap_mean(v, seed=0)
  other = bootstrap_mean(v, seed=4)
  assert other["ci95"] != bootstrap_mean(v, seed=3)["ci95"]  # the seed is used
  assert other["mean"] == bootstrap_mean(v, seed=3)["mean"]


@pytest.mark.parametrize("values", [[0.25], [1.0], [0.0] * 7, [0.1] * 3, [1.0] * 164])
def test_bootstrap_mean_degenerate_inputs(values):
  """One problem, or all values equal: se 0 and [mean, mean], no NaN, no warning, no error."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = bootstrap_mean(values)
  m = float(np.mean(values))
  assert out == {"mean": m, "se": 0.0, "ci95": [m, m]}


def test_bad_inputs_are_value_errors():
  for call in (
    lambda: bootstrap_mean([]),
    lambda: bootstrap_mean([0.5, float("nan")]),
    lambda: paired_difference([1, 0], [1]),
    lambda: paired_difference([], []),
  ):
    with pytest.raises(ValueError):
      call()


def test_paired_difference_interval_is_paired():
  """b is a with 15 of a's 300 solved problems lost: the true difference is 0.05. A paired
  bootstrap's SE is that of the differences (about 0.013) and its interval excludes 0; resampling
  a and b independently would give an SE near 0.04 and an interval across 0."""
  rng = np.random.default_rng(5)
  a = (rng.random(300) < 0.5).astype(float)
  b = a.copy()
  b[rng.choice(np.flatnonzero(a), 15, replace=False)] = 0.0
  out = paired_difference(a, b)
  assert out["difference"] == pytest.approx(0.05, abs=1e-12)
  d = a - b
  assert out["se"] == pytest.approx(d.std() / math.sqrt(d.size), rel=0.05)
  lo, hi = out["ci95"]
  assert 0 < lo < 0.05 < hi
  assert (out["a_better"], out["b_better"], out["ties"]) == (15, 0, 285)
  assert out["p_value"] == pytest.approx(2 / 2**15, rel=1e-12)


def test_paired_difference_covers_the_true_difference():
  """Fractional values (pass@1 estimates of 10 samples) with a true mean difference of 0.1: the
  95% interval holds 0.1 and the sample difference is mean(a) - mean(b)."""
  rng = np.random.default_rng(7)
  skill = rng.random(250)
  a = rng.binomial(10, np.clip(skill + 0.1, 0, 1)) / 10
  b = rng.binomial(10, skill) / 10
  out = paired_difference(a, b)
  assert out["difference"] == pytest.approx(a.mean() - b.mean(), abs=1e-12)
  lo, hi = out["ci95"]
  assert lo < 0.1 < hi and lo < out["difference"] < hi
  assert out["a_better"] + out["b_better"] + out["ties"] == 250
  # Swapping the models mirrors everything.
  back = paired_difference(b, a)
  assert back["difference"] == pytest.approx(-out["difference"], abs=1e-12)
  assert (back["a_better"], back["b_better"], back["ties"]) == (
    out["b_better"],
    out["a_better"],
    out["ties"],
  )
  assert back["p_value"] == out["p_value"]
  assert back["se"] == pytest.approx(out["se"], rel=0.05)


def test_sign_test_against_hand_computed_binomial_ties_excluded():
  # 7 problems where A is better, 2 where B is, and ties in any number: 2 * (1 + 9 + 36) / 2**9.
  for ties in (0, 1, 40):
    a = [0.9] * 7 + [0.1] * 2 + [0.5] * ties
    b = [0.2] * 7 + [0.3] * 2 + [0.5] * ties
    out = paired_difference(a, b)
    assert (out["a_better"], out["b_better"], out["ties"]) == (7, 2, ties)
    assert out["p_value"] == pytest.approx(0.1796875, abs=1e-12)
    assert out["p_value"] == pytest.approx(_sign_test_p(7, 2), abs=1e-12)
  # The size of a difference does not matter to a sign test, only its direction.
  assert paired_difference([1.0, 0.6, 0.0], [0.0, 0.5, 0.1])["p_value"] == pytest.approx(1.0)
  assert paired_difference([0.3] * 10, [0.2] * 10)["p_value"] == pytest.approx(2 / 1024)


def test_sign_test_is_mcnemars_exact_test_for_greedy_outputs():
  """0/1 values (greedy: solved or not): the 2x2 table's discordant cells are a_better and
  b_better, and the p-value is McNemar's exact one for every split tried."""
  rng = np.random.default_rng(11)
  for _ in range(20):
    a = rng.integers(0, 2, 60)
    b = np.where(rng.random(60) < 0.7, a, rng.integers(0, 2, 60))
    b10 = int(np.sum((a == 1) & (b == 0)))  # solved by A only
    b01 = int(np.sum((a == 0) & (b == 1)))  # solved by B only
    out = paired_difference(a, b)
    assert (out["a_better"], out["b_better"]) == (b10, b01)
    assert out["ties"] == int(np.sum(a == b))
    assert out["p_value"] == pytest.approx(_sign_test_p(b10, b01), abs=1e-12)
    assert out["difference"] == pytest.approx((b10 - b01) / 60, abs=1e-12)


def test_paired_difference_degenerate_inputs():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    same = paired_difference([0.5, 1.0, 0.0], [0.5, 1.0, 0.0])
    shifted = paired_difference([0.75, 0.5], [0.5, 0.25])
    one = paired_difference([1.0], [0.0])
  assert same["difference"] == 0.0 and same["se"] == 0.0 and same["ci95"] == [0.0, 0.0]
  assert (same["a_better"], same["b_better"], same["ties"], same["p_value"]) == (0, 0, 3, 1.0)
  assert shifted["se"] == 0.0 and shifted["ci95"] == [0.25, 0.25] and shifted["a_better"] == 2
  assert shifted["p_value"] == pytest.approx(0.5)
  assert one["ci95"] == [1.0, 1.0] and one["p_value"] == 1.0 and one["a_better"] == 1
  assert "sign test" in one["test"]
