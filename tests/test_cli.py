"""The command lines as users meet them: every flag survives torchrun's own parser, numbers are range-checked with
one-line errors (exit 2), user mistakes are one line without a traceback, --help shows defaults and ranges, Ctrl-C
says where a run stopped, and outputs of another run (or a user's own files) are never mixed in or overwritten."""

import json
import signal
import subprocess
import sys

import pytest

import distill
import evaluate
import sample
import train_dpo
import train_sft
from helpers import ROOT, build_tiny_model_dir

SCRIPTS = {"train_sft.py": train_sft, "train_dpo.py": train_dpo, "sample.py": sample, "evaluate.py": evaluate,
           "distill.py": distill}


def parser_of(module):
    """The script's ArgumentParser, captured from its parse_args."""
    import argparse
    captured = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        captured["parser"] = self
        raise SystemExit(0)
    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            module.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = real
    return captured["parser"]


@pytest.mark.parametrize("script", ["train_sft.py", "train_dpo.py", "sample.py", "evaluate.py"])
def test_torchrun_passes_every_flag_through(script):
    """torchrun's parser matches abbreviations anywhere on the command line: a flag of ours that is a prefix of one
    of its options (`--n` of --nnodes / --nproc-per-node) makes `torchrun ... script.py --n 32` fail at once."""
    from torch.distributed.run import get_args_parser
    flags = [s for a in parser_of(SCRIPTS[script])._actions for s in a.option_strings if s.startswith("--")]
    assert "--help" in flags and len(flags) > 5
    for flag in flags:
        args = get_args_parser().parse_args(["--nproc_per_node", "2", script, flag, "1"])
        assert args.training_script == script and args.training_script_args == [flag, "1"], flag


def run(argv, **kw):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.parametrize("argv, message", [
    (["train_sft.py", "--model", "m", "--data", "d", "--out", "o", "--batch-size", "0"], "--batch-size: 0 is out of range"),
    (["train_sft.py", "--model", "m", "--data", "d", "--out", "o", "--max-steps", "-5"], "--max-steps: -5 is out of"),
    (["train_sft.py", "--model", "m", "--data", "d", "--out", "o", "--max-steps", "0"], "--max-steps: 0 is out of"),
    (["train_sft.py", "--model", "m", "--data", "d", "--out", "o", "--lr", "-1e-3"], "--lr: -1e-3 is out of range"),
    (["train_sft.py", "--model", "m", "--data", "d", "--out", "o", "--epochs", "two"], "'two' is not a number"),
    (["train_dpo.py", "--model", "m", "--pairs", "p", "--out", "o", "--beta", "0"], "--beta: 0 is out of range"),
    (["sample.py", "--model", "m", "--data", "d", "--out", "o", "--num-samples", "0"], "--num-samples: 0 is out"),
    (["sample.py", "--model", "m", "--data", "d", "--out", "o", "--min-acc", "0.9"], "--min-acc 0.9 is above"),
    (["distill.py", "--data", "d", "--out", "o", "--concurrency", "0"], "--concurrency: 0 is out of range"),
    (["evaluate.py", "--model", "m", "--data", "d", "--out", "o", "--batch-size", "0"], "--batch-size: 0 is out"),
])
def test_numbers_are_checked_with_one_line_errors(argv, message):
    out = run(argv)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr


def test_help_shows_defaults_ranges_and_the_papers_values():
    text = " ".join(run(["train_sft.py", "--help"]).stdout.split())
    assert "default: 5e-06" in text and "paper: 5e-6" in text and "range: > 0" in text
    text = " ".join(run(["sample.py", "--help"]).stdout.split())
    assert "--num-samples" in text and "paper: 32" in text and "default: 32" in text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model_dir(str(tmp_path_factory.mktemp("cli")), n_train=16, n_test=4)


