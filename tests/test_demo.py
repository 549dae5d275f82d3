"""A shortened `make demo` (every stage, a few steps each) from the shipped base model, so CI keeps it working."""

import os
import subprocess
import sys

import pytest

from helpers import ROOT

BASE = os.path.join(ROOT, "demo", "base_model")


@pytest.mark.skipif(not os.path.exists(os.path.join(BASE, "config.json")), reason="no shipped base model")
def test_quick_demo_runs_every_stage_and_reuses_them(tmp_path):
    cmd = [sys.executable, "-m", "demo.run", "--quick", "--out", str(tmp_path)]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for job in ("data", "distill_cot", "distill_fmt_direct", "sft_arm1", "sft_arm2", "sft_arm3", "sft_arm4",
                "sample_outcome", "sample_steps", "dpo_outcome", "rft_outcome", "verify_outcome", "eval_arm4",
                "eval_dpo_outcome", "eval_rft_outcome", "eval_base"):
        assert f"[seed0/{job}] $ " in first.stdout, job                     # every command is printed
    # a few steps of SFT leave no chain with every step right: the step-graded pairs' jobs say they are skipped
    # (test_dpo.py checks step grading itself)
    for job in ("dpo_steps", "rft_steps", "verify_steps", "eval_dpo_steps"):
        assert f"[seed0/{job}] $ " in first.stdout or f"[seed0/{job}] skipped" in first.stdout, job
    report = (tmp_path / "results.md").read_text()
    for model in ("(1) format", "(2) format + direct", "(3) format + CoT", "(4) format + direct + CoT",
                  "DPO from (4)", "RFT from (4) (control)"):
        assert f"| {model} | direct |" in report and f"| {model} | CoT |" in report, model
    section = report.split("## Findings")[1].split("\n## ")[0]
    findings = [line for line in section.splitlines() if line.startswith("| ") and "vs" in line]
    assert len(findings) >= 8 and all("**holds**" in f or "**does not hold**" in f for f in findings), findings
    assert "| best-of-n, DPO reward |" in report and "| some sample right" in report
    for png in ("accuracy.png", "sft_seed0.png", "dpo_seed0.png", "verifier.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
    assert "first error" in (tmp_path / "token_rewards_seed0.html").read_text()
    # one question through every stage: the recomputed samples are the run's own (their accuracy is the logged one)
    trace = subprocess.run([sys.executable, "-m", "demo.trace", str(tmp_path / "seed0")], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert trace.returncode == 0, trace.stderr[-3000:]
    assert "the same as the run's question log" in trace.stdout, trace.stdout[-3000:]
    for part in ("### The QA record", "### The SFT row as tokens", "### The pairs", "### The token rewards",
                 "### The evaluated answers"):
        assert part in trace.stdout, part
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "[seed0/sft_arm4] done before, reused" in again.stdout
    assert " $ " not in again.stdout                                          # nothing ran twice


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
    from demo.report import paired, verdict
    # the same 100 questions: the lower side gets 5 of the higher side's 90 right answers wrong, and nothing else
    # differs. Unpaired binomial errors (2 s.e. 9.3 points) would call +5 noise; the paired test sees 5 flips, all
    # one way: 2 s.e. = 2 * sqrt(var(d) / n) = 4.4 points.
    hi = {f"q{i}": float(i < 90) for i in range(100)}
    lo = {f"q{i}": float(i < 85) for i in range(100)}
    per, pooled = paired([(hi, lo)])
    assert per[0][:2] == (90.0, 85.0) and round(pooled[0], 1) == 5.0 and round(pooled[1], 1) == 4.4
    assert verdict(">", pooled).startswith("**holds**") and verdict(">=", pooled).startswith("**holds**")
    # 5 flips each way: the same accuracy, a zero difference: ">" does not hold, ">=" does
    lo = {f"q{i}": float(i < 85 or i >= 95) for i in range(100)}
    _, pooled = paired([(hi, lo)])
    assert pooled[0] == 0.0 and "does not hold" in verdict(">", pooled) and "**holds**" in verdict(">=", pooled)
    # two seeds pool their questions (the same ids in each seed are different questions)
    _, pooled = paired([(hi, lo), (lo, {k: v - 1 for k, v in lo.items()})])
    assert pooled[2] == 200 and verdict(">", pooled).startswith("**holds**")
