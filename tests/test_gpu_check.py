"""bench/gpu_check.py cannot rot: its stages run on the CPU (--dry: Triton's interpreter, toy shapes), and its
runner streams output, enforces timeouts, skips what it cannot run and turns verdicts into the exit code."""

import sys

import pytest

from bench import gpu_check
from bench.gpu_check import Ctx, Row, Stage


def test_dry_run_of_every_stage(capsys, monkeypatch):
    monkeypatch.setenv("LLAVA_KERNELS", "auto")              # restored after: the stages set it while they run
    code = gpu_check.main(["--dry", "--in-process"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    table = out[out.index("| stage | goal | measured | verdict |"):]
    for st in gpu_check.STAGES:
        assert f"| {st.name} |" in table
    assert "| attention-correct | packed causal GQA 4/2 d16, 3 seqs: dk error <= 3x torch's |" in table
    assert table.count("| pass |") >= 12 and "FAIL" not in table


def test_runner_streams_skips_times_out_and_sets_the_exit_code(capsys):
    py = sys.executable
    stages = [Stage("talks", [py, "-c", "print('hello from a stage')"], 30),
              Stage("hangs", [py, "-c", "import os; r, w = os.pipe(); os.read(r, 1)"], 1),   # blocks, no CPU
              Stage("fails", [py, "-c", "raise SystemExit(3)"], 30),
              Stage("lacks", [py, "-c", "pass"], 30, needs=("no_such_module_for_gpu_check",))]
    results = dict(gpu_check.run_stages(stages, Ctx()))
    out = capsys.readouterr().out
    assert "hello from a stage" in out
    assert results["talks"].ok is True
    assert results["hangs"] == Row("hangs: exit code 0", "exit timeout", False)
    assert results["fails"].measured == "exit 3" and results["fails"].ok is False
    assert results["lacks"].ok is None and "no_such_module_for_gpu_check not installed" in results["lacks"].measured
    assert gpu_check.report(list(results.items()), 1.0) == 1
    # the same hang with its timeout cut short by the budget: not measured, not a failure
    cut = gpu_check.run_stage(Stage("hangs", stages[1].run, 60), Ctx(), timeout=1)
    assert cut == [Row("hangs", "skipped: the budget ran out after 1 s", None)]


def test_budget_skips_and_perf_misses_exit_2(capsys):
    stages = [Stage("late", [sys.executable, "-c", "pass"], 60)]
    (name, row), = gpu_check.run_stages(stages, Ctx(), budget=5)
    assert row.ok is None and row.measured.startswith("skipped: 5 s of the budget left")
    assert gpu_check.report([("bench", Row("fast", "0.9x", False, "perf")), ("ok", Row("right", "yes", True))],
                            1.0) == 2


def test_function_stage_runs_in_a_child_process():
    """The child protocol: `gpu_check.py --stage NAME` prints its rows on a tagged line the parent parses."""
    env = next(s for s in gpu_check.STAGES if s.name == "env")
    rows = gpu_check.run_stage(env, Ctx(dry=True), timeout=120)
    assert rows == [Row("a CUDA GPU", "cpu (dry run)", None)]


@pytest.mark.parametrize("argv", [["--list"], ["--quick", "--list"]])
def test_list(argv, capsys):
    assert gpu_check.main(argv) == 0
    out = capsys.readouterr().out
    assert "attention-correct" in out and ("kernel-tests" in out) == ("--quick" not in argv)
