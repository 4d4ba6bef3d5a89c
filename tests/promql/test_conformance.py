"""Prometheus' PromQL conformance files against the collector's engine, with a ratchet.

Every file in ../shared/peer-tests/promqltest is run (tests/promql/promqltest.py does the work);
the pass count per file is printed (pytest -s) and written to a summary file, and the test fails
when a file passes fewer cases than tests/promql/conformance_baseline.json records.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from tests.promql import promqltest

FILES = promqltest.conformance_files()


@pytest.fixture(scope="module")
def summary_file():
    path = Path(tempfile.gettempdir()) / "shopfloor-promql-conformance.txt"
    path.write_text("")
    return path


@pytest.mark.skipif(not FILES, reason="missing ../shared/peer-tests/promqltest (Prometheus' test files)")
@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_conformance_file(path, summary_file):
    outcomes = promqltest.run_file(path)
    s = promqltest.summarize({path.name: outcomes})[path.name]
    line = (f"{path.name}: pass {s['pass']} / {s['total'] - s['native']} float cases "
            f"(native histograms, unsupported: {s['native']})")
    print(line)
    with summary_file.open("a") as f:
        f.write(line + "\n")
        for o in outcomes:
            if o.status == "fail":
                f.write(f"  FAIL {o.case.file}:{o.case.line}: {o.case.query} -- {o.reason[:200]}\n")
    baseline = json.loads(promqltest.BASELINE.read_text())
    assert path.name in baseline, f"{path.name} has no entry in {promqltest.BASELINE.name}: add one"
    fails = [f"{o.case.line}: {o.case.query} -- {o.reason[:160]}" for o in outcomes if o.status == "fail"]
    assert s["pass"] >= baseline[path.name], (
        f"{path.name}: {s['pass']} cases pass, the baseline says {baseline[path.name]}. Failing:\n"
        + "\n".join(fails))


def test_runner_judges_wrong_answers(tmp_path):
    """The runner itself must fail a case whose expected value or series set is wrong."""
    script = tmp_path / "self.test"
    script.write_text(
        "load 1m\n  m{a=\"1\"} 1+1x5\n  m{a=\"2\"} 10+10x5\n\n"
        "eval instant at 2m m\n  m{a=\"1\"} 3\n  m{a=\"2\"} 30\n\n"        # right
        "eval instant at 2m m\n  m{a=\"1\"} 3.1\n  m{a=\"2\"} 30\n\n"      # wrong value
        "eval instant at 2m m\n  m{a=\"1\"} 3\n\n"                        # missing series
        "eval range from 0 to 2m step 1m sum(m)\n  {} 11 22 33\n\n"       # right
        "eval range from 0 to 2m step 1m sum(m)\n  {} 11 _ 33\n\n"        # a point too many
        "eval instant at 2m m{\n  expect fail\n\n"                        # right (parse error)
        "eval instant at 2m m\n  expect fail\n\n"                         # wrong: no error
        "eval instant at 0 m\n  m{a=\"1\"} {{schema:0 sum:1 count:1}}\n"  # native: counted apart
    )
    got = [o.status for o in promqltest.run_file(script)]
    assert got == ["pass", "fail", "fail", "pass", "fail", "pass", "fail", "native"]
