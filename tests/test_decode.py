"""KV-cache decoding (model/decode.py) against full recomputation, HF `generate`, and itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import Transformer, load_checkpoint
from model.decode import Batcher, Decoder, Request, sample_tokens

PROMPT_LENS = (5, 9, 1, 17)  # 17 crosses the smallest prompt bucket (16)
NEW = 10


def _prompts(seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(3, 97, n).tolist() for n in PROMPT_LENS]


def _recompute_greedy(apply, params, prompt, new, eos):
  """The definition: run the whole sequence through the model for every new token (right-padded
  to one length, which a causal model ignores, so `apply` compiles once for every prompt)."""
  width = 32
  seq, out = list(prompt), []
  for _ in range(new):
    tok = int(
      jnp.argmax(apply(params, jnp.asarray([seq + [0] * (width - len(seq))]), len(seq) - 1))
    )
    out.append(tok)
    seq.append(tok)
    if tok == eos:
      break
  return out


@pytest.fixture(scope="module")
def decoder(converted):
  model, _, ckpt = converted
  cfg, params = load_checkpoint(ckpt)
  cfg = cfg.replace(dtype="float32")
  return model, Decoder(cfg, params, chunk=4)  # chunks of 4: several loop calls per row


def test_cached_greedy_equals_recomputation(decoder):
  _, dec = decoder
  gens = dec.generate(_prompts(), max_new_tokens=NEW)
  apply = jax.jit(lambda p, t, i: Transformer(dec.config).apply({"params": p}, t)[0, i])
  for prompt, g in zip(_prompts(), gens):
    assert g.tokens == _recompute_greedy(apply, dec.params, prompt, NEW, dec.eos_id)
    assert g.prompt_tokens == len(prompt)
    assert g.finish_reason == ("stop" if g.tokens[-1] == dec.eos_id else "length")


def test_split_and_stacked_layers_decode_alike(decoder):
  """The per-layer arrays the decoder keeps on CPU and the scanned stack it keeps elsewhere
  generate the same tokens (split_layers only moves where the weights are read from)."""
  _, dec = decoder
  assert isinstance(dec.layer_params["h"], tuple)  # CPU: split by default
  stacked = Decoder(dec.config, dec.params, chunk=4, split=False)
  assert not isinstance(stacked.layer_params["h"], tuple)
  prompts = _prompts(1)
  assert [g.tokens for g in stacked.generate(prompts, max_new_tokens=NEW)] == [
    g.tokens for g in dec.generate(prompts, max_new_tokens=NEW)
  ]


def test_greedy_equals_transformers_generate(decoder):
  """A left-padded batch through HF's generate (positions from its mask) gives our tokens."""
  import torch

  model, dec = decoder
  prompts = _prompts(1)
  p = max(map(len, prompts))
  ids = np.zeros((len(prompts), p), np.int64)
  mask = np.zeros_like(ids)
  for i, row in enumerate(prompts):
    ids[i, p - len(row) :], mask[i, p - len(row) :] = row, 1
  with torch.no_grad():
    ref = model.generate(
      torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      do_sample=False,
      max_new_tokens=NEW,
      eos_token_id=dec.eos_id,
      pad_token_id=0,
    )[:, p:].numpy()
  for row, g in zip(ref, dec.generate(prompts, max_new_tokens=NEW)):
    want = row.tolist()
    if dec.eos_id in want:  # HF pads rows that finished early
      want = want[: want.index(dec.eos_id) + 1]
    assert g.tokens == want


def test_per_row_limits_and_seeds(decoder):
  _, dec = decoder
  reqs = [
    Request(p, max_new_tokens=n, temperature=1.0, seed=s)
    for p, n, s in zip(_prompts(), (3, 7, 1, 12), (11, 12, 13, 14))
  ]
  gens = dec.generate(reqs)
  assert any(g.finish_reason == "length" for g in gens)  # the next check is not vacuous
  assert [len(g.tokens) for g in gens if g.finish_reason == "length"] == [
    r.max_new_tokens for r, g in zip(reqs, gens) if g.finish_reason == "length"
  ]
  assert all(len(g.tokens) <= r.max_new_tokens for r, g in zip(reqs, gens))
  # Deterministic, and a row's tokens depend on its own seed, not on the other rows of its batch.
  assert [g.tokens for g in dec.generate(reqs)] == [g.tokens for g in gens]
  alone = dec.generate([reqs[3]])[0]
  assert alone.tokens == gens[3].tokens
  other_seed = dec.generate([Request(reqs[3].prompt, max_new_tokens=12, temperature=1.0, seed=99)])[
    0
  ]
  assert other_seed.tokens != gens[3].tokens


def _mixed_requests():
  """Rows of every kind: greedy and sampled (temperature, top-p, top-k), budgets from 1 to 12,
  and one prompt three times with different seeds (its prefill is shared)."""
  a, b, c, d = _prompts(2)
  return [
    Request(a, max_new_tokens=3),
    Request(b, max_new_tokens=12, temperature=0.7, seed=5),
    Request(c, max_new_tokens=5, temperature=1.2, top_p=0.9, seed=6),
    Request(d, max_new_tokens=9, temperature=1.0, top_k=5, seed=7),
    Request(b, max_new_tokens=1),
    Request(d, max_new_tokens=12, temperature=1.0, seed=8),
    Request(d, max_new_tokens=7, temperature=1.0, seed=9),
    Request(a, max_new_tokens=12),
  ]


