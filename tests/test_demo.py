"""A shortened `make demo` (every stage, a few steps each) from the shipped base model, so CI keeps it working."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

BASE = os.path.join(ROOT, "demo", "base_model")


@pytest.mark.skipif(not os.path.exists(os.path.join(BASE, "config.json")), reason="no shipped base model")
def test_quick_demo_runs_every_stage_and_reuses_them(tmp_path):
    cmd = [sys.executable, "-m", "demo.run", "--quick", "--out", str(tmp_path)]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("data", "distill", "sft", "sample"):
        assert f"[{stage}] $ " in first.stdout                      # every command is printed
    report = (tmp_path / "results.md").read_text()
    for model in ("base", "direct-only SFT", "CoT SFT"):
        assert f"| {model} |" in report
    findings = report[report.index("findings on the target family"):].splitlines()[1:]
    assert len(findings) >= 3 and all(f.split()[1] in ("yes", "NO", "noise") for f in findings)
    for png in ("accuracy.png", "sft_seed0.png"):
        assert (tmp_path / png).stat().st_size > 1000
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "[sft] done before, reused" in again.stdout and "[sft] $ " not in again.stdout


def test_base_number_rows_state_the_true_order():
    from demo.base import number_rows
    rows = number_rows(300, seed=0)
    assert len({r["id"] for r in rows}) == 300
    ops = set()
    for r in rows:
        a, op, b, yes = r["conversations"][1]["value"].split()
        assert r["conversations"][0]["value"] == f"{a} {op} {b} ?"
        assert (yes == "yes") == (int(a) > int(b) if op == ">" else int(a) < int(b))
        ops.add(op)
    assert ops == {"<", ">"}


def test_findings_pair_the_questions():
    from demo.run import findings
    # the same 100 questions: the lower side gets 5 of the higher side's 90 right answers wrong, and nothing else
    # differs. Unpaired binomial errors (2 s.e. 9.3 points) would call +5 noise; the paired test sees 5 flips, all
    # one way: 2 s.e. = 2 * sqrt(var(d) / n) = 4.4 points.
    hi = {f"q{i}": float(i < 90) for i in range(100)}
    lo = {f"q{i}": float(i < 85) for i in range(100)}
    res = {"CoT SFT": {("target", "cot"): 0.90, ("target", "direct"): 0.85,
                       "scores": {("target", "cot"): hi, ("target", "direct"): lo}}}
    line = next(f for f in findings(res) if "its CoT over its direct" in f)
    assert line.startswith("- yes") and "+5.0" in line and "2 s.e. 4.4" in line, line
    res["CoT SFT"]["scores"][("target", "direct")] = {f"q{i}": float(i < 85 or i >= 95) for i in range(100)}
    res["CoT SFT"][("target", "direct")] = 0.90     # 5 flips each way: the same accuracy, a zero difference
    line = next(f for f in findings(res) if "its CoT over its direct" in f)
    assert line.startswith("- noise") and "+0.0" in line, line
