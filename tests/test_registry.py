"""The registries: every registered part refuses a mistyped knob in `check`, naming it,
before anything loads; names resolve lazily, so `import specjax` loads no drafter, head
or kernel."""

import subprocess
import sys

import pytest

from specjax import registry

# What each kind of builder takes before its keyword knobs.
POSITIONAL = {"drafter": (None,), "stop policy": (), "acceptance rule": (),
              "draft head": (None,)}
REGISTRIES = (registry.DRAFTERS, registry.STOP_POLICIES, registry.ACCEPTANCE, registry.HEADS)
PARTS = [(r, name) for r in REGISTRIES for name in r.names()]


def test_every_built_in_part_is_registered():
  assert set(registry.DRAFTERS.names()) >= {
      "prompt_lookup", "self_draft", "draft_model", "eagle", "eagle3", "falcon", "hydra",
      "medusa", "dflash", "dspark"}
  assert set(registry.STOP_POLICIES.names()) == {"fixed", "confidence", "svip", "specdecpp",
                                                 "pacer"}
  assert set(registry.ACCEPTANCE.names()) == {"greedy", "speculative", "rsd", "typical", "fuzzy",
                                              "easd", "judge", "arbitrage"}
  assert set(registry.HEADS.names()) == {"dflash", "draft_lm", "dspark", "eagle", "eagle3",
                                        "falcon", "hydra", "longspec", "medusa", "ppd"}


@pytest.mark.parametrize("reg,name", PARTS, ids=[f"{r.kind}:{n}" for r, n in PARTS])
def test_a_mistyped_knob_is_refused_by_name(reg, name):
  args = POSITIONAL[reg.kind]
  knobs = reg.knobs(name)
  # A real knob misspelled (its letters swapped), or an invented one for parts without.
  typo = (knobs[0][1] + knobs[0][0] + knobs[0][2:]) if knobs else "depht"
  assert typo not in knobs
  with pytest.raises(ValueError, match=rf"{reg.kind} '{name}'.*unknown knobs \['{typo}'\]"):
    reg.check(name, *args, **{typo: 1})
  with pytest.raises(ValueError, match=rf"unknown knobs \['{typo}'\]"):
    reg.build(name, *args, **{typo: 1})  # refused before anything is built or loaded


def test_trained_heads_take_the_shared_draft_size_knobs():
  for kind in registry.HEADS.names():
    knobs = set(registry.DRAFTERS.knobs(kind))
    assert {"checkpoint", "budget", "depth", "top_k", "tree"} <= knobs, kind
  for name in ("prompt_lookup", "self_draft", "draft_model"):
    assert "depth" in registry.DRAFTERS.knobs(name)
    assert "num_draft" not in registry.DRAFTERS.knobs(name)


def test_check_binds_without_building():
  registry.DRAFTERS.check("eagle", None, checkpoint="/nowhere", depth=3)  # no folder read
  with pytest.raises(ValueError, match="Unknown drafter 'eagel'"):
    registry.DRAFTERS.check("eagel", None)


def test_import_specjax_loads_no_drafter_head_or_kernel():
  code = ("import sys, specjax; print(sorted(m for m in sys.modules if m.startswith("
          "('specjax.drafters.', 'specjax.kernels.tree_attention', 'specjax.stopping.learned',"
          " 'specjax.training', 'specjax.evaluation', 'jax.experimental.pallas'))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "['specjax.drafters.base']", out.stdout