def _recompute_sampled(apply, params, r: Request, seed: int, eos):
  """A row decoded alone by definition: the whole sequence through the model for every token,
  sampled with the key the decoder folds from (generator seed, row seed, the row's step)."""
  sample = jax.jit(sample_tokens)
  key = jax.random.fold_in(jax.random.key(seed), r.seed)
  seq, out = list(r.prompt), []
  for t in range(r.max_new_tokens):
    logits = apply(params, jnp.asarray([seq + [0] * (32 - len(seq))]), len(seq) - 1)
    tok = int(
      sample(
        logits[None].astype(jnp.float32),
        key[None],
        t,
        jnp.asarray([r.temperature], jnp.float32),
        jnp.asarray([r.top_p], jnp.float32),
        jnp.asarray([r.top_k], jnp.int32),
      )[0]
    )
    out.append(tok)
    seq.append(tok)
    if tok == eos:
      break
  return out


def test_continuous_batching_equals_decoding_alone(decoder):
  """Eight rows through two slots: rows that finish early free their slot for waiting ones at
  the next chunk boundary, identical prompts prefill once, and every row's tokens equal its
  tokens decoded alone (one slot), HF generate's (greedy) and full recomputation's (sampled)."""
  import torch

  model, dec = decoder
  two = Decoder(dec.config, dec.layer_params, chunk=4, max_batch=2)
  prefilled, inserted = [], []  # prompts per prefill; rows started from a kept prefill
  admit, insert = two._admit, two._insert

  def counting_admit(params, cfg, state, tokens, mask, src, dst, count, *rest):
    prefilled.append(len(set(np.asarray(src)[: int(count)].tolist())))
    return admit(params, cfg, state, tokens, mask, src, dst, count, *rest)

  def counting_insert(state, pre, src, dst, count, *rest):
    inserted.append(int(count))
    return insert(state, pre, src, dst, count, *rest)

  two._admit, two._insert = counting_admit, counting_insert
  reqs = _mixed_requests()
  gens = two.generate(reqs)
  assert len(prefilled) + len(inserted) > 1  # slots were refilled while others decoded
  # every prompt ran through the model once, whichever slot and time its rows started
  assert sum(prefilled) == len({tuple(r.prompt) for r in reqs}) < len(reqs)
  assert inserted  # later rows of a prompt started from its kept prefill
  one = Decoder(dec.config, dec.layer_params, chunk=4, max_batch=1)
  apply = jax.jit(lambda p, t, i: Transformer(dec.config).apply({"params": p}, t)[0, i])
  for r, g in zip(reqs, gens):
    assert g.tokens == one.generate([r])[0].tokens
    if r.temperature == 0:
      with torch.no_grad():
        ref = model.generate(
          torch.tensor([r.prompt]),
          do_sample=False,
          max_new_tokens=r.max_new_tokens,
          eos_token_id=dec.eos_id,
          pad_token_id=0,
        )[0, len(r.prompt) :].tolist()
      assert g.tokens == ref
    else:
      assert g.tokens == _recompute_sampled(apply, dec.params, r, dec.seed, dec.eos_id)
    assert len(g.tokens) <= r.max_new_tokens


def test_batcher_cancel_frees_the_slot(decoder):
  """A cancelled row leaves its slot at once; the next step starts a waiting row there, and the
  rows that stay get the tokens they get alone. When all is done, nothing is busy or waiting."""
  _, dec = decoder
  two = Decoder(dec.config, dec.layer_params, chunk=4, max_batch=2)
  reqs = [Request(p, max_new_tokens=12, temperature=1.0, seed=i) for i, p in enumerate(_prompts())]
  batcher = Batcher(two, slots=2, length=64)
  for i, r in enumerate(reqs[:3]):
    batcher.add(i, r)
  first = batcher.step()
  assert {u.key for u in first} == {0, 1} and [r.key for r in batcher.waiting] == [2]
  batcher.cancel([0])
  assert batcher.busy == 1
  results = {}
  while batcher.busy or batcher.waiting:
    for u in batcher.step():
      assert u.key != 0
      if u.generation is not None:
        results[u.key] = u.generation.tokens
  assert sorted(results) == [1, 2]
  for i in (1, 2):
    assert results[i] == two.generate([reqs[i]])[0].tokens
  assert batcher.busy == 0 and not batcher.waiting
  assert bool(np.all(np.asarray(batcher.state.done)))  # no slot decodes on


