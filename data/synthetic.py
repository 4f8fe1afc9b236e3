"""A procedurally generated family of tiny Python problems, for `rrtf demo`.

Each problem is one instance of a template: a function family whose one-line solution
depends on a few parameters that the prompt shows twice, in the function's name and in its
docstring (`add_three`, "... with 3 added to every element."). A model trained briefly from
scratch can learn the templates and has to copy the parameters: easy enough that it
sometimes succeeds, hard enough that ranking its responses by unit tests has something to
teach. Held-out instances reuse the templates with parameter tuples unseen in training;
new_template_problems() draws from five more templates (NEW_FAMILIES) that no split of
splits() uses, to measure transfer to templates never trained on.

Problems are HumanEval-format dicts (task_id, prompt, test, entry_point, canonical_solution):
the prompt is signature + docstring with one example, the canonical solution the indented
body. Expected values in the tests and the example come from a reference implementation run
here at generation time, on inputs drawn from a per-instance seeded RNG (boundary values
included, so a neighbouring parameter fails). Same seed, same problems. Two extra fields,
`family` and `params` (a JSON list), name the instance; HumanEval readers ignore them.

    from data.synthetic import splits, write_splits
    parts = splits(seed=0, warmup=64, train=128, heldout=64)  # no (family, params) in two splits
    new = new_template_problems(seed=0, count=64)  # templates no split has
"""

from __future__ import annotations

import collections
import dataclasses
import operator
import random
import string
from typing import Callable

from data.problems import write_jsonl_atomic

SPLITS = ("warmup", "train", "heldout")
TESTS = 4  # asserts per problem, besides the docstring example

