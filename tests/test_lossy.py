"""The LOSSY acceptance rules beyond typical and FSD (EASD, Judge, Arbitrage): their
knobs, their refusal at temperature 0 where they would silently be greedy, and what each
changes relative to the lossless rule on the same draft."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import decode, registry, sampling as sampling_lib, verify
from specjax.tree import DraftTree, parents_from_choices

V = 8


def bigram_chain(n=4_000, depth=3, seed=0):
  """n chains of `depth` draft tokens sampled from a draft bigram table, and the target's
  logits at the root and each node (a flat target: entropies near log V)."""
  kp, kq, kd = jax.random.split(jax.random.key(seed), 3)
  logits_p = 0.5 * jax.random.normal(kp, (V, V))
  logits_q = logits_p + 0.2 * jax.random.normal(kq, (V, V))
  q = jax.nn.softmax(logits_q, -1)
  toks, cur = [], jnp.full((n,), 2)
  for k in jax.random.split(kd, depth):
    cur = jax.random.categorical(k, jnp.log(q[cur]))
    toks.append(cur)
  tokens = jnp.stack(toks, 1).astype(jnp.int32)
  nodes = jnp.concatenate([jnp.full((n, 1), 2), tokens], 1)
  probs = q[nodes[:, :-1]]  # node i was drawn from q at its parent
  tree = DraftTree.chain(tokens, jnp.ones(tokens.shape, bool), probs, sampled=True)
  return tree, logits_p[nodes]


def test_easd_penalises_only_where_both_models_are_unsure():
  tree, logits = bigram_chain()
  s = sampling_lib.Sampling.create(1.0)
  key = jax.random.key(1)
  spec = verify.verify(verify.get("speculative"), tree, logits, s, key)
  # Thresholds no distribution reaches: exactly the speculative verdict.
  calm = verify.verify(verify.get("easd", entropy=1e9), tree, logits, s, key)
  for a, b in zip(spec[:3], calm[:3]):
    np.testing.assert_array_equal(a, b)
  # Every step unsure (entropy 0, any overlap): nothing is accepted, and where the standard
  # rule would have kept the first token the target draws again without it.
  harsh = verify.verify(verify.get("easd", entropy=0.0, overlap=0.0), tree, logits, s, key)
  assert int(np.asarray(harsh.accepted_drafts).max()) == 0
  kept = np.asarray(spec.accepted_drafts) > 0
  first = np.asarray(tree.tokens[:, 0])
  assert kept.mean() > 0.3
  assert not (np.asarray(harsh.next_token)[kept] == first[kept]).any()
  # An entropy threshold at the target's median: some steps penalised, not all.
  median = float(np.median(np.asarray(sampling_lib.entropy(jax.nn.softmax(logits, -1)))))
  mid = verify.verify(verify.get("easd", entropy=median, overlap=0.0), tree, logits, s, key)
  accepted = lambda v: float(np.asarray(v.accepted_drafts).mean())
  assert accepted(harsh) < accepted(mid) < accepted(spec)


@pytest.mark.parametrize("rule", ["typical", "fuzzy", "easd"])
def test_lossy_rules_reading_distributions_are_refused_at_temperature_0(rule):
  assert not verify.get(rule).lossless
  assert registry.ACCEPTANCE.meta(rule)["sampled_only"]
  from specjax.drafters import PromptLookup
  with pytest.raises(ValueError, match=rf"acceptance='{rule}' is LOSSY .* silently be greedy"):
    decode.generate(None, [[1, 2]], max_new_tokens=2, eos=None, drafter=PromptLookup(),
                    acceptance=rule)


@pytest.mark.parametrize("knobs,match", [
    (dict(top_n=0), "top_n must be an integer >= 1"),
    (dict(overlap=1.5), r"overlap must be in \[0, 1\]"),
    (dict(entropy=-1.0), "entropy must be >= 0"),
    (dict(entorpy=1.0), r"unknown knobs \['entorpy'\]"),
])
def test_easd_knobs_are_checked_by_name(knobs, match):
  with pytest.raises(ValueError, match=match):
    verify.get("easd", **knobs)


# ------------------------------------------------------------------------------------------
# Quality: HumanEval execution and GSM8K answers.


def test_humaneval_runs_tests_in_a_sandbox_with_a_timeout():
  from specjax.evaluation import prompts, quality
  ref = prompts.load("humaneval", limit=1)[0].reference
  body = ("    return any(abs(a - b) < threshold for i, a in enumerate(numbers)"
          " for b in numbers[i + 1:])\n")
  score = lambda text, **kw: quality.task_score("humaneval", ref, text, **kw)
  assert score("```python\n" + ref["prompt"] + body + "```\nDone.") == 1.0  # a whole function
  assert score(body) == 1.0  # a body continuing the prompt
  assert score("def has_close_elements(numbers, threshold):\n    return False\n") == 0.0
  # Exiting with status 0 before the tests finish, crashing, looping past the timeout or
  # reaching for the network all score 0 and return normally.
  assert score("def has_close_elements(numbers, threshold):\n    raise SystemExit(0)\n") == 0
  assert score("def has_close_elements(numbers, threshold):\n    return 1 / 0\n") == 0.0
  assert score("def has_close_elements(numbers, threshold):\n    while True:\n      pass\n",
               timeout=2) == 0.0
  net = ("import socket\ndef has_close_elements(numbers, threshold):\n"
         "    socket.create_connection(('pypi.org', 443), timeout=2)\n" + body)
  assert score(net) == 0.0
  assert score(net.replace("    socket.create_connection(('pypi.org', 443), timeout=2)\n",
                           "")) == 1.0  # the same code without the call passes


@pytest.mark.parametrize("text,answer", [
    ("She earns 9 * 2 = $18 a day.", 18.0), ("#### 1,234", 1234.0),
    ("The answer is 72. (Not 80.)", 72.0), ("It costs -3.5 dollars.", -3.5),
    ("No number here.", None)])
def test_gsm8k_final_answer(text, answer):
  from specjax.evaluation import quality
  assert quality.gsm8k_answer(text) == answer
  assert quality.task_score("gsm8k", {"answer": 18.0}, text) == float(answer == 18.0)
