"""tests/profile_report.py sums the per-test profile rows by module and names the slowest."""

import json

import pytest

import profile_report


def test_sums_by_module_and_lists_the_slowest(tmp_path, capsys):
  rows = [{"test": "tests/test_a.py::x", "wall": 3.0, "backend_compile_duration": 1.0,
           "n_backend_compile_duration": 4},
          {"test": "tests/test_a.py::y", "wall": 5.0, "backend_compile_duration": 2.0,
           "n_backend_compile_duration": 1},
          {"test": "tests/test_b.py::z", "wall": 1.0}]
  (tmp_path / "gw0.json").write_text(json.dumps(rows[:2]))
  (tmp_path / "gw1.json").write_text(json.dumps(rows[2:]))
  profile_report.main(str(tmp_path), top=1)
  out = capsys.readouterr().out.splitlines()
  a = next(line for line in out if line.startswith("tests/test_a.py"))
  assert a.split()[1:3] == ["8.0", "3.0"] and a.split()[-1] == "5"
  assert out.index(a) < out.index(next(l for l in out if l.startswith("tests/test_b.py")))
  assert out[-1].split()[0] == "5.0" and out[-1].endswith("tests/test_a.py::y")
  with pytest.raises(SystemExit, match="No profile rows"):
    profile_report.main(str(tmp_path / "empty"))
