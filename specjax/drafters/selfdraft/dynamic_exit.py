"""DEL (Zarch et al., 2025): self-speculation from an early exit whose layer and draft
length are chosen while decoding.

The draft is the target's first l layers and its final norm and LM head (`models.skip`:
the layers above l are skipped under `lax.cond`, so a draft forward costs about l / L of
the target's). Every verification hands the drafter the target's states at the candidate
exit layers (declared features): the LM head over them gives the *shadow tokens*, what
each exit would have predicted at the step's root, and a running acceptance rate a_l per
layer counts how often the shadow token is the target's next token (an exponential
average, `decay`, so it follows the context). Each step drafts from the (l, d) with the
most tokens per layer,

  TPL(l, d) = (1 + a_l + ... + a_l^d) / (d * l + L),

d = 0 (an AR step, TPL = 1 / L) included, so a context where no exit predicts well stops
drafting. Drafting also stops early when the draft's top-1 probability falls under
`threshold` (0: off). Drafts are deterministic picks: lossless, greedy and sampled.

Departures: shadow tokens are read at the root only (one position per step, to keep the
LM head's cost small on a CPU; the paper reads every position of the round), the candidate
exit layers are a subset (`exit_layers`), and one exit layer serves the whole batch (each
sequence stops on its own). The paper evaluates LayerSkip models trained for early exit;
a model that is not (SmolLM2) accepts little from its early layers.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from specjax import registry
from specjax.models import skip as skip_lib
from specjax.models.config import ModelConfig
from specjax.models.model import Model, causal
from specjax.tree import DraftTree


@flax.struct.dataclass
class ExitState:
  matches: jax.Array  # float32[E]: decayed count of shadow tokens that were right
  seen: jax.Array  # float32[]: decayed count of steps
  tokens: jax.Array  # int32[B, D]: the last draft (its first token is what a root's
  # shadow tokens are checked against when it was accepted)


@flax.struct.dataclass
class DynamicExit:
  params: Any
  config: ModelConfig = flax.struct.field(pytree_node=False)
  exit_layers: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
  depth: int = flax.struct.field(pytree_node=False, default=6)
  threshold: float = flax.struct.field(pytree_node=False, default=0.0)
  decay: float = flax.struct.field(pytree_node=False, default=0.9)
  takes_stop_policy = False
  drafts_vary = True
  features = property(lambda self: self.exit_layers)

  @property
  def num_nodes(self) -> int:
    return self.depth

  def validate(self, target_config: ModelConfig) -> None:
    skip_lib.check(target_config, "DEL")
    l = target_config.num_layers
    if l != self.config.num_layers or target_config.vocab_size != self.config.vocab_size:
      raise ValueError("This DEL drafter was made for another target.")
    if not self.exit_layers or any(not 1 <= e < l for e in self.exit_layers):
      raise ValueError(f"DEL's exit layers must be in [1, {l}) (layers run before the "
                       f"exit); got {self.exit_layers}.")
    if self.depth < 1 or not 0 < self.decay < 1 or not 0 <= self.threshold <= 1:
      raise ValueError(f"DEL needs depth >= 1, 0 < decay < 1 and 0 <= threshold <= 1; got "
                       f"{self.depth}, {self.decay}, {self.threshold}.")

  def init(self, ctx, max_len, features) -> ExitState:
    b = ctx.history.shape[0]
    e = len(self.exit_layers)
    return ExitState(jnp.zeros(e), jnp.zeros(()), jnp.zeros((b, self.depth), jnp.int32))

  def acceptance(self, state: ExitState) -> jax.Array:
    """float32[E]: each exit layer's running acceptance rate (0 before any step)."""
    return state.matches / jnp.maximum(state.seen, 1e-9)

  def choose(self, alpha_E) -> tuple[jax.Array, jax.Array]:
    """(exit layer, draft length) with the most tokens per layer; length 0 = AR."""
    d = jnp.arange(self.depth + 1)
    powers_ExD = alpha_E[:, None] ** jnp.arange(self.depth + 1)[None]
    tokens_ExD = jnp.cumsum(powers_ExD, -1)  # 1 + a + ... + a^d
    layers = jnp.asarray(self.exit_layers, jnp.float32)
    tpl_ExD = tokens_ExD / (d[None] * layers[:, None] + self.config.num_layers)
    best = jnp.argmax(tpl_ExD.reshape(-1))
    return jnp.asarray(self.exit_layers)[best // (self.depth + 1)], best % (self.depth + 1)

  def propose(self, state: ExitState, ctx, stop, sampling, key):
    b, l = ctx.history.shape[0], self.config.num_layers
    layer, length = self.choose(self.acceptance(state))
    mask = skip_lib.exit_after(l, layer)
    root_B = ctx.history[jnp.arange(b), ctx.length - 1]

    def cond(c):
      return (c[0] < length) & c[4].any()

    def body(c):
      i, cache, token_B, tokens_BxD, alive_B, calls_B = c
      out = skip_lib.forward_skipping(
          self.config, self.params, token_B[:, None], (ctx.length - 1 + i)[:, None],
          causal(1), cache.replace(lengths=ctx.cache.lengths + i), mask)
      probs = jax.nn.softmax(out.logits[:, 0], -1)
      top_B = jnp.argmax(probs, -1).astype(jnp.int32)
      calls_B = calls_B + alive_B
      alive_B = alive_B & (jnp.max(probs, -1) >= self.threshold)
      tokens_BxD = tokens_BxD.at[:, i].set(jnp.where(alive_B, top_B, -1))
      return i + 1, out.cache, top_B, tokens_BxD, alive_B, calls_B

    init = (jnp.int32(0), ctx.cache, root_B, jnp.full((b, self.depth), -1, jnp.int32),
            jnp.ones((b,), bool), jnp.zeros((b,), jnp.int32))
    _, _, _, tokens_BxD, _, calls_B = jax.lax.while_loop(cond, body, init)
    valid = tokens_BxD >= 0
    tree = DraftTree.chain(jnp.maximum(tokens_BxD, 0), valid)
    return tree, state.replace(tokens=jnp.maximum(tokens_BxD, 0)), calls_B

  def commit(self, state: ExitState, ctx, verdict, features) -> ExitState:
    """Shadow tokens at the root, against the target's token after it."""
    h_BxExH = jnp.stack([f[:, 0] for f in features], 1)
    shadow_BxE = jnp.argmax(skip_lib.exit_logits(self.config, self.params, h_BxExH), -1)
    after_B = jnp.where(verdict.accepted_drafts > 0, state.tokens[:, 0], verdict.next_token)
    hit_E = jnp.mean((shadow_BxE == after_B[:, None]).astype(jnp.float32), 0)
    return state.replace(matches=self.decay * state.matches + (1 - self.decay) * hit_E,
                         seen=self.decay * state.seen + (1 - self.decay))


def default_exits(num_layers: int, every: int = 4) -> tuple[int, ...]:
  """Every `every`-th layer below the last, from `every` (2 layers for a tiny model)."""
  return tuple(range(min(every, num_layers - 1), num_layers, every)) or (1,)


@registry.DRAFTERS.register("del", takes_stop_policy=False)
def _build(target: Model, *, exit_layers: Sequence[int] | None = None, depth: int = 6,
           threshold: float = 0.0, decay: float = 0.9) -> DynamicExit:
  """DEL: early-exit self-drafting, exit layer and length chosen from shadow tokens."""
  skip_lib.check(target.config, "DEL")
  exits = tuple(exit_layers) if exit_layers is not None else default_exits(
      target.config.num_layers)
  return DynamicExit(target.params, target.config, tuple(int(e) for e in exits), depth,
                     threshold, decay)
