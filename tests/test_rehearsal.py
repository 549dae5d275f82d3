"""The README's multi-GPU recipes rehearsed on the CPU as users run them: 4 processes (gloo) with FSDP2, gradient
accumulation, packed sequences, gradient checkpointing, a frozen vision tower, row and dev-pair counts that do not
divide world x batch, a missing image and text-only rows (ranks whose micro-batch is empty or has no image), the
precomputed reference, dev metrics and the token-reward audit. The 4-process run must end where the same recipe
ends in one process; killed (-9) after its first checkpoint and resumed on 2 processes, it must end there too."""

import json
import os
import random
import signal
import subprocess

import pytest
from safetensors.torch import load_file

from helpers import ROOT, build_tiny_model_dir, launch, teacher_pairs




def run(script, argv, n):
    out = subprocess.run(launch(script, argv, n), cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = "\n".join(line for line in out.stderr.splitlines() if "Error" in line or "error" in line)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:] + "\nerror lines:\n" + errors[-3000:]
    return out.stdout


def killed_after_first_save(script, argv, n):
    """Run, and kill -9 the launcher and every worker the moment the first checkpoint is reported."""
    proc = subprocess.Popen(launch(script, argv, n), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    saved = False
    for line in proc.stdout:
        if line.startswith("saved "):
            saved = True
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert saved, "the run ended without reporting a checkpoint"


def max_diff(a, b):
    wa = load_file(os.path.join(a, "final", "model.safetensors"))
    wb = load_file(os.path.join(b, "final", "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal")
    model, data, sft = build_tiny_model_dir(str(root), n_train=24, n_test=12)
    rows = [json.loads(line) for line in open(sft)][:30]
    text_only = [dict(r, id=r["id"] + "-text", image=None, conversations=[
        dict(t, value=t["value"].replace("<image>\n", "")) for t in r["conversations"]]) for r in rows[:4]]
    missing = [dict(rows[5], id="missing-image", image="images/nope.png")]
    sft_rows = rows + text_only + missing                           # 35 rows: 4 steps of 8, 3 rows left over
    pairs = teacher_pairs(json.loads(line) for line in open(os.path.join(data, "test.jsonl")))
    # rejected: another question's chain, so that chosen and rejected gradients do not nearly cancel (an answer-only
    # difference leaves most entries of the DPO gradient at rounding noise, which AdamW's first steps amplify)
    pairs = [dict(p, rejected=pairs[(i + 1) % len(pairs)]["chosen"]) for i, p in enumerate(pairs)]
    pairs += [dict(p, id=p["id"] + "-text", image=None) for p in pairs[:3]]
    pairs += [dict(pairs[4], id="missing-image", image="images/nope.png")]   # 16 pairs: train 11, dev 5
    return {"model": model, "data": data, "sft": write_jsonl(root / "sft.jsonl", sft_rows),
            "pairs": write_jsonl(root / "pairs.jsonl", pairs[:6] + pairs[-5:]),
            "dev": write_jsonl(root / "dev.jsonl", pairs[6:11]), "root": root}


def sft_argv(s, out, batch, accum):
    """The README's SFT recipe (tiny sizes; every flag it uses, plus --freeze-vision and packing)."""
    return ["--model", s["model"], "--image-root", s["data"], "--data", s["sft"], "--out", str(s["root"] / out),
            "--fsdp", "--batch-size", str(batch), "--grad-accum", str(accum), "--lr", "1e-3", "--vision-lr", "1e-4",
            "--epochs", "1", "--grad-checkpointing", "--freeze-vision", "--pack", "on", "--workers", "0",
            "--save-every", "1"]


def dpo_argv(s, out, batch, global_batch):
    """The README's DPO recipe (tiny sizes; every flag it uses)."""
    return ["--model", s["model"], "--pairs", s["pairs"], "--image-root", s["data"], "--out", str(s["root"] / out),
            "--fsdp", "--batch-size", str(batch), "--global-batch", str(global_batch), "--lr", "1e-3", "--beta",
            "0.1", "--truncate-words", "90", "--precompute-ref", "--dev-pairs", s["dev"], "--eval-every", "1",
            "--audit-pairs", "3", "--grad-checkpointing", "--pack", "on", "--workers", "0", "--save-every", "1"]


@pytest.fixture(scope="module")
def one_process(setup):
    """The recipes on one process, the reference every multi-process run must end at: (SFT log, DPO log)."""
    return (run("train_sft.py", sft_argv(setup, "sft1", 8, 1), 1),
            run("train_dpo.py", dpo_argv(setup, "dpo1", 1, 8) + ["--epochs", "3"], 1))


def test_sft_recipe_on_4_processes_equals_1_and_resumes_on_2(setup, one_process):
    one = one_process[0]
    four = run("train_sft.py", sft_argv(setup, "sft4", 1, 2), 4)
    for log in (one, four):
        assert "35 rows | global batch 8" in log and "4 steps" in log
        assert "image not found: 1" in log                  # the missing image reached a micro-batch and was skipped
    assert "ranks balanced by tokens" in four
    assert max_diff(setup["root"] / "sft1", setup["root"] / "sft4") <= 1e-4
    killed_after_first_save("train_sft.py", sft_argv(setup, "sft_r", 1, 2), 4)
    assert open(setup["root"] / "sft_r" / "latest").read().strip() == "checkpoint-000001"
    resumed = run("train_sft.py", sft_argv(setup, "sft_r", 1, 4) + ["--resume"], 2)
    assert "resumed from" in resumed and "at step 1" in resumed
    assert max_diff(setup["root"] / "sft4", setup["root"] / "sft_r") <= 1e-4
    losses = [[json.loads(line)["loss"] for line in open(setup["root"] / o / "metrics.jsonl")]
              for o in ("sft4", "sft_r")]
    assert len(losses[1]) == 4 and all(abs(a - b) <= 1e-5 for a, b in zip(*losses))


def test_dpo_recipe_on_4_processes_equals_1_and_resumes_on_2(setup, one_process):
    three = ["--epochs", "3"]                                 # 11 pairs: one global batch of 8 per epoch
    one = one_process[1]
    four = run("train_dpo.py", dpo_argv(setup, "dpo4", 1, 8) + three, 4)
    for log in (one, four):
        assert "11 pairs | global batch 8" in log and "3 steps" in log
    assert "8 accumulation" in one and "2 accumulation" in four
    assert "pairs not trained on: image not found: " in four     # the missing image's pair, wherever it landed
    assert max_diff(setup["root"] / "dpo1", setup["root"] / "dpo4") <= 1e-4
    dev = [[r for r in map(json.loads, open(setup["root"] / o / "metrics.jsonl")) if "dev/loss" in r]
           for o in ("dpo1", "dpo4")]
    assert len(dev[1]) == 3 and all(abs(a["dev/loss"] - b["dev/loss"]) <= 1e-5 for a, b in zip(*dev))
    assert open(setup["root"] / "dpo4" / "token_rewards.html").read().count("<h3>") == 3
    killed_after_first_save("train_dpo.py", dpo_argv(setup, "dpo_r", 1, 8) + three, 4)
    resumed = run("train_dpo.py", dpo_argv(setup, "dpo_r", 1, 8) + three + ["--resume"], 2)
    assert "at step 1" in resumed and "reference log-probs from" in resumed
    assert max_diff(setup["root"] / "dpo4", setup["root"] / "dpo_r") <= 1e-4


def test_ranks_are_balanced_by_tokens_and_the_global_batch_ignores_the_process_count():
    """8 ranks x 4 samples of anyres-like lengths (576 base tokens + 1 to 4 crops' features, and 30-600 text tokens).
    Cut contiguously from a length-sorted batch, rank 0 always got the longest samples (mean / max tokens per rank
    about 0.85); balanced, the ranks carry within a few percent of each other."""
    from data.collate import balance, global_batches, split_batch
    rng = random.Random(0)
    lengths = [576 + rng.randint(1, 4) * 588 + rng.randint(30, 600) for _ in range(2048)]
    batches = global_batches(lengths, 32, seed=0, epoch=0)
    steps = [s for b in batches for s in split_batch(b, lengths, 4, 8, 1)]
    contiguous = [[sorted(b, key=lambda i: -lengths[i])[r * 4:(r + 1) * 4] for r in range(8)] for b in batches]
    assert balance(contiguous, lengths) < 0.9 < 0.97 <= balance(steps, lengths)
    for micro, world, accum in ((4, 8, 1), (2, 4, 4), (32, 1, 1), (1, 2, 16)):
        split = split_batch(batches[0], lengths, micro, world, accum)
        assert all(len(mb) == micro for step in split for mb in step)
        assert sorted(i for step in split for mb in step for i in mb) == sorted(batches[0])
    assert batches == global_batches(lengths, 32, seed=0, epoch=0) != global_batches(lengths, 32, seed=1, epoch=0)


def two_nodes(script, argv, cwds=(ROOT, ROOT)):
    """The README's several-node command on two "nodes" of one process each: two torchrun launchers meeting at a
    c10d rendezvous on 127.0.0.1 (each in its own working directory). Returns [(returncode, stdout, stderr)]."""
    import socket
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend",
           "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"rehearsal{port}",
           os.path.join(ROOT, script), *argv]
    procs = [subprocess.Popen(cmd, cwd=c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cwds]
    return [(p.returncode, *p.communicate(timeout=300)) if p.wait(timeout=300) is not None else None
            for p in procs]


def test_sft_and_dpo_on_two_nodes_end_where_one_process_ends(setup, one_process):
    for rc, out, err in two_nodes("train_sft.py", sft_argv(setup, "nodes_sft2", 2, 2)):
        assert rc == 0, out[-2000:] + err[-3000:]
    assert max_diff(setup["root"] / "sft1", setup["root"] / "nodes_sft2") <= 1e-4
    for rc, out, err in two_nodes("train_dpo.py", dpo_argv(setup, "nodes_dpo2", 1, 8) + ["--epochs", "3"]):
        assert rc == 0, out[-2000:] + err[-3000:]
    assert max_diff(setup["root"] / "dpo1", setup["root"] / "nodes_dpo2") <= 1e-4


def test_an_out_that_a_node_cannot_see_is_refused_in_one_line(setup, tmp_path):
    """Each node resolves --out on its own disk (here: a relative --out from two working directories): every rank
    stops at once with one line saying --out must be on a shared file system, and no run starts on either side."""
    a, b = tmp_path / "node0", tmp_path / "node1"
    a.mkdir()
    b.mkdir()
    argv = sft_argv(setup, "unused", 2, 2)
    argv[argv.index("--out") + 1] = "runs/sft"
    results = two_nodes("train_sft.py", argv, cwds=(str(a), str(b)))
    for rc, out, err in results:
        assert rc != 0
    said = "".join(err for _, _, err in results)
    line = next(ln for ln in said.splitlines() if "is not the same directory on every node" in ln)
    assert line.startswith("error: --out runs/sft") and "must be on a shared file system" in line, said[-2000:]
    assert "crashed:" not in said                  # a user's mistake, not a crash (torchrun's own summary follows)
    assert not (a / "runs" / "sft" / "manifest.json").exists() and not (b / "runs").exists()
