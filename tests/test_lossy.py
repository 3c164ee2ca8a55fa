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


# ------------------------------------------------------------------------------------------
# Judge Decoding and Arbitrage: the rules on a hand-made chain, then trained end to end.

H = 4


def chain_with_hidden(tokens, target_best, seed=0):
  """A sampled-free chain of draft `tokens` [B, N] whose target argmax at the root and
  every node is `target_best` [B, N + 1], with random final hidden states [B, N + 1, H]."""
  tokens = jnp.asarray(tokens, jnp.int32)
  logits = 5.0 * jax.nn.one_hot(jnp.asarray(target_best), V)
  hidden = jax.random.normal(jax.random.key(seed), logits.shape[:2] + (H,))
  return DraftTree.chain(tokens, jnp.ones(tokens.shape, bool)), logits, hidden


def test_judge_accepts_where_it_clears_its_threshold_or_the_target_agrees():
  # The target agrees with node 0 only; the judge likes exactly the nodes whose hidden
  # state has a positive first coordinate.
  tree, logits, hidden = chain_with_hidden([[1, 2, 3]], [[1, 5, 5, 5]])
  hidden = hidden.at[0, 1:, 0].set(jnp.asarray([-1.0, 1.0, -1.0]))  # nodes 0, 1, 2
  judge = verify.Judge((10.0, 0.0, 0.0, 0.0), 0.0)
  greedy = sampling_lib.Sampling.create(0.0)
  v = verify.verify(judge, tree, logits, greedy, jax.random.key(0), hidden)
  # node 0 by the target, node 1 by the judge, node 2 by neither: the target's token 5
  assert int(v.accepted_drafts[0]) == 2 and int(v.next_token[0]) == 5
  strict = verify.Judge(judge.weights, judge.bias, threshold=1.0)  # never fires
  v = verify.verify(strict, tree, logits, greedy, jax.random.key(0), hidden)
  assert int(v.accepted_drafts[0]) == 1
  with pytest.raises(ValueError, match="threshold is a probability"):
    verify.Judge(judge.weights, 0.0, threshold=2.0)
  from specjax.models import ModelConfig
  with pytest.raises(ValueError, match="hidden states of size 4; this target's are 32"):
    judge.validate(ModelConfig(arch="llama", vocab_size=V, hidden_size=32,
                               intermediate_size=64, num_layers=1, num_heads=4,
                               num_kv_heads=2, head_dim=8))


def test_arbitrage_accepts_whole_steps_unless_the_router_escalates():
  # Token 7 ends a step. The target agrees with nothing.
  tree, logits, hidden = chain_with_hidden([[1, 7, 2, 3], [1, 2, 3, 4]], [[6] * 5, [6] * 5])
  greedy = sampling_lib.Sampling.create(0.0)
  router = lambda bias: verify.Arbitrage((0.0,) * (H + 3), bias, boundary=(7,))
  kept = verify.verify(router(-10.0), tree, logits, greedy, jax.random.key(0), hidden)
  # row 0: the step is [1, 7] (through the boundary); row 1: the whole chain
  np.testing.assert_array_equal(kept.accepted_drafts, [2, 4])
  np.testing.assert_array_equal(kept.next_token, [6, 6])
  escalated = verify.verify(router(10.0), tree, logits, greedy, jax.random.key(0), hidden)
  np.testing.assert_array_equal(escalated.accepted_drafts, [0, 0])  # the target's own tokens
  # The router reads the step's tokens only: the mean hidden state over [1, 7] for row 0.
  x = verify.step_features(hidden[:, 1:], jnp.zeros((2, 4)),
                           jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 1]], bool), 4)
  np.testing.assert_allclose(x[0, :H], hidden[0, 1:3].mean(0), rtol=1e-5)
  np.testing.assert_allclose(x[:, -1], [0.5, 1.0])


@pytest.fixture(scope="module")
def trained_rules(tmp_path_factory):
  """A judge and a router trained on tiny-random (its self-generated rows), seconds each."""
  from conftest import shared_run
  from specjax.configs import arbitrage as arbitrage_config, judge as judge_config
  from specjax.training import arbitrage as arbitrage_training, judge as judge_training
  judge_dir = shared_run("judge_tiny", lambda w: judge_training.train(
      judge_config.get_config("tiny=1"), w))
  router_dir = shared_run("arbitrage_tiny", lambda w: arbitrage_training.train(
      arbitrage_config.get_config("tiny=1"), w))
  return judge_dir, router_dir


def test_trained_judge_and_router_decode_through_generate(trained_rules):
  import json, os
  from specjax import models
  from specjax.drafters import DraftModel
  judge_dir, router_dir = trained_rules
  for folder, name in ((judge_dir, "judge"), (router_dir, "router")):
    with open(os.path.join(folder, "metrics.json")) as f:
      m = json.load(f)
    assert m["eval"]["0.5"]["precision"] >= 0 and 0 <= m["eval"]["0.5"]["recall"] <= 1
    assert os.path.exists(os.path.join(folder, name))
  target = models.load("tiny-random")
  draft = DraftModel.truncated(target, 1, depth=3)
  prompts = [[5, 9, 2, 7], [3, 3]]
  kw = dict(max_new_tokens=12, eos=None, drafter=draft)
  ar = decode.generate(target, prompts, max_new_tokens=12, eos=None).token_lists()
  # (rule, checkpoint, the threshold where it is lossless, where it keeps every draft)
  cases = (("judge", os.path.join(judge_dir, "judge"), 1.0, 0.0),  # never / always fires
           ("arbitrage", os.path.join(router_dir, "router"), 0.0, 1.0))  # always / never
  for name, folder, honest, eager in cases:  # escalates to the target
    rule = verify.get(name, checkpoint=folder, threshold=honest)
    assert not rule.lossless
    assert decode.generate(target, prompts, acceptance=rule, **kw).token_lists() == ar
    out = decode.generate(target, prompts, acceptance=verify.get(
        name, checkpoint=folder, threshold=eager), **kw)
    assert float(np.mean(out.tau)) > 3.5  # every draft kept: tau = depth + 1 (no boundary)
  with pytest.raises(FileNotFoundError, match="train one with"):
    verify.get("judge", checkpoint="/nonexistent")