_ONES = (  # noqa: SIM905  (a word list reads better as text than as 20 quoted items)
  "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
  "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()  # noqa: SIM905  (as _ONES)
_AFFIXES = (
  "ing",
  "ed",
  "er",
  "ly",
  "s",
  "es",
  "un",
  "re",
  "pre",
  "x",
  "ab",
  "cat",
  "dog",
  "zip",
  "top",
  "box",
  "red",
  "sun",
  "py",
  "ok",
)


def number_word(n: int) -> str:
  """An identifier-friendly spelling of -99..99: 3 -> three, -21 -> minus_twenty_one."""
  if n < 0:
    return "minus_" + number_word(-n)
  if n < 20:
    return _ONES[n]
  if n >= 100:
    raise ValueError(f"number_word handles -99..99, got {n}")
  return _TENS[n // 10 - 2] + ("" if n % 10 == 0 else "_" + _ONES[n % 10])


@dataclasses.dataclass(frozen=True)
class Spec:
  """One instance: what the prompt says, the solution, and a trusted reference."""

  name: str  # the entry point
  arg: str  # the one parameter: xs (a list of ints), x (an int) or s (a str)
  doc: str  # the docstring's first line
  body: str  # the solution's one statement, unindented
  ref: Callable  # the same function as plain Python, for expected values
  # 1 + TESTS argument tuples; the first is the example
  cases: Callable[[random.Random], list[tuple]]


def _ints(r: random.Random, n: int, lo: int, hi: int) -> list[int]:
  return [r.randint(lo, hi) for _ in range(n)]


def _word(r: random.Random, lo: int, hi: int) -> str:
  return "".join(r.choice(string.ascii_lowercase[:8]) for _ in range(r.randint(lo, hi)))


def _mixed(r: random.Random, must: list[int], lo: int, hi: int, more: int = 0) -> list[int]:
  """`must` plus `more` (default 1-3) values from [lo, hi], shuffled."""
  xs = must + _ints(r, more or r.randint(1, 3), lo, hi)
  r.shuffle(xs)
  return xs


# ------------------------------------------------------------------------------ templates
# Each takes one parameter tuple and returns a Spec; _FAMILY_TABLE lists every tuple.


def _add(k):
  return Spec(
    f"add_{number_word(k)}",
    "xs",
    f"Return a new list with {k} added to every element.",
    f"return [x + {k} for x in xs]",
    lambda xs: [x + k for x in xs],
    lambda r: [(_ints(r, 2, 0, 9),)] + [(_ints(r, r.randint(1, 5), -9, 20),) for _ in range(TESTS)],
  )


def _multiply(k):
  nonzero = [v for v in range(-9, 10) if v]
  return Spec(
    f"multiply_by_{number_word(k)}",
    "xs",
    f"Return a new list with every element multiplied by {k}.",
    f"return [x * {k} for x in xs]",
    lambda xs: [x * k for x in xs],
    lambda r: (
      [([r.randint(1, 5) for _ in range(2)],)]
      + [([r.choice(nonzero) for _ in range(r.randint(1, 5))],) for _ in range(TESTS)]
    ),
  )


_COMPARISONS = {  # op -> (its word in a name, in a docstring, the test)
  ">": ("above", "greater than", operator.gt),
  "<": ("below", "less than", operator.lt),
  ">=": ("at_least", "greater than or equal to", operator.ge),
  "<=": ("at_most", "less than or equal to", operator.le),
}


def _around(k: int, lengths: tuple[int, int], inclusive: bool = False):
  """Inputs of a threshold template: k's neighbours (a neighbouring k fails; an inclusive test
  also gets k in the example), k itself (a strict test of an inclusive one fails), then lists
  of `lengths` around k."""
  example = [k - 1, k, k + 1] if inclusive else [k - 1, k + 1]
  return lambda r: (
    [(_mixed(r, example, k - 5, k + 5, 1),), (_mixed(r, [k - 1, k, k + 1], k - 8, k + 8),)]
    + [(_ints(r, r.randint(*lengths), k - 8, k + 8),) for _ in range(TESTS - 1)]
  )


def _filter(op, k):
  word, words, test = _COMPARISONS[op]
  return Spec(
    f"keep_{word}_{number_word(k)}",
    "xs",
    f"Return the elements of xs {words} {k}.",
    f"return [x for x in xs if x {op} {k}]",
    lambda xs: [x for x in xs if test(x, k)],
    _around(k, (2, 6), inclusive="=" in op),
  )


def _count(k):
  return Spec(
    f"count_equal_to_{number_word(k)}",
    "xs",
    f"Return how many elements of xs are equal to {k}.",
    f"return xs.count({k})",
    lambda xs: xs.count(k),
    lambda r: (
      [(_mixed(r, [k], k - 1, k + 1, 2),), (_mixed(r, [k, k], k - 2, k + 2),)]
      + [(_ints(r, r.randint(3, 7), k - 2, k + 2),) for _ in range(TESTS - 1)]
    ),
  )


def _elements(k: int) -> str:
  return f"{k} element{'s' if k > 1 else ''}"


def _slice_sum(end, k):
  first = end == "first"
  return Spec(
    f"sum_{end}_{number_word(k)}",
    "xs",
    f"Return the sum of the {end} {_elements(k)} of xs.",
    f"return sum(xs[:{k}])" if first else f"return sum(xs[-{k}:])",
    lambda xs: sum(xs[:k]) if first else sum(xs[-k:]),
    lambda r: (
      [(_ints(r, k + 1, 1, 9),)] + [(_ints(r, k + r.randint(1, 4), 1, 20),) for _ in range(TESTS)]
    ),
  )


def _extreme(fn, k):
  big = fn == "max"
  return Spec(
    f"{fn}_plus_{number_word(k)}",
    "xs",
    f"Return the {'largest' if big else 'smallest'} element of xs plus {k}.",
    f"return {fn}(xs) + {k}",
    lambda xs: (max(xs) if big else min(xs)) + k,
    lambda r: (
      [(r.sample(range(10), 3),)]
      + [(r.sample(range(-9, 21), r.randint(2, 6)),) for _ in range(TESTS)]
    ),
  )


def _repeat(k):
  return Spec(
    f"repeat_{number_word(k)}_times",
    "s",
    f"Return s repeated {k} times.",
    f"return s * {k}",
    lambda s: s * k,
    lambda r: [(_word(r, 1, 1),)] + [(_word(r, 1, 3),) for _ in range(TESTS)],
  )


def _take(end, reverse, k):
  first = end == "first"
  body = {
    (True, False): f"xs[:{k}]",
    (False, False): f"xs[-{k}:]",
    (True, True): f"xs[:{k}][::-1]",
    (False, True): f"xs[::-1][:{k}]",
  }[first, reverse]

  def ref(xs):
    return (xs[:k] if first else xs[-k:])[:: -1 if reverse else 1]

  return Spec(
    f"{end}_{number_word(k)}" + ("_reversed" if reverse else ""),
    "xs",
    f"Return the {end} {_elements(k)} of xs" + (", reversed." if reverse else "."),
    f"return {body}",
    ref,
    lambda r: (
      [(r.sample(range(10), k + 1),)]
      + [(r.sample(range(40), k + r.randint(1, 4)),) for _ in range(TESTS)]
    ),
  )


def _clamp(lo, hi):
  def cases(r):
    tests = [lo - 1, hi + 1, r.randint(lo, hi), r.randint(lo - 20, lo - 2)]
    r.shuffle(tests)
    return [(r.randint(lo - 5, hi + 5),)] + [(x,) for x in tests]

  return Spec(
    f"clamp_{number_word(lo)}_to_{number_word(hi)}",
    "x",
    f"Return x limited to the range [{lo}, {hi}].",
    f"return max({lo}, min(x, {hi}))",
    lambda x: max(lo, min(x, hi)),
    cases,
  )


def _divisible(k):
  def cases(r):
    # k itself fails every larger k; an even non-multiple fails most smaller ones.
    tests = [
      k,
      k * (2 * r.randint(1, 5) + 1),
      k * r.randint(1, 9) + r.randint(1, k - 1),
      r.choice([x for x in range(2, 120, 2) if x % k] or [k + 1]),
    ]
    r.shuffle(tests)
    return [(k * r.randint(1, 4),)] + [(x,) for x in tests]

  return Spec(
    f"is_multiple_of_{number_word(k)}",
    "x",
    f"Return True if x is a multiple of {k}.",
    f"return x % {k} == 0",
    lambda x: x % k == 0,
    cases,
  )


def _affix(where, w):
  after = where == "append"
  return Spec(
    f"{where}_{w}",
    "s",
    f"Return s with {w!r} {where}ed.",
    f"return s + {w!r}" if after else f"return {w!r} + s",
    lambda s: s + w if after else w + s,
    lambda r: [(_word(r, 2, 3),)] + [(_word(r, 0, 5),) for _ in range(TESTS)],
  )


# name -> (builder, every parameter tuple)
_FAMILY_TABLE: dict[str, tuple[Callable[..., Spec], list[tuple]]] = {
  "add": (_add, [(k,) for k in range(1, 41)]),
  "multiply": (_multiply, [(k,) for k in range(2, 41)]),
  "filter": (_filter, [(op, k) for op in "><" for k in range(0, 31)]),
  "count": (_count, [(k,) for k in range(0, 31)]),
  "slice_sum": (_slice_sum, [(end, k) for end in ("first", "last") for k in range(1, 9)]),
  "extreme": (_extreme, [(fn, k) for fn in ("max", "min") for k in range(1, 31)]),
  "repeat": (_repeat, [(k,) for k in range(2, 17)]),
  "take": (
    _take,
    [(end, rev, k) for end in ("first", "last") for rev in (False, True) for k in range(1, 6)],
  ),
  "clamp": (_clamp, [(lo, lo + d) for lo in range(-5, 11) for d in range(1, 11)]),
  "divisible": (_divisible, [(k,) for k in range(2, 41)]),
  "affix": (_affix, [(where, w) for where in ("append", "prepend") for w in _AFFIXES]),
}
FAMILIES: tuple[str, ...] = tuple(_FAMILY_TABLE)


# ----------------------------------------------------------------- templates held out entirely
# Never in warm-up or RRTF training: each recombines pieces of the templates above (a new
# operator, a filter inside a count, a sum plus a constant...), so pass@1 on them measures
# transfer rather than recall of a template.


def _subtract(k):
  return Spec(
    f"subtract_{number_word(k)}",
    "xs",
    f"Return a new list with {k} subtracted from every element.",
    f"return [x - {k} for x in xs]",
    lambda xs: [x - k for x in xs],
    lambda r: (
      [(_ints(r, 2, 10, 19),)] + [(_ints(r, r.randint(1, 5), -9, 20),) for _ in range(TESTS)]
    ),
  )


def _count_filter(op, k):
  word, words, test = _COMPARISONS[op]
  return Spec(
    f"count_{word}_{number_word(k)}",
    "xs",
    f"Return how many elements of xs are {words} {k}.",
    f"return len([x for x in xs if x {op} {k}])",
    lambda xs: sum(1 for x in xs if test(x, k)),
    _around(k, (3, 7)),
  )


def _sum_plus(k):
  return Spec(
    f"sum_plus_{number_word(k)}",
    "xs",
    f"Return the sum of xs plus {k}.",
    f"return sum(xs) + {k}",
    lambda xs: sum(xs) + k,
    lambda r: [(_ints(r, 3, 0, 9),)] + [(_ints(r, r.randint(1, 6), -9, 20),) for _ in range(TESTS)],
  )


def _surround(w):
  return Spec(
    f"surround_{w}",
    "s",
    f"Return s with {w!r} prepended and appended.",
    f"return {w!r} + s + {w!r}",
    lambda s: w + s + w,
    lambda r: [(_word(r, 2, 3),)] + [(_word(r, 0, 5),) for _ in range(TESTS)],
  )


_NEW_TEMPLATE_TABLE: dict[str, tuple[Callable[..., Spec], list[tuple]]] = {
  "subtract": (_subtract, [(k,) for k in range(1, 41)]),
  "filter_inclusive": (_filter, [(op, k) for op in (">=", "<=") for k in range(0, 31)]),
  "count_filter": (_count_filter, [(op, k) for op in "><" for k in range(0, 31)]),
  "sum_plus": (_sum_plus, [(k,) for k in range(1, 41)]),
  "surround": (_surround, [(w,) for w in _AFFIXES]),
}
NEW_FAMILIES: tuple[str, ...] = tuple(_NEW_TEMPLATE_TABLE)
_TABLES = {**_FAMILY_TABLE, **_NEW_TEMPLATE_TABLE}


def capacity() -> int:
  """How many distinct instances the family holds in all."""
  return sum(len(space) for _, space in _FAMILY_TABLE.values())


def instance(seed: int, family: str, params: tuple, task_id: str) -> dict:
  """One HumanEval-format problem (plus `family` and `params`), its inputs seeded by
  (seed, family, params) alone."""
  spec = _TABLES[family][0](*params)
  r = random.Random(f"synthetic/{seed}/{family}/{params!r}")  # str seeds hash stably (sha512)
  cases = spec.cases(r)

  def call(args):  # the arguments as they are written in a call
    return ", ".join(map(repr, args))

  example = cases[0]
  prompt = (
    f"def {spec.name}({spec.arg}):\n"
    f'    """{spec.doc}\n'
    f"    >>> {spec.name}({call(example)})\n"
    f"    {spec.ref(*example)!r}\n"
    f'    """\n'
  )
  test = "def check(candidate):\n" + "".join(
    f"    assert candidate({call(args)}) == {spec.ref(*args)!r}\n" for args in cases[1:]
  )
  return dict(
    task_id=task_id,
    prompt=prompt,
    test=test,
    entry_point=spec.name,
    canonical_solution=f"    {spec.body}\n",
    family=family,
    params=list(params),
  )


def _order(seed: int) -> list[tuple[str, tuple]]:
  """Every (family, params) once: each family's space shuffled by `seed`, then dealt round-robin
  (family order reshuffled every round) so any prefix covers the families evenly."""
  rng = random.Random(seed)
  pools = {}
  for name, (_, space) in _FAMILY_TABLE.items():
    pools[name] = list(space)
    rng.shuffle(pools[name])
  out = []
  while any(pools.values()):
    names = [n for n in FAMILIES if pools[n]]
    rng.shuffle(names)
    out += [(n, pools[n].pop()) for n in names]
  return out


def generate(seed: int, count: int) -> list[dict]:
  """`count` distinct problems; each is `synthetic/<family>/<index>`, index its position here,
  and generate(seed, n) is a prefix of generate(seed, m) for n < m."""
  if not 0 <= count <= capacity():
    raise ValueError(f"the synthetic family has {capacity()} distinct instances; asked for {count}")
  return [
    instance(seed, fam, params, f"synthetic/{fam}/{i}")
    for i, (fam, params) in enumerate(_order(seed)[:count])
  ]


def splits(seed: int, warmup: int, train: int, heldout: int) -> dict[str, list[dict]]:
  """Disjoint warmup / train / heldout lists of the given sizes: no (family, params) in two of
  them. The splits take turns in proportion to their sizes (largest deficit first), and each
  cycles through the families (reshuffled every round), taking the next unused instance, so
  every split gets its share of every family. Ids are those of generate(seed, capacity())."""
  sizes = dict(zip(SPLITS, (warmup, train, heldout)))
  if min(sizes.values()) < 0:
    raise ValueError(f"split sizes must be non-negative, got {sizes}")
  total = sum(sizes.values())
  if total > capacity():
    raise ValueError(f"the synthetic family has {capacity()} distinct instances; asked for {total}")
  pools = collections.defaultdict(collections.deque)  # family -> its positions in _order
  for i, (fam, _) in enumerate(order := _order(seed)):
    pools[fam].append(i)
  rng = random.Random(f"synthetic/splits/{seed}")
  rounds = {name: [] for name in SPLITS}  # families a split has yet to visit this round
  picked = {name: [] for name in SPLITS}
  for i in range(total):
    name = max(SPLITS, key=lambda s: sizes[s] * (i + 1) / total - len(picked[s]))
    fam = None
    while fam is None or not pools[fam]:  # ends: total <= capacity leaves some pool non-empty
      if not rounds[name]:
        rounds[name] = [f for f in FAMILIES if pools[f]]
        rng.shuffle(rounds[name])
      fam = rounds[name].pop()
    picked[name].append(pools[fam].popleft())
  return {
    name: [instance(seed, *order[j], f"synthetic/{order[j][0]}/{j}") for j in picked[name]]
    for name in SPLITS
  }


def new_template_problems(seed: int, count: int) -> list[dict]:
  """`count` distinct instances of the NEW_FAMILIES templates, which no split of splits()
  contains (the demo's `heldout_new` split): each family's space shuffled by `seed` and dealt
  round-robin, ids `synthetic_new/<family>/<index>`."""
  capacity = sum(len(space) for _, space in _NEW_TEMPLATE_TABLE.values())
  if not 0 <= count <= capacity:
    raise ValueError(f"the new templates have {capacity} distinct instances; asked for {count}")
  rng = random.Random(f"synthetic/new/{seed}")
  pools = {}
  for name, (_, space) in _NEW_TEMPLATE_TABLE.items():
    pools[name] = list(space)
    rng.shuffle(pools[name])
  order = []
  while len(order) < count:
    names = [n for n in NEW_FAMILIES if pools[n]]
    rng.shuffle(names)
    order += [(n, pools[n].pop()) for n in names]
  return [
    instance(seed, fam, params, f"synthetic_new/{fam}/{i}")
    for i, (fam, params) in enumerate(order[:count])
  ]


def write_splits(out_dir: str, seed: int, warmup: int, train: int, heldout: int) -> dict[str, str]:
  """splits() as OUT_DIR/<split>.jsonl (written atomically); returns split -> path."""
  paths = {}
  for name, problems in splits(seed, warmup, train, heldout).items():
    paths[name] = f"{out_dir}/{name}.jsonl"
    write_jsonl_atomic(paths[name], problems)
  return paths
