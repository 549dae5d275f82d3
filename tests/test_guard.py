"""training/guard.py: what a cluster does to a job. SIGTERM (a scheduler's warning before the kill) ends a run after
its step with a checkpoint and exit 143, and --resume then ends exactly where an uninterrupted run ends, on one
process and under torchrun; a non-finite loss stops the run before its step is applied, naming the last good
checkpoint."""

import json
import os
import signal
import subprocess
import sys

from safetensors.torch import load_file

from helpers import ROOT


def start(argv, procs=1):
    """A run in its own process group (as a scheduler sees a job), its output read line by line."""
    launcher = [sys.executable, "-u"] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                           f"--nproc_per_node={procs}"]
    return subprocess.Popen(launcher + argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def signal_after(proc, marker, sig, group):
    """Send `sig` once a line starting with `marker` appears; returns (stdout, stderr) once the run has ended."""
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith(marker):
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
            break
    rest, err = proc.communicate(timeout=300)
    return "".join(out) + rest, err


def weights(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] == wb[k]).all(), k


def test_sigterm_checkpoints_after_the_step_and_resume_ends_where_a_straight_run_ends(small, tmp_path):
    """SIGTERM to the whole process group (the run and its DataLoader worker, as SLURM sends it): the step finishes,
    a checkpoint is written, the resume command is printed, exit 143; --resume then equals an uninterrupted run."""
    model, data, sft, _ = small
    run = ["train_sft.py", "--model", model, "--data", sft, "--image-root", data, "--max-steps", "30",
           "--batch-size", "2", "--lr", "1e-3", "--workers", "1", "--log-every", "1"]
    cut, straight = str(tmp_path / "cut"), str(tmp_path / "straight")
    proc = start(run + ["--out", cut])
    out, err = signal_after(proc, "step 3/30", signal.SIGTERM, group=True)
    assert proc.returncode == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("preempted (SIGTERM) after step ") and "checkpoint-0000" in last, err[-2000:]
    assert "resume with: python train_sft.py " in last and last.endswith("--resume"), last
    step = int(last.split("after step ")[1].split()[0])
    assert 3 <= step < 30 and os.path.isdir(os.path.join(cut, f"checkpoint-{step:06d}"))
    assert "Traceback" not in err
    subprocess.run([sys.executable] + run + ["--out", cut, "--resume"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run([sys.executable] + run + ["--out", straight], cwd=ROOT, check=True, capture_output=True)
    assert_same_weights(cut, straight)
    losses = [[r["loss"] for r in map(json.loads, open(os.path.join(o, "metrics.jsonl")))] for o in (cut, straight)]
    assert losses[0] == losses[1]


def test_sigterm_under_torchrun_every_rank_checkpoints_together(small, tmp_path):
    """torchrun forwards SIGTERM to its workers: they finish the step, agree, write one sharded checkpoint, and
    the resumed 2-process run ends where an uninterrupted 2-process run ends."""
    model, data, _, pairs = small
    run = ["train_dpo.py", "--model", model, "--pairs", pairs, "--image-root", data, "--epochs", "10",
           "--batch-size", "1", "--global-batch", "2", "--lr", "1e-4", "--workers", "0", "--log-every", "1"]
    cut, straight = str(tmp_path / "cut"), str(tmp_path / "straight")
    proc = start(run + ["--out", cut], procs=2)
    out, err = signal_after(proc, "step 2/", signal.SIGTERM, group=False)      # to the launcher alone
    assert "preempted (SIGTERM) after step " in err and "resume with: torchrun ... train_dpo.py" in err, err[-3000:]
    assert err.count("preempted (SIGTERM)") == 1                                # rank 0 says it, once
    latest = open(os.path.join(cut, "latest")).read().strip()
    assert os.path.exists(os.path.join(cut, latest, "state", ".metadata"))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    subprocess.run(launcher + run + ["--out", cut, "--resume"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(launcher + run + ["--out", straight], cwd=ROOT, check=True, capture_output=True)
    assert_same_weights(cut, straight)


def test_a_non_finite_loss_stops_the_run_before_its_step_is_applied(small, tmp_path):
    """An absurd lr blows the weights up after step 1: step 2's loss is not finite; it is not applied, nothing of
    the broken state is saved, and one line names the step and the last good checkpoint."""
    model, data, sft, _ = small
    out = tmp_path / "nan"
    res = subprocess.run([sys.executable, "train_sft.py", "--model", model, "--data", sft, "--image-root", data,
                          "--out", str(out), "--max-steps", "6", "--batch-size", "4", "--lr", "1e30", "--save-every",
                          "1", "--workers", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("stopped at step 2 of 6: loss nan") and "not finite" in last, res.stderr[-2000:]
    assert f"last good checkpoint: {out / 'checkpoint-000001'}" in last
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-000001"]
    assert [r["step"] for r in map(json.loads, open(out / "metrics.jsonl"))] == [1]
    assert "Traceback" not in res.stderr
