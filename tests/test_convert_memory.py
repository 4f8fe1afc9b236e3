"""`rrtf convert` holds the output plus about one tensor, never two copies of the model."""

import tracemalloc

import pytest

from conftest import make_hf_model, save_hf
from model.convert import convert_hf, hf_param_bytes, read_hf_config


def _llama(seed: int):
  """A Llama with k_proj/v_proj stacked into one of our kernels and an untied head."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(seed)
  cfg = LlamaConfig(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=256,
  )
  return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("family", ["gpt_bigcode", "llama"])
def test_peak_host_memory_is_output_plus_one_tensor(family, tmp_path):
  # 8 layers, D 256, V 8192: ~30 MB of fp32 output; the largest tensor (wte) is 8.4 MB.
  model = (
    make_hf_model(True, seed=4, n_layer=8, n_embd=256, n_head=8, vocab_size=8192, n_positions=256)
    if family == "gpt_bigcode"
    else _llama(4)
  )
  hf_dir = save_hf(model, tmp_path / "hf")
  cfg, _ = read_hf_config(hf_dir)
  assert cfg.family == family
  out_bytes = hf_param_bytes(cfg, "float32")
  largest = cfg.vocab_size * cfg.embed_dim * 4
  # numpy reports its buffers to tracemalloc, so this sees every array the conversion makes.
  tracemalloc.start()
  tracemalloc.reset_peak()
  convert_hf(hf_dir, str(tmp_path / "out"), progress=False)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  print(
    f"{family}: output {out_bytes / 1e6:.1f} MB, largest tensor {largest / 1e6:.1f} MB, "
    f"peak {peak / 1e6:.1f} MB"
  )
  assert peak < out_bytes + largest + (2 << 20), (peak, out_bytes, largest)
  assert peak < 2 * out_bytes  # a naive load-everything-then-convert would need at least this