def test_user_mistakes_are_one_line_without_traceback(tiny, tmp_path):
    model, data, sft = tiny
    cases = [
        (["train_sft.py", "--model", "/nonexistent", "--data", sft, "--out", str(tmp_path / "o")],
         "--model /nonexistent: no such directory"),
        (["train_sft.py", "--model", data, "--data", sft, "--out", str(tmp_path / "o")], "no config.json"),
        (["sample.py", "--model", "/nonexistent", "--data", sft, "--out", str(tmp_path / "p.jsonl")],
         "no such directory"),
    ]
    (tmp_path / "afile").write_text("x")
    cases.append((["train_sft.py", "--model", model, "--data", sft, "--out", str(tmp_path / "afile")], "is a file"))
    bad = tmp_path / "bad.jsonl"
    row = json.loads(open(sft).readline())
    row["conversations"][1]["value"] = 42
    bad.write_text(json.dumps(row) + "\n")
    cases.append((["train_sft.py", "--model", model, "--data", str(bad), "--out", str(tmp_path / "o2")],
                  "bad.jsonl:1: conversations[1].value must be a string"))
    cases.append((["train_sft.py", "--model", model, "--data", str(bad), "--out", str(tmp_path / "o3"),
                   "--check-data"], "conversations[1].value must be a string"))
    for argv, message in cases:
        out = run(argv)
        assert out.returncode == 2 and message in out.stderr, (argv, out.stderr[-2000:])
        assert "Traceback" not in out.stderr, out.stderr
    debug = run(cases[0][0] + ["--debug"])
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_ctrl_c_says_where_the_run_stopped_and_how_to_continue(tiny, tmp_path):
    model, data, sft = tiny
    proc = subprocess.Popen([sys.executable, "-u", "train_sft.py", "--model", model, "--data", sft, "--image-root",
                             data, "--out", str(tmp_path / "run"), "--max-steps", "1000", "--batch-size", "2",
                             "--save-every", "2", "--workers", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # a shell's background job ignores SIGINT, and its children inherit that: restore it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if line.startswith("saved "):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and "rerun with --resume to continue from checkpoint-" in last, err
    assert "Traceback" not in err


WORKER = """
import atexit, sys
import torch
sys.path.insert(0, {root!r})
from common.cli import cli
from common.dist import Dist

def main():
    d = Dist()
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4)) if d.distributed else torch.nn.Linear(4, 4)
    model(torch.ones(2, 4)).sum().backward()
    atexit.register(print, f"teardown on rank {{d.rank}}", flush=True)
    print(f"done on rank {{d.rank}}", flush=True)
    d.close()
    return 0

cli(main)
"""


def test_a_finished_torchrun_worker_leaves_without_interpreter_teardown(tmp_path):
    """DDP keeps the process group (and its gloo threads) alive past destroy_process_group; tearing the interpreter
    down around them once aborted a finished 2-process run (SIGABRT). Workers exit at once after their outputs."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=ROOT))
    from helpers import launch
    two = subprocess.run(launch(str(script), [], 2), capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "done on rank 0" in two.stdout and "done on rank 1" in two.stdout
    assert "teardown" not in two.stdout
    one = subprocess.run(launch(str(script), [], 1), capture_output=True, text=True, timeout=120)
    assert one.returncode == 0 and "teardown on rank 0" in one.stdout     # a plain process ends as usual


CRASHER = """
import sys, time
import torch
sys.path.insert(0, {root!r})
from common.cli import cli
from common.dist import Dist

def main():
    d = Dist(timeout_minutes=10)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    model(torch.ones(2, 4)).sum().backward()
    if d.rank == 1:
        raise RuntimeError("CUDA out of memory (planted)")
    d.barrier()                           # rank 0 waits here for a rank that will never come
    return 0

cli(main)
"""


def test_a_crash_under_torchrun_prints_its_traceback_and_ends_the_job_at_once(tmp_path):
    """An uncaught error on one rank (an OOM, an NCCL error) under torchrun: that rank prints its traceback, tagged
    with its rank, tears its process group down and exits 1 at once, so the launcher ends the rank still waiting in a
    collective instead of leaving it for the 10-minute collective timeout."""
    import time
    script = tmp_path / "crasher.py"
    script.write_text(CRASHER.format(root=ROOT))
    from helpers import launch
    t0 = time.time()
    res = subprocess.run(launch(str(script), [], 2), capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and time.time() - t0 < 120
    first = res.stderr.index("] crashed:")
    assert res.stderr[first - 7:first] == "[rank 1", res.stderr[-3000:]        # the rank that crashed says so first
    assert "RuntimeError: CUDA out of memory (planted)" in res.stderr[first:first + 600]
    assert res.stderr.count("[rank 1] crashed:") == 1 and "exitcode  : 1" in res.stderr
