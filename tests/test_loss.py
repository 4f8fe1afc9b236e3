"""The RRTF loss against a plain NumPy reference, and chunked token log-probs against full
logits."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrtf_jax.loss import rrtf_loss, token_logprobs


def reference(logp, mask, scores, teacher, weighting="gap", ft_weight=1.0):
  """Loops over prompts and pairs, straight from the formulas."""
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
        rank += w * max(0.0, p[i] - p[j])
        pairs += 1
        right += p[i] < p[j]
    top = max(scores[b, i] for i in idx)
    best = [i for i in idx if scores[b, i] == top]
    best = ([i for i in best if teacher[b, i]] or best)[0]
    ft += -(logp[b, best] * mask[b, best]).sum()
  return (rank + ft_weight * ft) / n, rank / n, ft / n, right / max(pairs, 1)


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


@pytest.mark.parametrize("weighting", ["gap", "uniform"])
@pytest.mark.parametrize("seed", range(5))
def test_loss_equals_numpy_reference(seed, weighting):
  logp, mask, scores, teacher = random_batch(seed)
  loss, m = jax.jit(lambda *a: rrtf_loss(*a, weighting=weighting, ft_weight=0.7))(
    logp, mask, scores, teacher
  )
  want, rank, ft, acc = reference(logp, mask, scores, teacher, weighting, 0.7)
  np.testing.assert_allclose(
    [loss, m["rank_loss"], m["ft_loss"], m["ranking_accuracy"]],
    [want, rank, ft, acc],
    rtol=1e-5,
    atol=1e-6,
  )


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


def test_bad_weighting():
  with pytest.raises(ValueError, match="weighting"):
    rrtf_loss(*random_batch(0), weighting="margin")


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
