"""The RRTF loss against a plain NumPy reference, and chunked token log-probs against full
logits."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrtf_jax.loss import (
  FT_NORMALIZATIONS,
  LOSS_DEFAULTS,
  PAIR_LOSSES,
  WEIGHTINGS,
  check_loss_settings,
  rrtf_loss,
  token_logprobs,
)


def reference(
  logp,
  mask,
  scores,
  teacher,
  weighting="gap",
  ft_weight=1.0,
  ft_normalization="sum",
  pair_loss="hinge",
  beta=2.0,
  gamma=0.5,
):
  """Loops over prompts and pairs, straight from the formulas, in float64."""
  logp = np.asarray(logp, np.float64)
  rank, ft, n = 0.0, 0.0, 0
  right = pairs = 0
  for b in range(logp.shape[0]):
    lens = mask[b].sum(-1)
    idx = [i for i in range(logp.shape[1]) if lens[i] > 0]
    if not idx:
      continue
    n += 1
    p = {i: (logp[b, i] * mask[b, i]).sum() / lens[i] for i in idx}
    for i, j in itertools.product(idx, idx):
      if scores[b, i] < scores[b, j]:
        w = scores[b, j] - scores[b, i] if weighting == "gap" else 1.0
        if pair_loss == "hinge":
          rank += w * max(0.0, p[i] - p[j])
        else:  # -log sigmoid(x), sigmoid(x) = 1 / (1 + exp(-x))
          rank += w * -np.log(1.0 / (1.0 + np.exp(-(beta * (p[j] - p[i]) - gamma))))
        pairs += 1
        right += p[i] < p[j]
    top = max(scores[b, i] for i in idx)
    best = [i for i in idx if scores[b, i] == top]
    best = ([i for i in best if teacher[b, i]] or best)[0]
    tokens = [t for t in range(logp.shape[2]) if mask[b, best, t]]
    nll = -sum(logp[b, best, t] for t in tokens)
    ft += nll / len(tokens) if ft_normalization == "mean" else nll
  return (rank + ft_weight * ft) / n, rank / n, ft / n, right / max(pairs, 1)


def numeric_grad(f, x, eps=1e-6):
  """Central differences of the scalar f at x (float64), one entry at a time."""
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for k in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[k] += eps
    down[k] -= eps
    g[k] = (f(up) - f(down)) / (2 * eps)
  return g


def random_batch(seed, b=5, r=4, t=7):
  rng = np.random.default_rng(seed)
  logp = -rng.exponential(1.0, (b, r, t)).astype(np.float32)
  mask = (rng.random((b, r, t)) < 0.7).astype(np.float32)
  mask[0, 3] = 0  # a padding response
  mask[1] = 0  # a padding prompt
  scores = rng.choice([0.0, 1.0, 2.25, 2.5, 3.0, 3.5], (b, r)).astype(np.float32)
  scores[2] = 3.0  # all equal: no pairs, and the teacher wins the tie
  teacher = rng.random((b, r)) < 0.4
  teacher[2] = [False, False, True, False]
  return logp, mask, scores, teacher


SETTINGS = list(itertools.product(FT_NORMALIZATIONS, PAIR_LOSSES, WEIGHTINGS))


@pytest.mark.parametrize("ft_normalization,pair_loss,weighting", SETTINGS)
@pytest.mark.parametrize("seed", range(3))
def test_loss_equals_numpy_reference(seed, ft_normalization, pair_loss, weighting):
  logp, mask, scores, teacher = random_batch(seed)
  opts = dict(
    weighting=weighting, ft_normalization=ft_normalization, pair_loss=pair_loss, beta=1.5, gamma=0.3
  )
  loss, m = jax.jit(lambda *a: rrtf_loss(*a, ft_weight=0.7, **opts))(logp, mask, scores, teacher)
  want, rank, ft, acc = reference(logp, mask, scores, teacher, ft_weight=0.7, **opts)
  np.testing.assert_allclose(
    [loss, m["rank_loss"], m["ft_loss"], m["ranking_accuracy"]],
    [want, rank, ft, acc],
    rtol=1e-5,
    atol=1e-6,
  )
  assert m["pairs"] > 0 and rank > 0 and ft > 0  # the batch exercises both terms


@pytest.mark.parametrize("ft_normalization,pair_loss,weighting", SETTINGS)
def test_gradient_equals_numpy_reference_numeric_gradient(ft_normalization, pair_loss, weighting):
  """jax.grad w.r.t. the token log-probs against central differences of the float64 reference:
  padding tokens, padding responses and padding prompts get none."""
  logp, mask, scores, teacher = random_batch(4)
  opts = dict(
    weighting=weighting, ft_normalization=ft_normalization, pair_loss=pair_loss, beta=1.5, gamma=0.3
  )
  got = jax.jit(
    jax.grad(lambda lp: rrtf_loss(lp, mask, scores, teacher, ft_weight=0.7, **opts)[0])
  )(logp)
  want = numeric_grad(
    lambda lp: reference(lp, mask, scores, teacher, ft_weight=0.7, **opts)[0], logp
  )
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert not np.asarray(got)[mask == 0].any() and np.abs(want).sum() > 0


def test_equal_scores_leave_only_fine_tuning_and_gradients_are_finite():
  logp, mask, _, teacher = random_batch(0)
  scores = np.full(logp.shape[:2], 2.0, np.float32)
  (loss, m), grad = jax.value_and_grad(
    lambda lp: rrtf_loss(lp, mask, scores, teacher), has_aux=True
  )(logp)
  assert m["pairs"] == 0 and m["rank_loss"] == 0 and loss == pytest.approx(float(m["ft_loss"]))
  assert np.isfinite(np.asarray(grad)).all()
  logp, mask, scores, teacher = random_batch(1)
  grad = jax.grad(lambda lp: rrtf_loss(lp, mask, scores, teacher)[0])(logp)
  assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).sum() > 0
  assert not np.asarray(grad)[mask == 0].any()  # prompt and padding tokens get no gradient


def one_pair():
  """One prompt, two responses and a padding one. Response 0 has 2 of 3 tokens (the third,
  -7, is padding): p_0 = (-1 - 3) / 2 = -2. Response 1 has all 3: p_1 = -3 / 3 = -1."""
  logp = np.array([[[-1.0, -3.0, -7.0], [-0.5, -1.0, -1.5], [-2.0, -2.0, -2.0]]], np.float32)
  mask = np.array([[[1, 1, 0], [1, 1, 1], [0, 0, 0]]], np.float32)
  return logp, mask, np.zeros((1, 3), bool)


def test_logistic_pair_loss_by_hand():
  logp, mask, teacher = one_pair()
  opts = dict(pair_loss="logistic", beta=2.0, gamma=0.5, ft_weight=0.0)
  # Right order (r_0 = 1 < r_1 = 3, gap 2, p_1 > p_0): -log sigmoid(2 * (-1 + 2) - 0.5)
  # = log(1 + e^-1.5) = 0.2014132779827524.
  scores = np.array([[1.0, 3.0, 9.0]], np.float32)  # the padding response's score counts not
  (loss, m), g = jax.value_and_grad(
    lambda lp: rrtf_loss(lp, mask, scores, teacher, **opts), has_aux=True
  )(logp)
  assert float(m["pairs"]) == 1 and float(m["margin"]) == pytest.approx(1.0)
  assert float(loss) == pytest.approx(2 * 0.2014132779827524, rel=1e-6)
  _, m = rrtf_loss(logp, mask, scores, teacher, weighting="uniform", **opts)
  assert float(m["rank_loss"]) == pytest.approx(0.2014132779827524, rel=1e-6)
  # d/dp_0 = w * beta * sigmoid(beta * (p_0 - p_1) + gamma) = 2 * 2 * sigmoid(-1.5), shared by
  # response 0's two tokens; response 1 gets its negative over three tokens.
  dp0 = 4 / (1 + np.exp(1.5))
  np.testing.assert_allclose(
    g[0], [[dp0 / 2, dp0 / 2, 0], [-dp0 / 3] * 3, [0, 0, 0]], rtol=1e-5, atol=1e-7
  )
  # Wrong order (p_1 > p_0 but r_1 < r_0): log(1 + e^(2 * 1 + 0.5)) = 2.5788897342925496;
  # the hinge there is 2 * max(0, -1 + 2) = 2.
  scores = np.array([[3.0, 1.0, 0.0]], np.float32)
  _, m = rrtf_loss(logp, mask, scores, teacher, **opts)
  assert float(m["rank_loss"]) == pytest.approx(2 * 2.5788897342925496, rel=1e-6)
  assert float(m["margin"]) == pytest.approx(-1.0) and float(m["ranking_accuracy"]) == 0
  _, m = rrtf_loss(logp, mask, scores, teacher, ft_weight=0.0)
  assert float(m["rank_loss"]) == pytest.approx(2.0, rel=1e-6)


def test_mean_fine_tuning_loss_by_hand():
  # Prompt 0's best response (score 2, the first) has 2 of 3 tokens: sum 4, mean 2 (not 4/3
  # over the padded length, nor 11/3 with the padding token). Prompt 1's best (the second; the
  # first has 2 tokens) has 3 tokens: sum 3, mean 1. Prompt 2 is padding. Mean over the two
  # prompts: 1.5 (a mean over all 5 tokens pooled would be 1.4); the sum: 3.5.
  logp = np.array(
    [
      [[-1.0, -3.0, -7.0], [-0.1, -9.0, -9.0]],
      [[-5.0, -5.0, -5.0], [-0.5, -0.5, -2.0]],
      [[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]],
    ],
    np.float32,
  )
  mask = np.array(
    [[[1, 1, 0], [1, 0, 0]], [[1, 1, 0], [1, 1, 1]], [[0, 0, 0], [0, 0, 0]]], np.float32
  )
  scores = np.array([[2.0, 1.0], [1.0, 2.0], [5.0, 0.0]], np.float32)
  teacher = np.zeros((3, 2), bool)
  (loss, m), g = jax.value_and_grad(
    lambda lp: rrtf_loss(lp, mask, scores, teacher, ft_normalization="mean", rank_weight=0.0),
    has_aux=True,
  )(logp)
  assert float(m["ft_loss"]) == pytest.approx(1.5, rel=1e-6) and float(loss) == float(m["ft_loss"])
  _, m = rrtf_loss(logp, mask, scores, teacher)
  assert float(m["ft_loss"]) == pytest.approx(3.5, rel=1e-6)
  # d/dlogp: -1 / (2 prompts * 2 tokens) on prompt 0's best, -1 / (2 * 3) on prompt 1's.
  want = np.zeros_like(logp)
  want[0, 0, :2] = -1 / 4
  want[1, 1, :] = -1 / 6
  np.testing.assert_allclose(g, want, rtol=1e-6)


def test_beta_and_gamma_shape_the_logistic_loss_only():
  logp, mask, scores, teacher = random_batch(2)

  def rank(**opts):
    return float(rrtf_loss(logp, mask, scores, teacher, **opts)[1]["rank_loss"])

  # A larger margin gamma asks more of every pair: the loss grows with it.
  by_gamma = [rank(pair_loss="logistic", gamma=g) for g in (-1.0, 0.0, 0.5, 2.0)]
  assert all(a < b for a, b in zip(by_gamma, by_gamma[1:])), by_gamma
  # gamma = 0, beta -> 0: every pair costs log 2 times its weight.
  _, m = rrtf_loss(logp, mask, scores, teacher, pair_loss="logistic", beta=1e-6, gamma=0.0)
  _, u = rrtf_loss(
    logp, mask, scores, teacher, pair_loss="logistic", beta=1e-6, gamma=0.0, weighting="uniform"
  )
  assert float(u["rank_loss"]) == pytest.approx(
    np.log(2) * float(u["pairs"]) / 4, rel=1e-4
  )  # 4 prompts that are not padding
  assert float(m["rank_loss"]) > float(u["rank_loss"])  # the gaps here are mostly above 1
  # Changing beta changes the logistic loss; the hinge ignores both.
  assert rank(pair_loss="logistic", beta=0.5) != pytest.approx(rank(pair_loss="logistic", beta=4))
  assert rank(beta=0.5, gamma=-3.0) == rank(beta=4.0, gamma=2.0) == rank()


@pytest.mark.parametrize(
  "settings,field",
  [
    (dict(weighting="margin"), "train.weighting='margin'"),
    (dict(ft_normalization="max"), "train.ft_normalization='max'"),
    (dict(pair_loss="sigmoid"), "train.pair_loss='sigmoid'"),
    (dict(beta=0.0), "train.beta=0.0"),
    (dict(beta=-1.0), "train.beta=-1.0"),
    (dict(beta=float("inf")), "train.beta=inf"),
    (dict(beta=float("nan")), "train.beta=nan"),
    (dict(beta="two"), "train.beta='two'"),
    (dict(gamma=float("nan")), "train.gamma=nan"),
    (dict(gamma=float("-inf")), "train.gamma=-inf"),
  ],
)
def test_bad_loss_settings_name_the_config_field(settings, field):
  with pytest.raises(ValueError) as e:
    check_loss_settings(**{"weighting": "gap", **settings})
  assert str(e.value).startswith(field), e.value
  with pytest.raises(ValueError, match=field.split("=")[0]):
    rrtf_loss(*random_batch(0), **settings)


def test_good_loss_settings_pass():
  for f, p, w in SETTINGS:
    for beta, gamma in ((2.0, 0.5), (1e-3, 0.0), (10, -1)):  # gamma may be 0 or negative
      check_loss_settings(weighting=w, ft_normalization=f, pair_loss=p, beta=beta, gamma=gamma)


def test_defaults_are_the_papers_loss_and_old_configs_get_them():
  import inspect

  from configs.common import base_config
  from rrtf_jax.train_step import loss_settings, validate_config
  from rrtf_jax.config_loading import load_config

  for fn in (rrtf_loss, check_loss_settings):
    params = inspect.signature(fn).parameters
    assert {k: params[k].default for k in LOSS_DEFAULTS if k != "weighting"} == {
      k: v for k, v in LOSS_DEFAULTS.items() if k != "weighting"
    }
  assert inspect.signature(rrtf_loss).parameters["weighting"].default == "gap"
  train = base_config().train
  assert {k: train[k] for k in LOSS_DEFAULTS} == LOSS_DEFAULTS
  assert (LOSS_DEFAULTS["ft_normalization"], LOSS_DEFAULTS["pair_loss"]) == ("sum", "hinge")
  # A config from before these fields existed: the defaults, and `rrtf train` accepts it.
  config = load_config("tiny")
  config.train.pair_loss, config.train.beta = "logistic", 3.0
  assert loss_settings(config.train) == dict(LOSS_DEFAULTS, pair_loss="logistic", beta=3.0)
  for name in ("ft_normalization", "pair_loss", "beta", "gamma"):
    delattr(config.train, name)
  assert loss_settings(config.train) == LOSS_DEFAULTS
  validate_config(config)


@pytest.mark.parametrize("t,chunk", [(13, 4), (16, 16), (5, 128)])
def test_chunked_token_logprobs_equal_full_logits(t, chunk):
  rng = np.random.default_rng(t)
  hidden = jnp.asarray(rng.normal(size=(3, t, 8)), jnp.float32)
  emb = jnp.asarray(rng.normal(size=(97, 8)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 97, (3, t)))

  def full(h, e):
    logits = jnp.einsum("NTD,VD->NTV", h, e)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]

  got = token_logprobs(hidden, emb, targets, chunk=chunk)
  np.testing.assert_allclose(got, full(hidden, emb), rtol=1e-5, atol=1e-5)
  g1 = jax.grad(lambda h, e: token_logprobs(h, e, targets, chunk=chunk).sum(), argnums=(0, 1))(
    hidden, emb
  )
  g2 = jax.grad(lambda h, e: full(h, e).sum(), argnums=(0, 1))(hidden, emb)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_token_logprobs_from_model_hidden_equal_model_logits():
  from conftest import init_params_one_compile
  from model import ModelConfig, Transformer
  from rrtf_jax.config_loading import load_config

  cfg = ModelConfig.from_dict(load_config("tiny").model)
  params = init_params_one_compile(cfg, 0)  # the tiny initialiser compiles once for the session
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, cfg.vocab_size)
  model = Transformer(cfg)
  hidden = model.apply({"params": params}, tokens, return_hidden=True)
  logits = model.apply({"params": params}, tokens)
  want = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], -1), tokens[:, 1:, None], -1)[
    ..., 0
  ]
  got = token_logprobs(hidden[:, :-1], params["wte"], tokens[:, 1:], chunk=8)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rank_weight_zero_is_fine_tuning_on_the_best_response_only():
  # The demo's ablation: gradient only on the best response's tokens, equal to its plain
  # cross-entropy; the ranking metrics are still reported.
  logp, mask, scores, teacher = random_batch(3)
  (loss, m), grad = jax.value_and_grad(
    lambda lp: rrtf_loss(lp, mask, scores, teacher, rank_weight=0.0), has_aux=True
  )(logp)
  assert m["pairs"] > 0 and m["rank_loss"] > 0 and loss == pytest.approx(float(m["ft_loss"]))
  _, _, ft, acc = reference(logp, mask, scores, teacher)
  assert float(m["ft_loss"]) == pytest.approx(ft, rel=1e-5) and float(
    m["ranking_accuracy"]
  ) == pytest.approx(acc)
  g = np.asarray(grad)
  rows = np.abs(g).sum(-1)  # [B, R]: responses that get any gradient
  assert ((rows > 0).sum(-1) <= 1).all() and (rows > 0).sum() > 0
  full = np.asarray(jax.grad(lambda lp: rrtf_loss(lp, mask, scores, teacher)[0])(logp))
  assert np.abs(full - g).sum() > 0  # with the ranking term on, other responses get gradient too
