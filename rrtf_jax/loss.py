"""The RRTF loss (PanGu-Coder2) and per-token log-probabilities without full logits.

Letters: B prompts, R responses per prompt, T tokens, D model, V vocab, C chunk length.

For a prompt with responses y_i, scores r_i and length-normalised log-likelihoods
p_i = mean over y_i's tokens of log P(y_i,t | x, y_i,<t):
  L_rank = sum over pairs with r_i < r_j of w_ij * l(p_i, p_j)
           w_ij = r_j - r_i (PanGu-Coder2, "gap") or 1 (RRHF, "uniform");
           pairs with equal scores do not count;
           l = max(0, p_i - p_j) ("hinge", the paper's) or
               -log sigmoid(beta * (p_j - p_i) - gamma) ("logistic": SimPO's length-normalised
               Bradley-Terry loss with margin gamma; beta > 0 scales the gap).
  L_ft   = - sum over the tokens of the best response of log P ("sum", the paper's), or that
           sum divided by the best response's own token count ("mean", the per-token
           cross-entropy; GanjinZero/RRHF issue 51). Best: highest score, ties to a teacher,
           then to the first.
  L      = rank_weight * L_rank + ft_weight * L_ft, averaged over prompts (rank_weight 0:
           fine-tuning on the best response only, the ablation of `rrtf demo --ablation`).
The mean in p_i is over the response's own tokens (the paper's formula; the official RRHF
code divides by the padded length).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from model.transformer import lm_head

WEIGHTINGS = ("gap", "uniform")  # pair weights: r_j - r_i (PanGu-Coder2) or 1 (RRHF)
FT_NORMALIZATIONS = ("sum", "mean")  # L_ft over the best response's tokens: sum (paper) | mean
PAIR_LOSSES = ("hinge", "logistic")  # max(0, p_i - p_j) (paper) | SimPO's -log sigmoid
# rrtf_loss's settings when a config does not name them (the paper's loss; SimPO's beta, gamma).
LOSS_DEFAULTS = dict(
  weighting="gap", ft_normalization="sum", pair_loss="hinge", beta=2.0, gamma=0.5
)


def _finite(value) -> bool:
  try:
    return math.isfinite(float(value))
  except (TypeError, ValueError):
    return False


def check_loss_settings(
  *,
  weighting: str,
  ft_normalization: str = "sum",
  pair_loss: str = "hinge",
  beta: float = 2.0,
  gamma: float = 0.5,
) -> None:
  """The one check of the loss settings (`rrtf train` validates its config with it before
  anything is built; rrtf_loss checks its arguments with it): ValueError naming the
  train.* config field. beta and gamma are checked whatever the pair loss."""
  if weighting not in WEIGHTINGS:
    raise ValueError(f"train.weighting={weighting!r} is not one of {WEIGHTINGS}")
  if ft_normalization not in FT_NORMALIZATIONS:
    raise ValueError(
      f"train.ft_normalization={ft_normalization!r} is not one of {FT_NORMALIZATIONS}"
    )
  if pair_loss not in PAIR_LOSSES:
    raise ValueError(f"train.pair_loss={pair_loss!r} is not one of {PAIR_LOSSES}")
  if not (_finite(beta) and float(beta) > 0):
    raise ValueError(f"train.beta={beta!r} must be a finite number above 0")
  if not _finite(gamma):
    raise ValueError(f"train.gamma={gamma!r} must be a finite number")


def rrtf_loss(
  token_logprobs,
  mask,
  scores,
  is_teacher,
  *,
  weighting: str = "gap",
  ft_normalization: str = "sum",
  pair_loss: str = "hinge",
  beta: float = 2.0,
  gamma: float = 0.5,
  ft_weight: float = 1.0,
  rank_weight: float = 1.0,
):
  """Returns (loss, metrics) for one batch. The settings are static Python values.

  Args:
    token_logprobs: [B, R, T] log P of each response token (fp32); other positions ignored.
    mask: [B, R, T] 1 on response tokens (prompt and padding 0). A response with no tokens
      is padding (prompts with fewer than R responses) and takes part in nothing.
    scores: [B, R] higher is better.
    is_teacher: [B, R] bool, breaks ties when choosing the best response.
    weighting: "gap" (w_ij = r_j - r_i, the paper's) or "uniform" (w_ij = 1, RRHF's).
    ft_normalization: "sum" (L_ft sums the best response's token log-probs, the paper's) or
      "mean" (divides that sum by the response's own token count).
    pair_loss: "hinge" (max(0, p_i - p_j), the paper's) or "logistic"
      (-log sigmoid(beta * (p_j - p_i) - gamma), SimPO's); the weighting multiplies either.
    beta: > 0, the scale of p_j - p_i in the logistic pair loss (unused by hinge).
    gamma: finite, the target margin of the logistic pair loss (unused by hinge).
    ft_weight: lambda in L = L_rank + lambda * L_ft.
    rank_weight: the factor of L_rank; 0 turns the ranking loss off (its metrics are still
      reported, so an ablation shows how ranking accuracy moves without it).

  Metrics: loss; rank_loss and ft_loss (the two terms as chosen, averaged over prompts);
  ranking_accuracy and margin (mean p_j - p_i) over pairs; pairs; response_tokens.
  """
  check_loss_settings(
    weighting=weighting,
    ft_normalization=ft_normalization,
    pair_loss=pair_loss,
    beta=beta,
    gamma=gamma,
  )
  logp = token_logprobs.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  scores = scores.astype(jnp.float32)
  lengths = mask.sum(-1)  # [B, R]
  valid = lengths > 0  # [B, R]
  p = (logp * mask).sum(-1) / jnp.maximum(lengths, 1.0)  # [B, R] length-normalised

  # pair[b, i, j]: response i should rank below response j.
  # [B, R, R]
  pair = (scores[:, :, None] < scores[:, None, :]) & valid[:, :, None] & valid[:, None, :]
  gap = scores[:, None, :] - scores[:, :, None]  # [B, R, R] r_j - r_i
  weight = jnp.where(pair, gap if weighting == "gap" else 1.0, 0.0)
  diff = p[:, :, None] - p[:, None, :]  # [B, R, R] p_i - p_j
  if pair_loss == "hinge":
    per_pair = jax.nn.relu(diff)
  else:  # -log sigmoid(beta * (p_j - p_i) - gamma), stable for any size of the argument
    per_pair = -jax.nn.log_sigmoid(float(beta) * -diff - float(gamma))
  rank_per_prompt = (weight * per_pair).sum((1, 2))  # [B]

  # Best response: highest score, then a teacher, then the first (argmax takes the first True).
  top = valid & (scores == jnp.max(jnp.where(valid, scores, -jnp.inf), -1, keepdims=True))  # [B, R]
  top_teacher = top & is_teacher.astype(bool)
  best = jnp.argmax(jnp.where(top_teacher.any(-1, keepdims=True), top_teacher, top), axis=-1)  # [B]
  best_logp = jnp.take_along_axis(logp * mask, best[:, None, None], axis=1)[:, 0]  # [B, T]
  ft_per_prompt = -best_logp.sum(-1)  # [B]
  if ft_normalization == "mean":  # over the best response's own tokens, not the padded T
    best_len = jnp.take_along_axis(lengths, best[:, None], axis=1)[:, 0]  # [B]
    ft_per_prompt = ft_per_prompt / jnp.maximum(best_len, 1.0)

  has_any = valid.any(-1).astype(jnp.float32)  # [B] prompts that are padding count for nothing
  n_prompts = jnp.maximum(has_any.sum(), 1.0)
  rank_loss = (rank_per_prompt * has_any).sum() / n_prompts
  ft_loss = (ft_per_prompt * has_any).sum() / n_prompts
  n_pairs = pair.sum()
  pairs = jnp.maximum(n_pairs, 1)
  metrics = {
    "rank_loss": rank_loss,
    "ft_loss": ft_loss,
    # fraction of scored pairs already in the right order (the better one more likely)
    "ranking_accuracy": jnp.where(pair, diff < 0, False).sum() / pairs,
    "margin": jnp.where(pair, -diff, 0.0).sum() / pairs,  # mean of p_j - p_i over pairs
    "pairs": n_pairs,
    "response_tokens": mask.sum(),
  }
  loss = rank_weight * rank_loss + ft_weight * ft_loss
  metrics["loss"] = loss
  return loss, metrics


def token_logprobs(hidden, embedding, targets, *, chunk: int = 128):
  """log P(targets) from final hidden states, C positions at a time.

  Args:
    hidden: [N, T, D] final-LayerNorm hidden states (Transformer(..., return_hidden=True)).
    embedding: [V, D] the tied output embedding (`wte`).
    targets: [N, T] int token ids to score at each position (the next tokens).
    chunk: positions per step; the fp32 logits held at once are [N, C, V], and the
      backward pass recomputes them (jax.checkpoint) instead of storing all of them.
  Returns:
    [N, T] fp32 log-probabilities.
  """
  n, t, d = hidden.shape
  c = min(chunk, t)
  pad = -t % c
  h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(n, (t + pad) // c, c, d)  # [N, T/C, C, D]
  y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(n, (t + pad) // c, c)  # [N, T/C, C]
  emb = embedding.astype(hidden.dtype)

  @jax.checkpoint
  def one(h_c, y_c):  # [N, C, D], [N, C]
    logits = lm_head(h_c, emb, dtype=hidden.dtype)  # [N, C, V] fp32
    picked = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0]  # [N, C]
    return picked - jax.nn.logsumexp(logits, axis=-1)

  # [T/C, N, C]
  out = jax.lax.map(lambda xs: one(*xs), (jnp.moveaxis(h, 1, 0), jnp.moveaxis(y, 1, 0)))
  return jnp.moveaxis(out, 0, 1).reshape(n, t + pad)[:, :t]
