"""data/synthetic.py: determinism, disjoint splits that cover every template, canonical
solutions passing in the real sandbox while empty and neighbouring ones fail, docstring
examples that hold, and prompts short enough for the tiny model."""

from __future__ import annotations

import collections
import doctest
import json

import pytest

from data import synthetic
from data.prepared import prompt_text
from data.problems import Problem, load_problems
from rrtf_jax.stages.sample import load_problems as load_sample_problems

SIZES = dict(warmup=64, train=128, heldout=64)
NEW = 40  # new-template problems: 8 per template


def key(p: dict) -> tuple:
  return p["family"], tuple(p["params"])


@pytest.fixture(scope="module")
def parts():
  return synthetic.splits(0, **SIZES)


@pytest.fixture(scope="module")
def new():
  return synthetic.new_template_problems(0, NEW)


@pytest.fixture(scope="module")
def box():
  from rrtf_jax.sandbox import Limits, Sandbox

  with Sandbox(workers=2, limits=Limits(timeout=3.0), quiet=True) as b:
    yield b


def test_deterministic_per_seed_and_seeds_differ():
  a = synthetic.generate(0, 100)
  assert a == synthetic.generate(0, 100)
  assert synthetic.generate(0, 40) == a[:40]  # a prefix: ids and tests do not depend on count
  b = synthetic.generate(1, 100)
  assert [p["prompt"] for p in a] != [p["prompt"] for p in b]
  assert {key(p) for p in a} != {key(p) for p in b}
  assert json.loads(json.dumps(a)) == a
  assert synthetic.splits(3, 5, 7, 9) == synthetic.splits(3, 5, 7, 9)


def test_problem_shape_and_names():
  problems = synthetic.generate(0, synthetic.capacity())
  assert {p["family"] for p in problems} == set(synthetic.FAMILIES) and 8 <= len(
    synthetic.FAMILIES
  ) <= 12
  assert len({key(p) for p in problems}) == len(problems) == synthetic.capacity()
  # the name spells every parameter
  assert len({p["entry_point"] for p in problems}) == len(problems)
  for i, p in enumerate(problems):
    assert p["task_id"] == f"synthetic/{p['family']}/{i}"
    assert p["prompt"].startswith(f"def {p['entry_point']}(") and p["prompt"].endswith('    """\n')
    assert (
      p["canonical_solution"].startswith("    return ") and p["canonical_solution"].count("\n") == 1
    )
    assert p["test"].startswith("def check(candidate):\n") and 3 <= p["test"].count("assert ") <= 5
    doc = p["prompt"].split('"""')[1].splitlines()[0]
    for v in p["params"]:  # every number shows in the docstring's first line
      assert not isinstance(v, int) or isinstance(v, bool) or str(v) in doc, (v, doc)
  assert synthetic.number_word(0) == "zero" and synthetic.number_word(40) == "forty"
  assert (
    synthetic.number_word(-21) == "minus_twenty_one" and synthetic.number_word(17) == "seventeen"
  )


