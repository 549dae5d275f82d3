"""Every command in the README's bash blocks runs as written, in the README's order, with only paths and sizes
swapped for tiny stand-ins (a tiny random LLaVA-NeXT for llama3-llava-next-8b-hf, a few synthetic charts for the
benchmarks, a loopback server for GPT-4o), through the launcher the README shows: python, or torchrun with 2
processes. A command the swaps below do not cover fails the test: the README cannot grow an untested command."""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT, build_tiny_model_dir, teacher_pairs
from fake_openai import FakeOpenAI


def readme_commands():
    """The commands of the README's ```bash blocks: continuation lines joined, comments dropped."""
    text = open(os.path.join(ROOT, "README.md")).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                commands.append(" ".join(line.split()))
    return commands


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny stand-ins for everything the README names, under one folder that is the commands' working directory."""
    root = tmp_path_factory.mktemp("readme")
    model, data, sft = build_tiny_model_dir(str(root / "tiny"), n_train=16, n_test=8)
    qa = [json.loads(line) for line in open(os.path.join(data, "train.jsonl"))]
    rows = [json.loads(line) for line in open(sft)]
    os.makedirs(root / "sft_data")
    for name, part in (("cot", [r for r in rows if not r["id"].endswith("_direct")]),
                       ("direct", [r for r in rows if r["id"].endswith("_direct")])):
        with open(root / "sft_data" / f"{name}.none.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    for name, part in (("chartqa_train.jsonl", qa[:6]), ("aokvqa_train.jsonl", qa[6:10])):
        with open(root / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    # pairs the teacher wrote (chosen right, rejected with a wrong answer): a tiny model's own samples may make none
    pairs = teacher_pairs(qa)
    for name, part in (("pairs.jsonl", pairs[:12]), ("dev_pairs.jsonl", pairs[12:])):
        with open(root / name, "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in part)
    # a released ChartQA test file with its images
    os.makedirs(root / "ChartQA" / "test" / "png")
    for r in qa[:4]:
        shutil.copy(os.path.join(data, r["image"]), root / "ChartQA" / "test" / "png" / os.path.basename(r["image"]))
    with open(root / "ChartQA" / "test" / "test_human.json", "w") as f:
        json.dump([{"imgname": os.path.basename(r["image"]), "query": r["question"], "label": r["answers"][0]}
                   for r in qa[:4]], f)
    return {"root": root, "model": model, "data": data}


def swap(cmd, w, url):
    """The README command with paths and sizes swapped; None when it is not a command to run here."""
    if cmd.startswith("make "):
        return None                                    # make demo / make test: CI runs make test itself
    r, data = str(w["root"]), w["data"]
    rules = [
        (r"\$HEAD_NODE:29500", f"127.0.0.1:{free_port()}"), (r"--nnodes \d+", "--nnodes 1"),
        (r"--nproc_per_node \d+", "--nproc_per_node 2"), (r"--rdzv-id \S+ ", ""),
        (r"(?<![\w/.-])llama3-llava-next-8b-hf\b", w["model"]),
        (r"(?<![\w/.-])demo/base_model\b", os.path.join(ROOT, "demo", "base_model")),
        (r"(?<![\w/.-])Open-LLaVA-NeXT-LLaMA3-8B\b", w["model"]),
        (r"sft_data/\{[^}]*\}/\{cot,direct\}\.none\.jsonl", f"{r}/sft_data/cot.none.jsonl {r}/sft_data/direct.none.jsonl"),
        (r"--image-root (images|image_data)\b", f"--image-root {data}"),
        (r"(?<![\w/.-])(chartqa_train|aokvqa_train)\.jsonl", rf"{r}/\1.jsonl"),
        (r"--pairs \S+", f"--pairs {r}/pairs.jsonl"), (r"--dev-pairs \S+", f"--dev-pairs {r}/dev_pairs.jsonl"),
        (r"(?<![\w.-])/shared/", f"{r}/shared/"),
        (r"--n \d+", "--n 40"), (r"--max-steps \d+", "--max-steps 2"), (r"--num-samples \d+", "--num-samples 2"),
        (r"--rerank \d+", "--rerank 2"), (r"--global-batch \d+", "--global-batch 4"),
        (r"--max-new-tokens \d+", "--max-new-tokens 12"), (r"--limit \d+", "--limit 8"),
        (r"--base-url \S+", f"--base-url {url}"),
    ]
    for pattern, repl in rules:
        cmd = re.sub(pattern, repl, cmd)
    argv = shlex.split(cmd)
    if argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0] == "torchrun":
        argv[:1] = [sys.executable, "-m", "torch.distributed.run"]
        if "--rdzv-endpoint" not in argv:
            argv.insert(3, f"--master_port={free_port()}")
    else:
        raise AssertionError(f"README command with an unknown launcher: {cmd}")
    argv = [os.path.join(ROOT, a) if a.endswith(".py") and os.path.exists(os.path.join(ROOT, a)) else a
            for a in argv]                               # the scripts, run from the stand-ins' folder
    script = next((os.path.basename(a) for a in argv if a.endswith(".py")), None)
    if script == "train_dpo.py":                          # the stand-in pairs' images
        argv[argv.index("--image-root") + 1] = data
    if script == "evaluate.py" and "--rescore" not in argv:
        argv += ["--limit", "4"] + ([] if "--max-new-tokens" in argv else ["--max-new-tokens", "12"])
    if any(a.endswith("distill.py") for a in argv) and "openai" in argv and "--base-url" not in argv:
        argv += ["--base-url", url]
    return argv


def test_every_readme_command_runs_as_written(world):
    commands = readme_commands()
    assert any(c.startswith("torchrun") for c in commands) and any("sample.py" in c for c in commands)
    env = dict(os.environ, OPENAI_API_KEY="sk-test", PYTHONPATH=ROOT)
    with FakeOpenAI() as server:
        for cmd in commands:
            argv = swap(cmd, world, server.url)
            if argv is None:
                continue
            t0 = time.time()
            out = subprocess.run(argv, cwd=world["root"], env=env, capture_output=True, text=True, timeout=600)
            print(f"{time.time() - t0:5.1f}s  {cmd[:110]}")
            assert out.returncode == 0, f"README command failed:\n  {cmd}\nran as:\n  {' '.join(argv)}\n" \
                                        f"{out.stdout[-1500:]}\n{out.stderr[-3000:]}"
