"""Model structure: parameter counts without allocation, positions, remat, scanned compile."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init_params_one_compile
from model import ModelConfig, Transformer, count_params, init_params
from model.transformer import positions_from_segments
from rrtf_jax.config_loading import load_config


def _cfg(name, *overrides):
  return ModelConfig.from_dict(load_config(name, list(overrides)).model)


def test_starcoder_15b_parameter_count_without_allocating():
  cfg = _cfg("starcoder_15b")
  assert (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads) == (40, 6144, 48, 1)
  assert (cfg.max_position_embeddings, cfg.vocab_size, cfg.head_dim) == (8192, 49152, 128)
  n = count_params(cfg)  # jax.eval_shape inside: nothing allocated
  assert abs(n - 15.5e9) <= 0.1e9, n


def test_1b_config_size():
  assert 0.9e9 <= count_params(_cfg("starcoder_1b")) <= 1.3e9


def test_positions_from_segments():
  seg = jnp.array([[0, 0, 1, 1, 1], [1, 1, 2, 2, 0], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(
    positions_from_segments(seg), [[0, 1, 0, 1, 2], [0, 1, 0, 1, 0], [0, 1, 2, 3, 4]]
  )


def test_packed_segments_equal_separate_sequences():
  cfg = _cfg("tiny")
  # the tiny model's initialiser compiles once for this file
  params = init_params_one_compile(cfg, 0)
  apply = jax.jit(lambda t, s=None: Transformer(cfg).apply({"params": params}, t, segment_ids=s))
  a, b = jnp.arange(5)[None] + 7, jnp.arange(4)[None] + 50
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.array([[1] * 5 + [2] * 4])
  out = apply(packed, seg)
  np.testing.assert_allclose(out[:, :5], apply(a), atol=1e-5)
  np.testing.assert_allclose(out[:, 5:], apply(b), atol=1e-5)


def _loss(p, c, tokens):
  return Transformer(c).apply({"params": p}, tokens).mean()


# One jitted function for both remat tests: the gradient without remat compiles once for the two.
_grad = jax.jit(jax.value_and_grad(_loss), static_argnums=1)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_same_values_and_grads(remat):
  cfg = _cfg("tiny")
  params = init_params_one_compile(cfg, 1)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, cfg.vocab_size)
  grad = functools.partial(_grad, tokens=tokens)
  v0, g0 = grad(params, cfg)
  v1, g1 = grad(params, cfg.replace(remat=remat))
  np.testing.assert_allclose(v0, v1, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_layers_are_scanned():
  """Parameters are stacked per layer, and lowering a 40-layer model costs no more than a 2-layer
  one."""
  cfg = _cfg("tiny")
  params = init_params_one_compile(cfg, 0)
  assert params["h"]["attn"]["q_kernel"].shape == (2, 64, 4, 16)
  assert params["h"]["attn"]["kv_kernel"].shape == (2, 64, 2, 1, 16)

  def hlo_size(layers):
    c = cfg.replace(num_layers=layers)
    abstract = jax.eval_shape(lambda: init_params(c, jax.random.PRNGKey(0)))
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return len(
      jax.jit(lambda p, t: Transformer(c).apply({"params": p}, t)).lower(abstract, tokens).as_text()
    )

  small, big = hlo_size(2), hlo_size(40)
  assert big < small * 1.1, (small, big)


def test_bad_config_one_line_errors():
  with pytest.raises(ValueError, match="model.attention='flash' is not available"):
    ModelConfig(attention="flash")
  with pytest.raises(ValueError, match="not a multiple of model.num_kv_heads"):
    ModelConfig(num_heads=48, num_kv_heads=5)
  with pytest.raises(ValueError, match="unknown model config field"):
    ModelConfig.from_dict({"num_layerz": 2})