def test_new_templates_are_new_deterministic_and_even(parts, new):
  assert new == synthetic.new_template_problems(0, NEW)
  assert synthetic.new_template_problems(0, 10) == new[:10]
  assert [p["prompt"] for p in synthetic.new_template_problems(1, NEW)] != [
    p["prompt"] for p in new
  ]
  assert not set(synthetic.NEW_FAMILIES) & set(synthetic.FAMILIES)
  counts = collections.Counter(p["family"] for p in new)
  assert counts == {f: NEW // len(synthetic.NEW_FAMILIES) for f in synthetic.NEW_FAMILIES}
  assert len({key(p) for p in new}) == NEW
  seen = {p["entry_point"] for p in synthetic.generate(0, synthetic.capacity())}
  assert not seen & {p["entry_point"] for p in new}  # no name of a trained template
  trained = {p["family"] for v in parts.values() for p in v}
  assert not trained & set(synthetic.NEW_FAMILIES)
  for i, p in enumerate(new):
    assert p["task_id"] == f"synthetic_new/{p['family']}/{i}"
    assert p["canonical_solution"].startswith("    return ") and p["test"].count("assert ") == 4
  everything = synthetic.new_template_problems(0, 192)
  assert len({key(p) for p in everything}) == 192
  with pytest.raises(ValueError, match="distinct instances"):
    synthetic.new_template_problems(0, 10**4)


def test_docstring_examples_hold():
  """Each prompt's >>> example, run in-process on the canonical solution (trusted: our own
  templates)."""
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  problems = synthetic.generate(0, synthetic.capacity()) + synthetic.new_template_problems(0, 192)
  for p in problems:
    glob = {}
    exec(p["prompt"] + p["canonical_solution"], glob)
    for t in doctest.DocTestFinder().find(glob[p["entry_point"]], globs=glob):
      runner.run(t, out=lambda s: None)
  assert runner.summarize(verbose=False) == doctest.TestResults(0, len(problems))


def test_splits_disjoint_sized_and_cover_every_family(parts):
  assert {k: len(v) for k, v in parts.items()} == SIZES
  ids = [p["task_id"] for v in parts.values() for p in v]
  assert len(set(ids)) == len(ids)
  keys = {k: {key(p) for p in v} for k, v in parts.items()}
  assert all(len(keys[k]) == SIZES[k] for k in keys)
  assert not keys["warmup"] & keys["train"] and not keys["warmup"] & keys["heldout"]
  assert not keys["train"] & keys["heldout"]
  every = {p["task_id"]: p for p in synthetic.generate(0, synthetic.capacity())}
  assert all(every[p["task_id"]] == p for v in parts.values() for p in v)  # one id space per seed
  for split in ("train", "heldout"):
    counts = collections.Counter(p["family"] for p in parts[split])
    assert set(counts) == set(synthetic.FAMILIES), (split, counts)
  for sizes in [(0, 10, 3), (1, 1, 1), (7, 0, 0), (0, 0, 0), (100, 300, 100)]:
    got = synthetic.splits(5, *sizes)
    assert tuple(len(v) for v in got.values()) == sizes
  with pytest.raises(ValueError, match="distinct instances"):
    synthetic.splits(0, 10, synthetic.capacity(), 0)
  with pytest.raises(ValueError):
    synthetic.splits(0, -1, 2, 2)


def test_written_splits_load_as_problems(tmp_path):
  paths = synthetic.write_splits(str(tmp_path), 0, 2, 3, 4)
  assert {k: len(load_problems(v)) for k, v in paths.items()} == {
    "warmup": 2,
    "train": 3,
    "heldout": 4,
  }
  sample = load_sample_problems(paths["heldout"])
  assert all(sp.completion_style and sp.exec_prefix == sp.prompt for sp in sample)


def test_canonical_passes_empty_and_neighbour_fail_in_sandbox(parts, new, box):
  from rrtf_jax.stages.evaluate import execute

  problems = [p for v in parts.values() for p in v] + new
  table = {
    p["task_id"]: Problem(p["task_id"], p["prompt"], p["test"], p["entry_point"]) for p in problems
  }
  by_family = collections.defaultdict(list)
  for p in problems:
    by_family[p["family"]].append(p)
  # The wrong variant: the next instance of the same template (other parameters), cyclically.
  neighbour = {}
  for fam in by_family.values():
    for i, p in enumerate(fam):
      neighbour[p["task_id"]] = fam[(i + 1) % len(fam)]["canonical_solution"]
  samples = [
    dict(task_id=p["task_id"], completion=c, kind=kind)
    for p in problems
    for kind, c in [
      ("canonical", p["canonical_solution"]),
      ("empty", "    pass\n"),
      ("neighbour", neighbour[p["task_id"]]),
    ]
  ]
  results = execute(table, samples, box=box, progress=False)
  passed = collections.defaultdict(list)
  for r in results:
    passed[r["kind"]].append(r["passed"])
  failing = [r["task_id"] for r in results if r["kind"] == "canonical" and not r["passed"]]
  assert not failing, failing[:5]
  assert not any(passed["empty"])
  assert sum(passed["neighbour"]) <= 0.03 * len(problems), sum(passed["neighbour"])


def test_prompts_fit_the_tiny_model(tmp_path):
  """The rrtf training text (problem in triple quotes, then the prompt) stays well under 256
  tokens of a 1024-piece SentencePiece trained on the builtin corpus (the demo's tokenizer)."""
  from data.tokenizer import builtin_corpus, train_sentencepiece

  tok = train_sentencepiece(builtin_corpus(), str(tmp_path), vocab_size=1024)
  problems = synthetic.generate(0, synthetic.capacity()) + synthetic.new_template_problems(0, 192)
  texts = [prompt_text(p["prompt"]) + p["prompt"] for p in problems]
  assert max(map(len, texts)) < 380
  lengths = [len(tok.encode(t)) for t in texts]
  assert max(lengths) < 224 and sum(lengths) / len(lengths) < 180, (
    max(lengths),
    sum(lengths) / len(lengths),
  )
