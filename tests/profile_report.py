"""Where the suite's time goes: `SPECJAX_TEST_PROFILE=DIR make test`, then
`python tests/profile_report.py DIR [N]` prints per module the tests' wall seconds, JAX's
trace, lowering and XLA compile seconds and the number of compiles, then the N slowest
tests (default 20). A test with hundreds of compiles runs code op by op outside `jax.jit`."""

import collections
import glob
import json
import os
import sys

_COLUMNS = (("wall", "wall"), ("compile", "backend_compile_duration"),
            ("lower", "jaxpr_to_mlir_module_duration"), ("trace", "jaxpr_trace_duration"))
_COUNT = "n_backend_compile_duration"


def main(folder: str, top: int = 20):
  rows = [r for f in sorted(glob.glob(os.path.join(folder, "*.json")))
          for r in json.load(open(f))]
  if not rows:
    raise SystemExit(f"No profile rows in {folder!r}: run the suite with "
                     "SPECJAX_TEST_PROFILE set to it first.")
  per = collections.defaultdict(collections.Counter)
  for r in rows:
    c = per[r["test"].split("::")[0]]
    for name, key in _COLUMNS:
      c[name] += r.get(key, 0.0)
    c["compiles"] += r.get(_COUNT, 0)
  head = "".join(f"{name:>9s}" for name, _ in _COLUMNS) + f"{'compiles':>10s}"
  print(f"{'module':40s}{head}")
  total = collections.Counter()
  for module, c in sorted(per.items(), key=lambda kv: -kv[1]["wall"]):
    total.update(c)
    print(f"{module:40s}" + "".join(f"{c[n]:9.1f}" for n, _ in _COLUMNS) +
          f"{int(c['compiles']):10d}")
  print(f"{'total':40s}" + "".join(f"{total[n]:9.1f}" for n, _ in _COLUMNS) +
        f"{int(total['compiles']):10d}\n")
  for r in sorted(rows, key=lambda r: -r["wall"])[:top]:
    print(f"{r['wall']:7.1f} s  {r.get(_COUNT, 0):5d} compiles  {r['test']}")


if __name__ == "__main__":
  main(sys.argv[1], *(int(x) for x in sys.argv[2:3]))
