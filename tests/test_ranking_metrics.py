"""train.ranking_metrics (the demo's ranking accuracy) against full logits computed directly."""

import jax
import numpy as np

from conftest import init_params_one_compile
from data import records
from model import ModelConfig, Transformer
from rrtf_jax.config_loading import load_config


def test_ranking_accuracy_equals_full_logits_reference(tmp_path):
  import tensorflow_datasets as tfds

  from rrtf_jax.stages.prepare import prepare_stage
  from data.tokenizer import builtin_corpus, train_sentencepiece
  from rrtf_jax.train_step import ranking_metrics

  tok = str(tmp_path / "tok")
  train_sentencepiece(builtin_corpus(), tok, vocab_size=1024)
  recs = []
  for i in range(6):  # 5 responses of different lengths and scores, two of them tied
    codes = [
      f"def f(x):\n    return x + {i}\n",
      "def f(x):\n    return x\n",
      f"def f(x)\n  {i}\n",
      "pass\n",
      f"def f(x):\n    y = x * {i}\n    return y - 1\n",
    ]
    recs.append(
      dict(
        task_id=f"t/{i}",
        prompt=f"Add {i} to x.",
        test="",
        entry_point="f",
        exec_prefix="",
        responses=codes,
        codes=codes,
        sources=["s"] * 5,
        is_teacher=[1, 0, 0, 0, 0],
        outcomes=["passed"] * 5,
        tests_passed=[1] * 5,
        tests_total=[1] * 5,
        scores=[3.5, 2.0, 0.0, 2.0, 1.0 + i % 2],
      )
    )
  (tmp_path / "ranked").mkdir()
  records.write_atomic(
    str(tmp_path / "ranked" / records.shard_name(records.RANKED_NAME, "train", 0, 1)),
    recs,
    ranked=True,
  )
  records.write_ranked_metadata(str(tmp_path / "ranked"))
  prepare_stage(str(tmp_path / "ranked"), str(tmp_path / "prepared"), tok, progress=False)

  config = load_config("tiny")
  cfg = ModelConfig.from_dict(config.model)
  # one compile for both seeds
  params = {f"seed{s}": init_params_one_compile(cfg, s) for s in (0, 1)}
  got = ranking_metrics(cfg, config.train, params, str(tmp_path / "prepared"), responses=5)

  apply = jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x))
  examples = list(
    tfds.builder_from_directory(str(tmp_path / "prepared"))
    .as_dataset(split="train")
    .as_numpy_iterator()
  )
  assert len(examples) == 6
  for name, p in params.items():
    correct = pairs = 0
    for ex in examples:
      toks, n_prompt, scores = ex["tokens"], int(ex["prompt_length"]), ex["scores"]
      starts = n_prompt + np.concatenate([[0], np.cumsum(ex["response_lengths"])[:-1]])
      mean_logp = []
      for start, length in zip(starts, ex["response_lengths"]):
        seq = np.concatenate([toks[:n_prompt], toks[start : start + length]])
        # one shape, one compile; causal, so the padding after changes nothing
        padded = np.zeros((1, 96), np.int32)
        padded[0, : len(seq) - 1] = seq[:-1]
        logits = np.asarray(apply(p, padded), np.float64)[0, : len(seq) - 1]
        logp = (
          logits
          - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
          - logits.max(-1, keepdims=True)
        )
        picked = logp[np.arange(len(seq) - 1), seq[1:]]
        mean_logp.append(picked[n_prompt - 1 :].mean())  # the response's tokens, its EOS included
      for i in range(5):
        for j in range(5):
          if scores[i] < scores[j]:
            pairs += 1
            correct += mean_logp[i] < mean_logp[j]
    assert got[name]["pairs"] == pairs == 3 * 9 + 3 * 7  # tied scores make no pair
    assert abs(got[name]["ranking_accuracy"] - correct / pairs) < 1e-6, (
      name,
      got[name],
      correct,
      pairs,
    )
  assert got["seed0"]["ranking_accuracy"] != got["seed1"]["ranking_accuracy"]
