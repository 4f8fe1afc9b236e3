"""The RRTF loss (PanGu-Coder2) and per-token log-probabilities without full logits.

Letters: B prompts, R responses per prompt, T tokens, D model, V vocab, C chunk length.

For a prompt with responses y_i, scores r_i and length-normalised log-likelihoods
p_i = mean over y_i's tokens of log P(y_i,t | x, y_i,<t):
  L_rank = sum over pairs with r_i < r_j of w_ij * max(0, p_i - p_j)
           w_ij = r_j - r_i (PanGu-Coder2, "gap") or 1 (RRHF, "uniform");
           pairs with equal scores do not count.
  L_ft   = - sum over the tokens of the best response of log P  (best: highest score, ties
           to a teacher, then to the first)
  L      = rank_weight * L_rank + ft_weight * L_ft, averaged over prompts (rank_weight 0:
           fine-tuning on the best response only, the ablation of `rrtf demo --ablation`).
The mean in p_i is over the response's own tokens (the paper's formula; the official RRHF
code divides by the padded length).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.transformer import lm_head

WEIGHTINGS = ("gap", "uniform")  # pair weights: r_j - r_i (PanGu-Coder2) or 1 (RRHF)


def check_loss_settings(*, weighting: str) -> None:
  """The one check of the loss settings (`rrtf train` validates its config with it before
  anything is built; rrtf_loss checks its arguments with it): ValueError naming the
  train.* config field."""
  if weighting not in WEIGHTINGS:
    raise ValueError(f"train.weighting={weighting!r} is not one of {WEIGHTINGS}")


def rrtf_loss(
  token_logprobs,
  mask,
  scores,
  is_teacher,
  *,
  weighting: str = "gap",
  ft_weight: float = 1.0,
  rank_weight: float = 1.0,
):
  """Returns (loss, metrics) for one batch.

  Args:
    token_logprobs: [B, R, T] log P of each response token (fp32); other positions ignored.
    mask: [B, R, T] 1 on response tokens (prompt and padding 0). A response with no tokens
      is padding (prompts with fewer than R responses) and takes part in nothing.
    scores: [B, R] higher is better.
    is_teacher: [B, R] bool, breaks ties when choosing the best response.
    weighting: "gap" (w_ij = r_j - r_i, the paper's) or "uniform" (w_ij = 1, RRHF's).
    ft_weight: lambda in L = L_rank + lambda * L_ft.
    rank_weight: the factor of L_rank; 0 turns the ranking loss off (its metrics are still
      reported, so an ablation shows how ranking accuracy moves without it).
  """
  check_loss_settings(weighting=weighting)
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
  rank_per_prompt = (weight * jax.nn.relu(diff)).sum((1, 2))  # [B]

  # Best response: highest score, then a teacher, then the first (argmax takes the first True).
  top = valid & (scores == jnp.max(jnp.where(valid, scores, -jnp.inf), -1, keepdims=True))  # [B, R]
  top_teacher = top & is_teacher.astype(bool)
  best = jnp.argmax(jnp.where(top_teacher.any(-1, keepdims=True), top_teacher, top), axis=-1)  # [B]
  best_logp = jnp.take_along_axis(logp * mask, best[:, None, None], axis=1)[:, 0]  # [B, T]
  ft_per_prompt = -best_logp.sum(-1)  # [B]

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
