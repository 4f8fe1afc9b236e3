"""RRTF training for every model family (model/families.py): `rrtf train` from each converted
tiny checkpoint (FAMILY_CASES) learns with its own LM head (an untied `lm_head` is what is
trained), `rrtf params` + `rrtf export` give HF safetensors that transformers loads, the decay
mask and shardings of the families' parameters, and a sharded Llama-style step (fsdp and tensor,
K=2 kv heads, remat) equal to one device."""

import os
import struct
import sys

import jax
import numpy as np
import pytest

from conftest import FAMILY_CASES, cli_runs_in_one_process, hf_logits, make_family_model, save_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
STEPS = 6


@pytest.fixture(scope="module")
def family_data(family_tokenizer, tmp_path_factory):
  """The toy ranked problems of test_train.py prepared with the 96-piece tokenizer."""
  sys.path.insert(0, os.path.dirname(__file__))
  from test_train import prepare_toy

  return prepare_toy(tmp_path_factory.mktemp("family-data"), family_tokenizer)


def _train_config(path, data_dir, *, init_from="", model=None, **train):
  """A config file for `rrtf train --config PATH`: the model block of the init_from checkpoint
  (or `model`), fp32 compute, the tiny config's training settings."""
  settings = dict(
    batch_size=4,
    responses=4,
    seq_len=64,
    steps=STEPS,
    learning_rate=1e-2,
    warmup_steps=1,
    schedule="constant",
    log_every=1,
    checkpoint_every=STEPS,
    logprob_chunk=32,
    async_checkpoints=False,
  )
  settings.update(train)
  model_src = f"read_config({init_from!r}).to_dict()" if init_from else repr(model)
  lines = [
    "from configs.common import base_config",
    "from model.checkpoint import read_config",
    "",
    "def get_config():",
    f"  m = {model_src}",
    "  m['dtype'] = 'float32'",
    "  c = base_config(**m)",
    "  c.tokenizer.kind = 'sentencepiece'",
    f"  c.init_from = {init_from!r}",
    f"  c.data.dir = {data_dir!r}",
    *[f"  c.train.{k} = {v!r}" for k, v in settings.items()],
    "  return c",
  ]
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def _tensorboard_losses(workdir) -> dict:
  """step -> train/loss from a run's TensorBoard event files (TFRecord framing, tensorboardX's
  Event proto)."""
  from tensorboardX.proto import event_pb2

  out = {}
  for f in sorted((workdir / "tensorboard").iterdir()):
    data, i = f.read_bytes(), 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i : i + 8])
      ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
      i += 16 + n
      out.update({ev.step: v.simple_value for v in ev.summary.value if v.tag == "train/loss"})
  return out


@pytest.fixture(scope="module")
def family_runs(family_data, family_tokenizer, tmp_path_factory):
  """Every FAMILY_CASES model converted, then in ONE process on one device: `rrtf train` from
  each checkpoint, and `rrtf params` + `rrtf export` of the qwen3 (untied head) and starcoder2
  (tied) runs. Returns (root, {case: (torch model, checkpoint)}, [(exit code, stderr)])."""
  from model.convert import convert_hf

  root = tmp_path_factory.mktemp("family-train")
  cases, argvs = {}, []
  for case in sorted(FAMILY_CASES):
    model = make_family_model(case)
    hf_dir = save_hf(model, root / case / "hf")
    ckpt = convert_hf(hf_dir, str(root / case / "ckpt"), progress=False)
    cases[case] = (model, ckpt)
    cfg = _train_config(root / case / "config.py", family_data, init_from=ckpt)
    argvs.append(["train", "--config", cfg, "--workdir", str(root / case / "work"), "--quiet"])
  for case in ("qwen3", "starcoder2"):
    w = root / case
    argvs.append(
      [
        "params",
        *("--workdir", str(w / "work"), "--out", str(w / "trained")),
        *("--tokenizer", family_tokenizer),
      ]
    )
    argvs.append(["export", "--ckpt", str(w / "trained"), "--out", str(w / "export")])
  return root, cases, cli_runs_in_one_process(argvs, cwd=ROOT, env=ONE_DEVICE)


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_rrtf_train_from_every_family(family_runs, case):
  """A few steps from the converted checkpoint: every loss finite, and the last steps' loss
  below the first steps'."""
  root, _, runs = family_runs
  code, err = runs[sorted(FAMILY_CASES).index(case)]
  assert code == 0, err[-3000:]
  losses = _tensorboard_losses(root / case / "work")
  assert sorted(losses) == list(range(1, STEPS + 1)), losses
  values = [losses[s] for s in sorted(losses)]
  print(case, " ".join(f"{v:.3f}" for v in values))
  assert np.all(np.isfinite(values))
  # 6 steps of 4 of the 24 toy problems (one epoch): the prompts differ, their forms do not
  assert np.mean(values[-2:]) < 0.9 * np.mean(values[:2]), values


