"""Parameter counts of the shipped configs (jax.eval_shape of the init: nothing allocated)
beside the sizes the models' cards publish.

`non-embedding` leaves out the token embedding and an untied LM head (and learned positions),
as Qwen's cards count it. Writes benchmarks/results/param_counts.json and .md:
  JAX_PLATFORMS=cpu python benchmarks/param_counts.py
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import results_io  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.transformer import count_params  # noqa: E402
from rrtf_jax.config_loading import load_config  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "param_counts.json")

# config -> (HF model, published total, published non-embedding, where the figure is from)
PUBLISHED = {
  "starcoder_1b": ("bigcode/starcoderbase-1b", "~1B", None, "model card"),
  "starcoder_15b": ("bigcode/starcoder", "15.5B", None, "model card"),
  "starcoder2_3b": ("bigcode/starcoder2-3b", "~3B", None, "model card: 3B parameter model"),
  "starcoder2_15b": ("bigcode/starcoder2-15b", "~15B", None, "model card: 15B parameter model"),
  "qwen2_5_coder_7b": ("Qwen/Qwen2.5-Coder-7B", "7.61B", "6.53B", "model card"),
  "qwen2_5_coder_32b": ("Qwen/Qwen2.5-Coder-32B", "32.5B", "31.0B", "model card"),
  "llama3_8b": ("meta-llama/Meta-Llama-3-8B", "8B", None, "model card"),
}


def counts(name: str) -> dict:
  cfg = ModelConfig.from_dict(load_config(name).model)
  total = count_params(cfg)
  tables = cfg.vocab_size * cfg.embed_dim * (1 if cfg.tie_embeddings else 2)
  if cfg.position_embedding == "learned":
    tables += cfg.max_position_embeddings * cfg.embed_dim
  hf, published, published_non_emb, source = PUBLISHED[name]
  return dict(
    config=f"configs/{name}.py",
    hf_model=hf,
    family=cfg.family,
    params=total,
    non_embedding_params=total - tables,
    tied=cfg.tie_embeddings,
    published=published,
    published_non_embedding=published_non_emb,
    published_source=source,
  )


def markdown(result: dict) -> str:
  lines = [
    "| config | HF model | family | ours (eval_shape) | ours non-embedding | published | "
    "published non-embedding | tied head |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in result["models"]:
    lines.append(
      f"| {r['config']} | {r['hf_model']} | {r['family']} | {r['params'] / 1e9:.3f}B "
      f"({r['params']:,}) | {r['non_embedding_params'] / 1e9:.3f}B | {r['published']} "
      f"({r['published_source']}) | {r['published_non_embedding'] or '-'} | "
      f"{'yes' if r['tied'] else 'no'} |"
    )
  return "\n".join(lines) + "\n"


def main():
  p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
  p.add_argument("--out", default=RESULTS)
  args = p.parse_args()
  result = {
    "benchmark": "param_counts: model.transformer.count_params of each config",
    "models": [counts(name) for name in PUBLISHED],
  }
  results_io.write(args.out, result, markdown)


if __name__ == "__main__":
  main()
