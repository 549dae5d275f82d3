"""The same seed gives the same numbers: sampling writes the same files for any number of processes (every question
is sampled in the same batch), SFT writes the same weights run to run, and make demo and make demo-full run the same
commands up to the process count of sampling and the verifier."""

import os
import sys

import torch

import sample
from helpers import ROOT
from data.synthetic import generate
from model import LlavaNext
from helpers import torchrun

BASE = os.path.join(ROOT, "demo", "base_model")       # the demo's own model, tokenizer and chart size
FAMILIES = ["count_above", "caption", "lookup", "max_label"]   # prompts of different lengths: left padding


def charts(path, n=14):
    generate(str(path), n, seed=3, level="tiny", families=FAMILIES, holdout=None, n_test=1)
    return os.path.join(str(path), "train.jsonl")


def sample_argv(data, out, *extra):
    return ["--model", BASE, "--data", data, "--image-root", os.path.dirname(data), "--num-samples", "6",
            "--max-new-tokens", "40", "--batch-size", "4", "--min-acc", "0", "--max-acc", "1", "--seed", "0",
            "--out", str(out), *extra]


class FakeDist:
    """One rank of a world, without a process group (sample.py's barriers have nothing to wait for here)."""

    def __init__(self, rank, world):
        self.rank, self.world, self.main, self.distributed = rank, world, rank == 0, world > 1
        self.device = torch.device("cpu")

    def barrier(self):
        pass

    def close(self):
        pass


def test_a_question_is_sampled_in_the_same_batch_for_any_number_of_processes(tmp_path, monkeypatch):
    """Each generate call's questions (seen through their seeds) and its padded shape, with 1 process and with the 2
    ranks of a 2-process run: the same calls, so no question's arithmetic depends on the process count (per-question
    seeds alone do not make it so: a batch with other companions has another padding and other shapes)."""
    data = charts(tmp_path / "data")
    calls = []

    def fake_generate(self, ids, pv, sizes, mask, *a, n=1, seed=None, **k):
        calls.append((tuple(seed), tuple(ids.shape)))
        return torch.full((ids.shape[0] * n, 1), self.eos_token_ids[0])
    monkeypatch.setattr(LlavaNext, "generate", fake_generate)
    runs = {}
    for world in (1, 2, 3):
        calls.clear()
        for rank in range(world):
            monkeypatch.setattr(sample, "Dist", lambda timeout_minutes=60: FakeDist(rank, world))
            assert sample.main(sample_argv(data, tmp_path / f"w{world}r{rank}" / "pairs.jsonl")) == 0
        runs[world] = sorted(calls)
    assert [len(s) for s, _ in runs[1]] == [4, 4, 4, 2] or sorted(len(s) for s, _ in runs[1]) == [2, 4, 4, 4]
    assert runs[2] == runs[1] and runs[3] == runs[1]


def test_one_and_two_processes_write_the_same_files(tmp_path):
    """The real thing: sample.py from the demo's model on charts of four families, under torchrun with 2 processes
    and as one process: byte-identical pairs, RFT rows and question log."""
    data = charts(tmp_path / "data")
    one, two = tmp_path / "one" / "pairs.jsonl", tmp_path / "two" / "pairs.jsonl"
    assert sample.main(sample_argv(data, one)) == 0
    torchrun(sample_argv(data, two), script="sample.py")
    for suffix in (".jsonl", ".rft.jsonl", ".questions.jsonl"):
        a, b = (open(str(p)[:-len(".jsonl")] + suffix).read() for p in (one, two))
        assert a == b, suffix
    assert len(open(str(one)[:-len(".jsonl")] + ".questions.jsonl").readlines()) == 14


def test_sft_writes_bitwise_the_same_weights_run_to_run(tmp_path):
    """The same train_sft.py command twice (each its own process, as the demo runs it): the same bytes."""
    import subprocess
    data = charts(tmp_path / "data", n=24)
    rows = tmp_path / "sft.jsonl"
    subprocess.run([sys.executable, "distill.py", "--data", data, "--image-root", os.path.dirname(data), "--out",
                    str(rows), "--teacher", "synthetic", "--with-direct"], cwd=ROOT, check=True, capture_output=True)
    weights = []
    for k in range(2):
        out = tmp_path / f"sft{k}"
        subprocess.run([sys.executable, "train_sft.py", "--model", BASE, "--out", str(out), "--data", str(rows),
                        "--image-root", os.path.dirname(data), "--max-steps", "6", "--batch-size", "4", "--lr",
                        "1e-3", "--freeze-vision", "--workers", "0", "--seed", "0"], cwd=ROOT, check=True,
                       capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        weights.append(open(out / "final" / "model.safetensors", "rb").read())
    assert weights[0] == weights[1]
    assert weights[0] != open(os.path.join(BASE, "model.safetensors"), "rb").read()     # it did train


def test_the_demo_modes_run_the_same_commands_but_for_the_process_count(tmp_path):
    """make demo and make demo-full: every job of the main line is a job of the full run with the same command and
    the same inputs; only sampling and the verifier take 2 processes instead of 1. The jobs' environment pins one
    thread and (on an x86 CPU with AVX2) the CPU libraries' instruction set, whatever the machine offers."""
    from demo import run
    work, base = str(tmp_path / "seed0"), BASE
    main = {j.name: j for j in run.seed_jobs(0, work, base, run.FULL, False)}
    full = {j.name: j for j in run.seed_jobs(0, work, base, run.FULL, True)}
    assert set(main) < set(full)
    for name, job in main.items():
        other = full[name]
        assert job.deps == other.deps, name
        if not callable(job.cmd):
            assert job.cmd == other.cmd, name
        assert job.procs == other.procs or name.startswith(("sample_", "verify_")), name
    env = run.job_env()
    assert env["OMP_NUM_THREADS"] == "1"
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert all(env[k] == os.environ.get(k, v) for k, v in run.CPU_PINS.items())


def test_the_verifier_deals_whole_batches_to_the_processes():
    """evaluate.py --rerank: each process takes every world-th batch of --batch-size questions, as sample.py does;
    the other modes every world-th question."""
    import evaluate
    todo = list(range(10))
    assert [evaluate.rank_share(todo, "rerank", FakeDist(r, 2), 4) for r in range(2)] == [[0, 1, 2, 3, 8, 9], [4, 5, 6, 7]]
    assert evaluate.rank_share(todo, "rerank", FakeDist(0, 1), 4) == todo
    assert evaluate.rank_share(todo, "cot", FakeDist(1, 3)) == [1, 4, 7]