def test_sample_tokens_filters():
  logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1]] * 4096))
  keys = jax.vmap(jax.random.key)(jnp.arange(4096))
  b = logits.shape[0]
  # Jitted as the decode loop runs it: one compile serves every setting below (called eagerly,
  # each call traced and compiled its lax.conds again).
  sample = jax.jit(sample_tokens)

  def draw(temperature, top_p, top_k):

    def full(x, dt):
      return jnp.full((b,), x, dt)

    return np.asarray(
      sample(
        logits,
        keys,
        0,
        full(temperature, jnp.float32),
        full(top_p, jnp.float32),
        full(top_k, jnp.int32),
      )
    )

  assert set(draw(0.0, 1.0, 0)) == {0}  # greedy
  assert set(draw(1.0, 1.0, 2)) == {0, 1}  # top-k
  assert set(draw(1.0, 0.5, 0)) == {0, 1}  # top-p: 0.4 < 0.5, so the 0.3 token is needed too
  assert set(draw(1.0, 0.4, 0)) == {0}
  counts = np.bincount(draw(1.0, 1.0, 0), minlength=4) / b
  np.testing.assert_allclose(counts, [0.4, 0.3, 0.2, 0.1], atol=0.03)
  sharp = np.bincount(draw(0.25, 1.0, 0), minlength=4) / b  # temperature sharpens
  assert sharp[0] > 0.6


@pytest.fixture(scope="module")
def text_decoder(tiny_ckpt):
  return Decoder.from_checkpoint(tiny_ckpt, chunk=4)


def test_stop_sequences_cut_exactly(text_decoder):
  dec = text_decoder
  prompt = "def fibonacci(n):\n    "
  full = dec.generate([prompt], max_new_tokens=40)[0]
  assert full.finish_reason == "length" and len(full.text) > 12
  stop = full.text[8:11]
  cut = full.text.find(stop)
  g = dec.generate([Request(prompt, max_new_tokens=40, stop=("never-appears", stop))])[0]
  assert g.text == full.text[:cut]
  assert g.finish_reason == "stop"
  # Tokens stop at the one that completed the stop sequence: a prefix of the unstopped tokens.
  assert g.tokens == full.tokens[: len(g.tokens)]
  assert stop in dec.tokenizer.decode(g.tokens) and stop not in dec.tokenizer.decode(g.tokens[:-1])


def test_stop_sequences_across_chunks(text_decoder):
  """With chunks of one token and incremental detokenisation, stop sequences that span tokens
  and chunks still cut exactly where they first appear in the full text (several per batch)."""
  dec = Decoder(text_decoder.config, text_decoder.layer_params, text_decoder.tokenizer, chunk=1)
  prompt = "def fibonacci(n):\n    "
  full = dec.generate([prompt], max_new_tokens=30)[0]
  assert len(full.text) > 12
  stops = [full.text[a : a + n] for a, n in ((2, 3), (5, 4), (9, 2), (len(full.text) - 3, 3))]
  gens = dec.generate([Request(prompt, max_new_tokens=30, stop=(s,)) for s in stops])
  for s, g in zip(stops, gens):
    assert g.text == full.text[: full.text.find(s)], s
    assert g.tokens == full.tokens[: len(g.tokens)]
    assert s in dec.tokenizer.decode(g.tokens) and s not in dec.tokenizer.decode(g.tokens[:-1])


def test_streamed_text_builds_up_to_the_result(text_decoder):
  dec = text_decoder
  seen = {}

  def on_chunk(i, text, finished):
    assert text.startswith(seen.get(i, ("",))[0])  # text only grows
    seen[i] = (text, finished)

  reqs = [
    Request("import os\n", max_new_tokens=20, stop=("\n\n\n",)),
    Request("class A:\n", max_new_tokens=9),
  ]
  gens = dec.generate(reqs, on_chunk=on_chunk)
  assert {i: seen[i] for i in (0, 1)} == {i: (g.text, True) for i, g in enumerate(gens)}


def test_bad_requests(text_decoder):
  dec = text_decoder
  with pytest.raises(ValueError, match="positions"):
    dec.generate([list(range(5, 600))])
  with pytest.raises(ValueError, match="top_p"):
    dec.generate([Request("x", top_p=0.0)])
  with pytest.raises(ValueError, match="max_new_tokens"):
    dec.generate([Request("x", max_new_tokens=0)])


@pytest.mark.parametrize("mesh", ["data=2,fsdp=2,tensor=2", "tensor=4"])
def test_sharded_decoding_matches_one_device(tiny_ckpt, mesh):
  """Weights sharded by the logical rules over a mesh of 8 (or 4) fake devices; batch and
  cache over the batch axes: the same greedy tokens as on one device."""
  from model.sharding import make_mesh

  ckpt = tiny_ckpt
  devices = jax.devices()[: 8 if "data" in mesh else 4]
  ref = Decoder.from_checkpoint(ckpt, dtype="float32", chunk=4).generate(
    _prompts(), max_new_tokens=NEW
  )
  sharded = Decoder.from_checkpoint(ckpt, dtype="float32", chunk=4, mesh=make_mesh(mesh, devices))
  assert len(sharded.params["wte"].sharding.device_set) == len(devices)
  assert [g.tokens for g in sharded.generate(_prompts(), max_new_tokens=NEW)] == [
    g.tokens for g in ref
  ]
