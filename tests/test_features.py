"""Target features reach drafters: a drafter that declares two target layers gets exactly
the hidden states a full forward computes, for the prompt (init) and after every step
(commit), in a ragged batch."""

import flax.struct
import jax
import numpy as np
import pytest

from specjax import decode, models
from specjax.drafters import PromptLookup
from specjax.models import FINAL

from test_engine import PROMPTS, TARGET

FEATURES = (1, FINAL)  # the input of layer 1 and the final normed state


@flax.struct.dataclass
class Recorder:
  """Prompt lookup that records, on the host, every feature vector it is handed, keyed
  by (sequence, position of the token it belongs to)."""

  lookup: PromptLookup = PromptLookup(depth=4)
  features = FEATURES
  takes_stop_policy = False
  drafts_vary = True
  seen = {}  # (row, position) -> list of feature vectors; shared, cleared per test

  @property
  def num_nodes(self):
    return self.lookup.num_nodes

  def validate(self, target_config):
    self.lookup.validate(target_config)

  def init(self, ctx, max_len, features):
    def record(length_B, *feats):  # prompt tokens 0 .. length - 2 (the last is the root)
      for b, n in enumerate(np.asarray(length_B).tolist()):
        for pos in range(n - 1):
          self.seen[(b, pos)] = [np.asarray(f[b, pos]) for f in feats]
    jax.debug.callback(record, ctx.length, *features)
    return ()

  def propose(self, state, ctx, stop, sampling, key):
    return self.lookup.propose(state, ctx, stop, sampling, key)

  def commit(self, state, ctx, verdict, features):
    def record(length_B, path_BxN, accepted_B, *feats):  # the root, then accepted nodes
      for b, n in enumerate(np.asarray(length_B).tolist()):
        self.seen[(b, n - 1)] = [np.asarray(f[b, 0]) for f in feats]
        for k in range(int(accepted_B[b])):
          self.seen[(b, n + k)] = [np.asarray(f[b, 1 + int(path_BxN[b, k])]) for f in feats]
    jax.debug.callback(record, ctx.length, verdict.path, verdict.accepted_drafts, *features)
    return state


def test_drafter_gets_the_target_features_of_every_committed_token():
  Recorder.seen.clear()
  n_new = 20
  out = decode.generate(TARGET, PROMPTS, max_new_tokens=n_new, eos=None, drafter=Recorder())
  jax.effects_barrier()
  assert out.token_lists() == decode.generate(TARGET, PROMPTS, max_new_tokens=n_new,
                                              eos=None).token_lists()
  assert (np.asarray(out.stats.gained) > 1).any()  # some drafts were accepted
  for b, (prompt, new) in enumerate(zip(PROMPTS, out.token_lists())):
    seq = prompt + new
    want = models.causal_forward(TARGET.config, TARGET.params, np.asarray([seq]),
                                 features=FEATURES).features
    # Every token but the last committed one went through a target forward.
    for pos in range(len(seq) - 1):
      got = Recorder.seen[(b, pos)]
      for f, w in zip(got, want):
        np.testing.assert_allclose(f, np.asarray(w[0, pos]), atol=1e-5, rtol=1e-5)


def test_features_are_checked_against_the_target():
  bad = Recorder()
  with pytest.raises(ValueError, match=r"Feature indices \[1\] do not exist in a 1-layer"):
    decode.generate(TARGET.truncated(1), PROMPTS, max_new_tokens=4, drafter=bad)


def test_embed_and_lm_head_reproduce_the_forward():
  tokens = np.asarray([PROMPTS[0]])
  out = models.causal_forward(TARGET.config, TARGET.params, tokens, features=(0, FINAL))
  np.testing.assert_allclose(models.embed(TARGET.config, TARGET.params, tokens), out.features[0],
                             atol=1e-6)
  np.testing.assert_allclose(models.lm_head(TARGET.config, TARGET.params, out.features[1]),
                             out.logits, atol=1e-4)
