"""An independent draft LM for SmolLM2-135M, FastDraft's two stages (and the Direct
Alignment paper's): pretrain on text, then align to the target on its own answers.

  specjax-train --config configs/fastdraft.py:pretrain --workdir workdir/fastdraft_pt
  specjax-train --config configs/fastdraft.py:align --workdir workdir/fastdraft
  specjax-train --config configs/fastdraft.py:pretrain_tiny --workdir /tmp/fd_pt  # smoke
  specjax-train --config configs/fastdraft.py:align_tiny --workdir /tmp/fd \\
      --config.init_from=/tmp/fd_pt/head

The draft: 4 Llama layers of width 256 (4 heads, 2 KV heads, MLP 768) with a tied
embedding over SmolLM2's 49,152 tokens (about 14M params, 10% of the target; FastDraft's
drafts are 50-150M for 4-8B targets). Pretraining: next-token cross-entropy on 12,000
chunks of the Python standard library's source (the only text every machine has),
without running the target. Alignment: starts from the pretrained head
(`init_from`) and distils the target's distribution on its self-distilled answers with
TVD++ (`loss`), the Direct Alignment paper's loss. It decodes as the `draft_lm` drafter
(a `DraftModel`: own KV cache, chains or static trees).
"""

from specjax.configs import train_common


def get_config(arg: str | None = None):
  stage, _, tiny = (arg or "").partition("_")
  if stage not in ("pretrain", "align") or tiny not in ("", "tiny"):
    raise ValueError(f"Unknown argument {arg!r}: use pretrain, align, pretrain_tiny or "
                     "align_tiny.")
  c = train_common.base()
  c.head = "draft_lm"
  c.head_kwargs.stage = stage
  c.head_kwargs.num_layers = 4
  c.head_kwargs.hidden_size = 256
  c.head_kwargs.intermediate_size = 768
  c.head_kwargs.num_heads = 4
  c.head_kwargs.num_kv_heads = 2
  c.decode.depth = 4
  c.decode.top_k = 1
  c.sim_depth = 4
  c.batch_size = 8
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.eval_every = 200
  c.checkpoint_every = 50
  if stage == "pretrain":
    c.data.source = "stdlib:12000:1500"
    c.data.seq_len = 256
    c.steps = 1500
  else:
    c.loss = "tvdpp"
    c.init_from = "workdir/fastdraft_pt/head"
    c.steps = 400
    c.eval_every = 100
    c.keep_best = True
  if tiny:
    c = train_common.tiny(c)
    c.head_kwargs.num_layers = 1
    c.head_kwargs.hidden_size = 32
    c.head_kwargs.intermediate_size = 64
    c.decode.depth = 3
    c.init_from = ""  # the tests chain the two stages themselves
    c.keep_best = False
    c.optim.lr = 1e-2
  return c
