"""The drafter interface the decode loop calls; every drafter is a pytree.

A drafter is a `flax.struct.dataclass`: static settings are `pytree_node=False` fields and
weights live in pytree fields, so a drafter passes through `jax.jit` as an argument. It
implements

  num_nodes: int                                  static tree size N
  validate(target_config) -> None                 clear errors before anything compiles
  init(ctx, max_len, prompt_width) -> state       after the target's prefill
  propose(state, ctx, stop, sampling, key) -> (DraftTree, state, draft_calls[B])
  commit(state, ctx, verdict, target_hidden_BxTxH) -> state

`ctx` is the committed token history. `commit` sees the context *before* the step's
tokens were appended, the verdict (accepted path + next token) and the target's hidden
states for [root, node_0, ...], which feature-level drafters (EAGLE, Medusa) consume.
"""

from __future__ import annotations

from typing import Any, Protocol

import flax.struct
import jax

from specjax.tree import DraftTree


@flax.struct.dataclass
class Context:
  history: jax.Array  # int32[B, L]: prompt + generated tokens, left-aligned
  length: jax.Array  # int32[B]: tokens in history; the last one is the tree's root


class Drafter(Protocol):
  num_nodes: int

  def validate(self, target_config) -> None:
    ...

  def init(self, ctx: Context, max_len: int, prompt_width: int) -> Any:
    ...

  def propose(self, state, ctx: Context, stop, sampling, key) -> tuple[DraftTree, Any, jax.Array]:
    ...

  def commit(self, state, ctx: Context, verdict, target_hidden_BxTxH) -> Any:
    ...