@pytest.mark.parametrize("case", ["qwen3", "starcoder2"])
def test_trained_params_export_to_transformers(family_runs, case):
  """`rrtf params` then `rrtf export` of a trained run: transformers loads the safetensors and
  its logits equal ours on the trained checkpoint; the training moved the LM head (for qwen3 the
  untied lm_head, which only the loss's head reaches: it is no input embedding)."""
  import jax.numpy as jnp
  import transformers
  from safetensors.numpy import load_file

  from model import Transformer, load_checkpoint

  root, cases, runs = family_runs
  n = len(FAMILY_CASES)
  i = n + 2 * ["qwen3", "starcoder2"].index(case)
  assert [c for c, _ in runs[i : i + 2]] == [0, 0], runs[i : i + 2]
  model, ckpt = cases[case]
  out = root / case / "export"
  reloaded = getattr(transformers, model.config.architectures[0]).from_pretrained(
    str(out), attn_implementation="eager"
  )
  assert type(reloaded) is type(model)
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, 97, (2, 11))
  mask = np.ones_like(tokens)
  mask[1, :3] = 0
  cfg, params = load_checkpoint(str(root / case / "trained"))
  assert cfg == load_checkpoint(ckpt)[0].replace(dtype="float32")  # the config's fp32 compute
  ours = np.asarray(
    Transformer(cfg.replace(dtype="float32")).apply(
      {"params": params}, jnp.asarray(tokens), jnp.asarray(mask)
    )
  )
  theirs = hf_logits(reloaded.eval(), tokens, mask)
  real = mask.astype(bool)
  assert np.abs(ours - theirs)[real].max() <= 1e-4
  assert np.abs(theirs - hf_logits(model, tokens, mask))[real].max() > 1e-2  # it trained
  before, after = (
    load_file(f"{root / case / 'hf'}/model.safetensors"),
    load_file(f"{out}/model.safetensors"),
  )
  tied = model.config.tie_word_embeddings
  assert set(after) == set(before) - ({"lm_head.weight"} if tied else set())
  head = "lm_head.weight" if not model.config.tie_word_embeddings else None
  if head:
    assert head in after and np.abs(after[head] - before[head]).max() > 1e-3
    assert not np.allclose(after[head], after["model.embed_tokens.weight"])
  else:
    assert "lm_head.weight" not in after


