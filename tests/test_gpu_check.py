"""bench/gpu_check.py cannot rot, and cannot pass without checking: its stages run on the CPU (--dry: Triton's
interpreter, toy shapes); its runner streams output, enforces timeouts and turns verdicts into the exit code; a stage
that is not run (its modules do not import, the budget ran out) fails unless --skip asked for it; the stage timeouts
fit the 8-minute budget; gpu_check.sh uses the machine's own torch and installs nothing; no stage pulls in a test
dependency it does not declare."""

import os
import subprocess
import sys

import pytest

from bench import gpu_check
from bench.gpu_check import Ctx, Row, Stage
from helpers import ROOT


def test_dry_run_of_every_stage_in_its_own_process(capsys, monkeypatch):
    """Each stage in a child, as on the GPU box; what each child imported is reported: pytest and transformers (the
    test-only dependencies) only where a stage declares them (fsdp_smoke.py once pulled pytest in through the tests'
    conftest, which the GPU box may lack)."""
    monkeypatch.setenv("LLAVA_KERNELS", "auto")
    monkeypatch.setattr(gpu_check, "IMPORTED", {})
    results = gpu_check.run_stages(gpu_check.STAGES, Ctx(dry=True))
    out = capsys.readouterr().out
    assert gpu_check.report(results, 1.0) == 0, out[-3000:]
    table = {(name, r.goal): r for name, r in results}
    for st in gpu_check.STAGES:
        assert any(name == st.name for name, _ in table)
    assert table["attention-correct", "packed causal GQA 4/2 d16, 3 seqs: dk error <= 3x torch's"].ok
    assert table["dispatch", "SFT micro-batch, fp32 weights under float32 autocast: one dtype at every attention call"
                 ].ok
    assert sum(r.ok is True for r in table.values()) >= 15 and not any(r.ok is False for r in table.values())
    for st in gpu_check.STAGES:
        if callable(st.run) and st.dry:
            imported = gpu_check.IMPORTED[st.name]
            for dep in ("pytest", "transformers"):
                assert dep not in imported or dep in st.needs, (st.name, dep)


def test_runner_streams_times_out_and_fails_what_it_could_not_check(capsys):
    py = sys.executable
    stages = [Stage("talks", [py, "-c", "print('hello from a stage')"], 30),
              Stage("hangs", [py, "-c", "import os; r, w = os.pipe(); os.read(r, 1)"], 1),   # blocks, no CPU
              Stage("fails", [py, "-c", "raise SystemExit(3)"], 30),
              Stage("lacks", [py, "-c", "pass"], 30, needs=("no_such_module_for_gpu_check",)),
              Stage("asked", [py, "-c", "raise SystemExit(4)"], 30)]
    results = dict(gpu_check.run_stages(stages, Ctx(), skip={"asked"}))
    out = capsys.readouterr().out
    assert "hello from a stage" in out
    assert results["talks"].ok is True
    assert results["hangs"] == Row("hangs: exit code 0", "exit timeout", False)
    assert results["fails"].measured == "exit 3" and results["fails"].ok is False
    assert results["lacks"].ok is False and "No module named 'no_such_module_for_gpu_check'" in \
        results["lacks"].measured                                   # missing modules fail: they are not skips
    assert results["asked"] == Row("asked", "skipped: --skip", None)
    assert gpu_check.report(list(results.items()), 1.0) == 1
    # the same hang with its timeout cut short by the budget: the stage did not check anything, so it fails
    cut = gpu_check.run_stage(Stage("hangs", stages[1].run, 60), Ctx(), timeout=1)
    assert cut[-1].ok is False and "budget ran out" in cut[-1].measured


def test_a_stage_the_budget_leaves_no_time_for_fails_and_perf_misses_exit_2(capsys):
    stages = [Stage("late", [sys.executable, "-c", "pass"], 60)]
    (name, row), = gpu_check.run_stages(stages, Ctx(), budget=5)
    assert row.ok is False and row.measured.startswith("not run: 5 s of the budget left")
    assert gpu_check.report([(name, row)], 1.0) == 1
    assert gpu_check.report([("bench", Row("fast", "0.9x", False, "perf")), ("ok", Row("right", "yes", True))],
                            1.0) == 2


def test_the_stage_timeouts_fit_eight_minutes_with_the_set_up():
    """Every stage gets its full timeout within the default budget (nothing is cut short for lack of time), and the
    budget plus gpu_check.sh's set-up stays within 8 minutes (480 s; --quick within 3)."""
    assert gpu_check.BUDGET == sum(s.timeout for s in gpu_check.STAGES) <= 465
    assert gpu_check.QUICK_BUDGET == sum(s.timeout for s in gpu_check.STAGES if s.quick) <= 175
    script = open(os.path.join(ROOT, "bench", "gpu_check.sh")).read()
    assert "LIMIT=480" in script and "LIMIT=180" in script


def test_gpu_check_sh_uses_the_machines_own_torch_and_installs_nothing(tmp_path):
    """A python that imports torch and triton is used as it is: no venv, no pip (a GPU box without a network must
    not wait on a package index); a stage skipped on purpose with --skip passes, and --only a stage runs it."""
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), GPU_CHECK_VENV=str(tmp_path / "venv"))
    res = subprocess.run(["bash", "bench/gpu_check.sh", "--dry", "--only", "env,fsdp-smoke", "--skip", "fsdp-smoke"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "with its own torch and triton (nothing installed)" in res.stdout
    assert "installing" not in res.stdout and not (tmp_path / "venv").exists()
    assert "| fsdp-smoke | fsdp-smoke | skipped: --skip | - |" in res.stdout
    assert os.path.exists(tmp_path / "gpu_check.json")


def test_function_stage_runs_in_a_child_process():
    """The child protocol: `gpu_check.py --stage NAME` prints its rows on a tagged line the parent parses."""
    env = next(s for s in gpu_check.STAGES if s.name == "env")
    rows = gpu_check.run_stage(env, Ctx(dry=True), timeout=120)
    assert rows == [Row("a CUDA GPU", "cpu (dry run)", None)]


@pytest.mark.parametrize("argv", [["--list"], ["--quick", "--list"]])
def test_list(argv, capsys):
    assert gpu_check.main(argv) == 0
    out = capsys.readouterr().out
    assert "attention-correct" in out and "dispatch" in out and ("kernel-tests" in out) == ("--quick" not in argv)


def test_an_unknown_stage_name_is_refused():
    with pytest.raises(SystemExit):
        gpu_check.main(["--skip", "no-such-stage", "--list"])
