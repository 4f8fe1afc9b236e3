"""The shipped configs of HF models equal what model/families.py reads from each model's
published config.json, built here with transformers' own config classes (so neither the
configs nor families.py can drift from the other)."""

import pytest

from model.config import ModelConfig
from model.families import config_from_hf
from rrtf_jax.config_loading import load_config

# The published config.json of each model: the fields that shape the network, as released.
PUBLISHED = {
  "starcoder2_15b": (
    "Starcoder2Config",
    "Starcoder2ForCausalLM",
    dict(
      vocab_size=49152,
      hidden_size=6144,
      intermediate_size=24576,
      num_hidden_layers=40,
      num_attention_heads=48,
      num_key_value_heads=4,
      max_position_embeddings=16384,
      hidden_act="gelu_pytorch_tanh",
      norm_epsilon=1e-5,
      rope_theta=100000,
      sliding_window=4096,
      use_bias=True,
      tie_word_embeddings=False,
      bos_token_id=0,
      eos_token_id=0,
    ),
  ),
  "starcoder2_3b": (
    "Starcoder2Config",
    "Starcoder2ForCausalLM",
    dict(
      vocab_size=49152,
      hidden_size=3072,
      intermediate_size=12288,
      num_hidden_layers=30,
      num_attention_heads=24,
      num_key_value_heads=2,
      max_position_embeddings=16384,
      hidden_act="gelu_pytorch_tanh",
      norm_epsilon=1e-5,
      rope_theta=999999.4420358813,
      sliding_window=4096,
      use_bias=True,
      bos_token_id=0,
      eos_token_id=0,
    ),
  ),
  "qwen2_5_coder_7b": (
    "Qwen2Config",
    "Qwen2ForCausalLM",
    dict(
      vocab_size=152064,
      hidden_size=3584,
      intermediate_size=18944,
      num_hidden_layers=28,
      num_attention_heads=28,
      num_key_value_heads=4,
      max_position_embeddings=32768,
      hidden_act="silu",
      rms_norm_eps=1e-6,
      rope_theta=1000000.0,
      sliding_window=131072,
      use_sliding_window=False,
      max_window_layers=28,
      tie_word_embeddings=False,
      bos_token_id=151643,
      eos_token_id=151643,
    ),
  ),
  "qwen2_5_coder_32b": (
    "Qwen2Config",
    "Qwen2ForCausalLM",
    dict(
      vocab_size=152064,
      hidden_size=5120,
      intermediate_size=27648,
      num_hidden_layers=64,
      num_attention_heads=40,
      num_key_value_heads=8,
      max_position_embeddings=32768,
      hidden_act="silu",
      rms_norm_eps=1e-5,
      rope_theta=1000000.0,
      sliding_window=131072,
      use_sliding_window=False,
      max_window_layers=64,
      tie_word_embeddings=False,
      bos_token_id=151643,
      eos_token_id=151643,
    ),
  ),
  "llama3_8b": (
    "LlamaConfig",
    "LlamaForCausalLM",
    dict(
      vocab_size=128256,
      hidden_size=4096,
      intermediate_size=14336,
      num_hidden_layers=32,
      num_attention_heads=32,
      num_key_value_heads=8,
      max_position_embeddings=8192,
      hidden_act="silu",
      rms_norm_eps=1e-5,
      rope_theta=500000.0,
      attention_bias=False,
      mlp_bias=False,
      tie_word_embeddings=False,
      bos_token_id=128000,
      # config.json says 128001; the Instruct model's generation_config adds <|eot_id|>
      eos_token_id=[128001, 128009],
    ),
  ),
}

# Our settings that no config.json holds: how to compute, not what the model is.
NOT_IN_HF = ("dtype", "param_dtype", "attention", "remat")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_config_is_what_families_reads_from_the_published_config_json(name):
  import transformers

  cls, arch, published = PUBLISHED[name]
  hf = getattr(transformers, cls)(architectures=[arch], **published).to_dict()
  ours = ModelConfig.from_dict(load_config(name).model)
  read = config_from_hf(hf, **{k: getattr(ours, k) for k in NOT_IN_HF})
  diff = {k: (v, getattr(read, k)) for k, v in ours.to_dict().items() if getattr(read, k) != v}
  assert not diff, f"configs/{name}.py vs families.py on its config.json: {diff}"
  assert ours == read