def test_decay_mask_and_shardings_of_every_family(family_converted):
  """Weight decay on kernels (gate/up too) and embeddings (wte, an untied lm_head), not on biases
  or norm scales (the q/k norms too); on a fsdp=4, tensor=2 mesh the new parameters take their
  logical axes: lm_head as wte, gate/up as fc, q/k norm scales [L, head_dim] replicated."""
  import flax.linen as nn
  from jax.sharding import PartitionSpec as P

  from model import abstract_params
  from model.checkpoint import read_config
  from model.sharding import LOGICAL_RULES, logical_to_sharding, make_mesh
  from rrtf_jax.train_step import _decays

  case, _, _, ckpt = family_converted
  cfg = read_config(ckpt)
  boxed = abstract_params(cfg)
  flat = {
    "/".join(str(getattr(k, "key", k)) for k in path): decays
    for path, decays in jax.tree_util.tree_leaves_with_path(
      jax.tree_util.tree_map_with_path(_decays, nn.unbox(boxed))
    )
  }
  decayed = {k for k, v in flat.items() if v}
  want = {k for k in flat if k.endswith("kernel") or k in ("wte", "wpe", "lm_head")}
  assert decayed == want, (case, sorted(decayed ^ want))
  assert ("lm_head" in flat) == (not cfg.tie_embeddings)
  if cfg.qk_norm:
    assert {"h/attn/q_norm/scale", "h/attn/k_norm/scale"} <= set(flat) - decayed
  if cfg.mlp == "gated":
    assert {"h/mlp/gate_kernel", "h/mlp/up_kernel"} <= decayed and "h/mlp/fc_kernel" not in flat
  with nn.logical_axis_rules(LOGICAL_RULES):
    shard = logical_to_sharding(boxed, make_mesh("fsdp=4,tensor=2"))
  specs = {
    "/".join(str(getattr(k, "key", k)) for k in path): s.spec
    for path, s in jax.tree_util.tree_leaves_with_path(shard)
  }
  assert specs["wte"] == P("tensor", "fsdp")
  if "lm_head" in specs:
    assert specs["lm_head"] == P("tensor", "fsdp")
  if cfg.mlp == "gated":
    assert specs["h/mlp/gate_kernel"] == specs["h/mlp/up_kernel"] == P(None, "fsdp", "tensor")
  if cfg.qk_norm:
    assert specs["h/attn/q_norm/scale"] == specs["h/attn/k_norm/scale"] == P(None, None)
  assert specs["h/attn/kv_kernel"] == P(None, "fsdp", None, None, None)  # K=2 kv heads replicate


@pytest.mark.parametrize("family_converted", ["llama"], indirect=True)
def test_sharded_llama_step_equals_one_device(family_converted, family_data, tmp_path):
  """A Llama-style model (RoPE, RMSNorm, gated MLP, GQA with K=2, untied head) trained 3 steps on a
  data=1, fsdp=4, tensor=2 mesh with remat equals one device without; a vocabulary that does
  not split over the mesh (97 over tensor=2) is a one-line error before anything is built."""
  from model.checkpoint import read_config
  from rrtf_jax.config_loading import load_config
  from rrtf_jax.stages.train import train_and_evaluate
  from rrtf_jax.train_step import TrainError

  _, _, _, ckpt = family_converted
  model = read_config(ckpt).replace(vocab_size=96).to_dict()  # 96 splits over tensor=2
  cfg = _train_config(tmp_path / "c.py", family_data, model=model, steps=3, checkpoint_every=3)
  sharded = load_config(cfg)
  sharded.mesh, sharded.model.remat = "fsdp=4,tensor=2", "full"
  a = train_and_evaluate(sharded, str(tmp_path / "sharded"), progress=False)
  assert a.params["lm_head"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  one = load_config(cfg)
  one.mesh = "fsdp=1"
  b = train_and_evaluate(one, str(tmp_path / "one"), progress=False, devices=jax.devices()[:1])
  la, lb = [h["loss"] for h in a.history], [h["loss"] for h in b.history]
  print("sharded", la, "one device", lb)
  assert len(la) == 3 and np.all(np.isfinite(la))
  np.testing.assert_allclose(la, lb, rtol=2e-5)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
  bad = load_config(cfg)
  bad.mesh, bad.model.vocab_size = "fsdp=4,tensor=2", 97
  with pytest.raises(TrainError) as e:
    train_and_evaluate(bad, str(tmp_path / "bad"), progress=False)
  assert str(e.value) == (
    "parameter lm_head [97, 32]: a dimension of 97 does not split over mesh axes tensor = 2; "
    "choose another config.mesh"
  )
  assert not (tmp_path / "bad").exists()
