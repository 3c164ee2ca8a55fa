"""State-space targets (Mamba-2, and Bamba: attention + Mamba-2 layers): parity with
transformers on tiny random checkpoints it writes (past a prefill chunk, and a cached step),
AR decoding with the recurrent state equal to transformers' greedy generate, the tree
(STree) forward of a Mamba-2 layer equal to running each root-to-node path in turn, and
greedy speculative decoding with chain and tree drafts equal to AR."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from specjax import decode, models, registry
from specjax.drafters import DraftModel
from specjax.evaluation import bench
from specjax.models import model as model_lib
from specjax.models import ssm
from specjax.tree import ancestor_mask

VOCAB = 96
MAMBA = dict(num_heads=4, head_dim=16, expand=2, state_size=8, n_groups=2, conv_kernel=4,
             chunk_size=16)
CONFIGS = {
    "mamba2": lambda: transformers.Mamba2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, tie_word_embeddings=False,
        initializer_range=0.2, **MAMBA),
    # Attention at layers 0 and 2 (RoPE on half of each head), Mamba-2 mixers at 1 and 3.
    "bamba": lambda: transformers.BambaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[0, 2],
        mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4,
        mamba_chunk_size=16, max_position_embeddings=512, initializer_range=0.2,
        tie_word_embeddings=False),
}


def _saved(name, path):
  torch.manual_seed(0)
  cfg = CONFIGS[name]()
  cfg._attn_implementation = "eager"  # pylint: disable=protected-access
  hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
  with torch.no_grad():  # norms, decays, steps and skips off their inits: a mix-up shows
    for pname, p in hf.named_parameters():
      if "norm" in pname or pname.rsplit(".", 1)[-1] in ("A_log", "dt_bias", "D"):
        p.add_(0.3 * torch.randn_like(p))
  hf.save_pretrained(str(path), safe_serialization=True)
  return hf


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  """{name: (the transformers model, ours)} for every config, written and read once."""
  out = {}
  for name in CONFIGS:
    path = tmp_path_factory.mktemp(name)
    out[name] = (_saved(name, path), models.load(str(path)))
  return out


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, loaded):
  return (request.param,) + loaded[request.param]


def test_logits_match_transformers_past_a_prefill_chunk(pair):
  name, hf, model = pair
  cfg = model.config
  assert cfg.arch == "hybrid"
  assert cfg.ssm_layers == ((0, 1) if name == "mamba2" else (1, 3))
  assert (cfg.rotary_dim, cfg.intermediate_size) == ((None, 0) if name == "mamba2" else (4, 48))
  n = model_lib.PREFILL_CHUNK + 20  # two prefill chunks
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, n + 1))
  with torch.no_grad():
    want = hf(torch.as_tensor(tokens)).logits.numpy()
  assert want.std() > 0.3
  full = np.abs(np.asarray(model.logits(tokens)) - want).max()
  # Prefill n tokens in chunks (row 1 only n - 30: its state stops at its own length),
  # then one cached step from each row's length.
  lens = np.array([n, n - 30])
  cache = model.init_cache(2, 128)
  cache, _ = models.prefill(cfg, model.params, cache, jnp.asarray(tokens[:, :n]),
                            jnp.asarray(lens))
  nxt = tokens[np.arange(2), lens][:, None]
  step = models.forward(cfg, model.params, jnp.asarray(nxt), jnp.asarray(lens)[:, None],
                        models.causal(1), cache)
  with torch.no_grad():
    short = hf(torch.as_tensor(tokens[1:, :n - 29])).logits.numpy()[0, -1]
  cached = max(np.abs(np.asarray(step.logits[0, 0]) - want[0, n]).max(),
               np.abs(np.asarray(step.logits[1, 0]) - short).max())
  print(f"\n{name}: max |logits diff| {full:.2e}, cached step {cached:.2e}")
  assert full <= 1e-3 and cached <= 1e-3


PROMPTS = [list(np.random.default_rng(i).integers(0, VOCAB, n))
           for i, n in enumerate((5, model_lib.PREFILL_CHUNK + 6, 1, 12))]
NEW = 12  # new tokens per prompt: every decode of this file shares its compiled shapes


@pytest.fixture(scope="module")
def ar(loaded):
  """{name: AR `decode.Output` of PROMPTS}."""
  return {name: decode.generate(model, PROMPTS, max_new_tokens=NEW, eos=None)
          for name, (_, model) in loaded.items()}


def test_ar_decoding_equals_transformers_greedy_generate(pair, ar):
  name, hf, _ = pair
  for prompt, got in zip(PROMPTS, ar[name].token_lists()):
    with torch.no_grad():
      out = hf.generate(torch.as_tensor([prompt]), max_new_tokens=NEW, do_sample=False,
                        min_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    assert got == out[0, len(prompt):].tolist()


# --- the tree forward of one Mamba-2 layer ---------------------------------------------

LAYER = models.ModelConfig(arch="hybrid", vocab_size=8, hidden_size=16, intermediate_size=0,
                           num_layers=1, num_heads=1, num_kv_heads=1, head_dim=16,
                           ssm_layers=(0,), ssm_heads=4, ssm_head_dim=8, ssm_groups=2,
                           ssm_state=4, ssm_conv=4)
# Row 0: a tree 6 deep (deeper than the conv), with branches at the root and below;
# row 1: a chain. Parents first.
PARENTS = np.array([[-1, 0, 0, 1, 1, 2, 3, 6, 7, 4],
                    [-1, 0, 1, 2, 3, 4, 5, 6, 7, 8]])


def _layer():
  mixer = ssm.Mamba2Mixer(LAYER, jnp.float32)
  params = mixer.init(jax.random.key(0), jnp.zeros((1, 1, 16)), models.causal(1),
                      ssm.init_state(LAYER, 1, jnp.float32))["params"]
  keys = iter(jax.random.split(jax.random.key(1), 8))
  for name, scale in (("A_log", 0.5), ("dt_bias", 0.5), ("D", 0.5), ("conv_bias", 0.3)):
    params[name] = params[name] + scale * jax.random.normal(next(keys), params[name].shape)
  return jax.jit(lambda x, mask, state: mixer.apply({"params": params}, x, mask, state))


def test_tree_forward_equals_each_path_run_in_turn():
  """One forward over a tree == every root-to-node path run a token at a time (outputs
  and, after `commit`, the recurrent and conv state), from a committed state of 5 tokens."""
  run = _layer()
  rng = np.random.default_rng(0)
  b, t = PARENTS.shape
  state = ssm.init_state(LAYER, b, jnp.float32)
  _, state = run(jnp.asarray(rng.normal(size=(b, 5, 16)), jnp.float32), models.causal(5), state)
  state = ssm.advance(state, jnp.full((b,), 5))
  assert float(jnp.abs(state.h_BxHxPxN).max(axis=(1, 2, 3)).min()) > 1e-2  # not zero
  x = jnp.asarray(rng.normal(size=(b, t, 16)), jnp.float32)
  mask = ancestor_mask(jnp.asarray(PARENTS))
  y_tree, pending = run(x, mask, state)
  one = lambda s, i: jax.tree.map(lambda a: a[i:i + 1], s)

  @jax.jit
  def token(x_1x1xD, s):  # one token through the layer, its state committed
    y, s = run(x_1x1xD, models.causal(1), s)
    return y, ssm.advance(s, jnp.ones((1,), jnp.int32))

  commit = jax.jit(ssm.commit)
  for row in range(b):
    for node in range(t):
      path = [int(j) for j in np.nonzero(np.asarray(mask[row, node]))[0]]  # root first
      s = one(state, row)
      for j in path:
        y, s = token(x[row:row + 1, j:j + 1], s)
      np.testing.assert_allclose(y[0, 0], y_tree[row, node], atol=1e-5, rtol=1e-5)
      padded = jnp.asarray([path + [0] * (t - len(path))] * b)
      kept = one(commit(pending, padded, jnp.full((b,), len(path))), row)
      np.testing.assert_allclose(kept.h_BxHxPxN, s.h_BxHxPxN, atol=1e-5, rtol=1e-5)
      np.testing.assert_allclose(kept.conv_BxKxC, s.conv_BxKxC, atol=1e-6)
  # Nothing accepted (n = 0): the committed state stays.
  same = ssm.commit(pending, jnp.zeros((b, t), jnp.int32), jnp.zeros((b,), jnp.int32))
  np.testing.assert_array_equal(same.h_BxHxPxN, state.h_BxHxPxN)
  assert same.pending is None


# --- speculative decoding on the hybrid target --------------------------------------------

CHAIN = dict(depth=6)
# 6 nodes as the chain: two candidates for the first token, a chain of 4 under the first.
TREE = dict(tree=[[0], [1], [0, 0], [0, 0, 0], [0, 0, 0, 0], [1, 0]])


@pytest.fixture(scope="module")
def bamba(loaded):
  return loaded["bamba"][1]


@pytest.mark.parametrize("shape,stop", [(CHAIN, None), (TREE, None), (TREE, "confidence")],
                         ids=["chain", "tree", "tree-cut"])
def test_greedy_speculation_equals_ar_on_the_hybrid_target(bamba, ar, shape, stop):
  """A draft of the target's first layer (attention only) proposing a chain or a tree;
  the target verifies it in one forward through its Mamba-2 layers' tree form. With a
  stop policy, drafts are cut and verified at narrower widths (`decode.verify_widths`:
  a switch whose branches' pending states are padded to one shape)."""
  want = ar["bamba"]
  drafter = DraftModel.truncated(bamba, 1, **shape)
  out = decode.generate(bamba, PROMPTS, max_new_tokens=NEW, eos=None, drafter=drafter,
                        stop=stop)
  assert out.token_lists() == want.token_lists()
  calls = int(out.stats.target_calls.sum())
  assert calls < int(want.stats.target_calls.sum())  # drafts were accepted
  full = calls * (1 + drafter.num_nodes)
  assert (int(out.stats.verified.sum()) < full) == (stop is not None)


def test_stree_accepts_more_than_a_chain_of_the_same_nodes(bamba):
  """STree's point: at one node budget, a tree verified through the state-space layers
  accepts more tokens per target call than a chain (measured and printed; the tree's edge
  is asserted: 1.64 vs 1.44 here). 6 batches of PROMPTS' shape: the programs above, reused."""
  batches = [[list(np.random.default_rng(100 + 4 * k + i).integers(0, VOCAB, 16))
              for i in range(len(PROMPTS))] for k in range(6)]
  taus = bench.stree_tau(bench.damped(bamba, 0.3), {"chain": CHAIN, "tree": TREE},
                         batches, NEW)
  print(f"\nbamba, 6 nodes: tau chain {taus['chain'][1]:.3f}, tree {taus['tree'][1]:.3f}")
  assert taus["chain"][0] == taus["tree"][0] == 6
  assert taus["tree"][1] > taus["chain"][1] > 1.2


def test_drafters_a_state_space_target_cannot_serve_are_refused(bamba):
  with pytest.raises(ValueError, match="built for Llama-family targets"):
    registry.DRAFTERS.build("partial_kv", bamba, depth=2).validate(bamba.config)
  # A truncation through a Mamba-2 layer would draft its tree into its own cache.
  with pytest.raises(ValueError, match="cannot also see uncommitted entries"):
    decode.generate(bamba, PROMPTS[:1], max_new_tokens=4, eos=None,
                    drafter=DraftModel.truncated(bamba, 2, depth=2))
  with pytest.raises(ValueError, match="Llama-family"):
    bamba.quantized(8)
