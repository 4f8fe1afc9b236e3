"""The model sharded over 8 fake CPU devices (data=2, fsdp=2, tensor=2) equals the unsharded
model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from model import ModelConfig, Transformer, abstract_params, init_params
from model.sharding import (
  LOGICAL_RULES,
  batch_sharding,
  logical_to_sharding,
  make_mesh,
  parse_mesh_spec,
)


def test_eight_fake_devices():
  assert len(jax.devices()) == 8


@pytest.mark.parametrize("kv_heads", [1, 4], ids=["mqa", "mha"])
def test_sharded_forward_equals_unsharded(kv_heads):
  cfg = ModelConfig(
    vocab_size=128,
    max_position_embeddings=64,
    num_layers=2,
    embed_dim=64,
    num_heads=4,
    num_kv_heads=kv_heads,
    mlp_dim=128,
    dtype="float32",
  )
  params = init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 24), 0, cfg.vocab_size)
  mask = jnp.ones_like(tokens).at[1, :5].set(0)
  expected = Transformer(cfg).apply({"params": params}, tokens, mask)

  mesh = make_mesh("data=2,fsdp=2,tensor=2")
  with nn.logical_axis_rules(LOGICAL_RULES):
    shardings = logical_to_sharding(abstract_params(cfg), mesh)
  sharded = jax.device_put(params, shardings)
  # Parameters really are split: query heads over tensor, embed over fsdp, the MQA kv head
  # replicated.
  assert sharded["h"]["attn"]["q_kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert sharded["h"]["mlp"]["fc_kernel"].sharding.spec == P(None, "fsdp", "tensor")
  assert sharded["wte"].sharding.spec == P("tensor", "fsdp")
  assert sharded["h"]["attn"]["kv_kernel"].sharding.spec == P(None, "fsdp", None, None, None)
  assert (
    len(sharded["h"]["attn"]["q_kernel"].addressable_shards[0].data.reshape(-1))
    == params["h"]["attn"]["q_kernel"].size // 4
  )

  bs = batch_sharding(mesh)
  fwd = jax.jit(
    lambda p, t, m: Transformer(cfg).apply({"params": p}, t, m), in_shardings=(shardings, bs, bs)
  )
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    got = fwd(sharded, jax.device_put(tokens, bs), jax.device_put(mask, bs))
  assert got.sharding.spec[0] == ("data", "fsdp")  # activations stay batch-sharded to the logits
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5)


def test_mesh_spec_parsing():
  assert parse_mesh_spec("fsdp=-1,tensor=2", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert parse_mesh_spec(None, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(ValueError, match="has 6 devices, but there are 8"):
    parse_mesh_spec("fsdp=3,tensor=2", 8)
  with pytest.raises(ValueError, match="does not divide 8 devices"):
    parse_mesh_spec("tensor=3,fsdp=-1", 8)
  with pytest.raises(ValueError, match="expected AXIS=SIZE"):
    parse_mesh_spec("model=8", 8)
