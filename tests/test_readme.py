"""Every command in the README's and the docs' bash blocks runs as written, in the order a reader meets them: the
real-scale guide first (it fetches and converts what the README's 8-GPU commands use), then the README, then the
other guides, in one working folder. Only paths and sizes are swapped for tiny stand-ins: `hf` copies from a stand-in
hub (a tiny random LLaVA-NeXT for llama3-llava-next-8b-hf, a few rows of each released SFT set with their image
tarballs, the released DPO pairs' format), a few synthetic charts stand in for each benchmark's released files, a
loopback server for GPT-4o, two gloo processes for 8 GPUs, `--dry` for the GPU check. Each command runs through bash
(braces, globs and loops as a shell expands them) with `python` and `torchrun` on the PATH. A command the swaps do
not cover fails the test: no doc can grow an untested command."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time

import pytest

from fake_openai import FakeOpenAI
from helpers import ROOT, build_tiny_model_dir, teacher_pairs

# the order a reader meets them; every doc with a bash block must be here
DOCS = ["docs/real-scale.md", "README.md", "docs/distill.md", "docs/sft.md", "docs/dpo.md", "docs/evaluate.md",
        "docs/model.md", "docs/kernels.md", "docs/demo.md", "docs/WALKTHROUGH.md"]
# covered elsewhere: make demo / make test (CI runs make test; tests/test_demo.py runs the demo and demo.trace)
ELSEWHERE = (r"^make ", r"^python -m demo\.trace ")


def commands(doc):
    """The commands of a doc's ```bash blocks: continuation lines joined, comments dropped."""
    text = open(os.path.join(ROOT, doc)).read()
    out = []
    for block in re.findall(r"^\s*```bash\n(.*?)^\s*```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                out.append(" ".join(line.split()))
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


SFT_FILES = ([f"{d}/{k}.none.jsonl" for d in ("aokvqa", "chartqa", "docvqa", "infovqa", "textvqa", "ai2d", "mathvision")
              for k in ("cot", "direct")] + [f"sqa/{k}.image.none.jsonl" for k in ("cot", "direct")]
             + [f"math/{n}.jsonl" for n in ("gllava.align", "geoqa_plus.qa", "geo.mcq.x2", "geo.sa.x2", "geo.mcq.direct",
                                            "geo.sa.direct", "geo-align.rationale.4k", "geo-qa.rationale.4k",
                                            "geo-align.qa.4k", "geo-qa.qa.4k")])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The reader's working folder, with the stand-ins for what the docs fetch, and a bin/ of launchers."""
    root = tmp_path_factory.mktemp("readme")
    model, data, sft = build_tiny_model_dir(str(root / "tiny"), n_train=24, n_test=8)
    qa = [json.loads(line) for line in open(os.path.join(data, "train.jsonl"))]
    rows = [json.loads(line) for line in open(sft)]
    pngs = [os.path.join(data, r["image"]) for r in qa]

    def image(dst, k=0):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(pngs[k % len(pngs)], dst)

    # the hub: the model, the released SFT sets (a few rows each, images in tarballs) and the released DPO pairs
    hub = root / "hub"
    shutil.copytree(model, hub / "llava-hf/llama3-llava-next-8b-hf")
    staging = root / "staging"
    for k, name in enumerate(SFT_FILES):
        folder = name.split("/")[0]
        part = []
        for i, r in enumerate(rows[2 * k:2 * k + 2] or rows[:2]):
            path = f"{folder}/img{k}_{i}.png"
            image(staging / folder / os.path.basename(path), 2 * k + i)
            part.append(dict(r, id=f"{folder}-{k}-{i}", image=path))
        write_jsonl(hub / "Share4oReasoning/sft_data" / name, part)
    for folder in sorted(os.listdir(staging)):
        os.makedirs(hub / "Share4oReasoning/sft_data/image_data", exist_ok=True)
        with tarfile.open(hub / f"Share4oReasoning/sft_data/image_data/{folder}.tar.gz", "w:gz") as tar:
            tar.add(staging / folder, arcname=folder)
    pairs = teacher_pairs(qa)
    for k, name in enumerate(("chartqa.pairwise.train", "aokvqa.pairwise.train", "chartqa.pairwise.dev",
                              "aokvqa.pairwise.dev")):
        released = [{"idx": i // 3, "question": p["question"], "chosen": p["chosen"], "rejected": p["rejected"],
                     "image": f"chartqa/img0_{i % 2}.png", "origin_dataset": name.split(".")[0]}
                    for i, p in enumerate(pairs[6 * k:6 * k + 6])]
        write_jsonl(hub / f"Share4oReasoning/dpo_data/dpo_preview/{name}.jsonl", released)
    shutil.copytree(model, root / "Open-LLaVA-NeXT-LLaMA3-8B")

    # each benchmark's released files, in its own layout (the converters' inputs), and COCO's images
    def chartqa(split, names):
        for n in names:
            recs = [{"imgname": f"{n}{i}.png", "query": qa[i]["question"], "label": "1"} for i in range(3)]
            for i, r in enumerate(recs):
                image(root / f"ChartQA/{split}/png/{r['imgname']}", i)
            write_json(root / f"ChartQA/{split}/{split}_{n}.json", recs)
    chartqa("train", ["human"])
    chartqa("test", ["human", "augmented"])
    for split in ("train", "val"):
        recs = [{"split": split, "image_id": i + 1, "question_id": f"{split}{i}", "question": "What is shown?",
                 "choices": ["a chart", "a cat", "a dog", "a car"], "correct_choice_idx": 0,
                 "direct_answers": ["a chart"] * 10} for i in range(3)]
        for r in recs:
            image(root / f"coco/{split}2017/{r['image_id']:012d}.jpg", r["image_id"])
        write_json(root / f"aokvqa/aokvqa_v1p0_{split}.json", recs)
    write_json(root / "DocVQA/val/val_v1.0.json", {"data": [
        {"questionId": i, "question": "what is the value?", "image": f"documents/d{i}.png", "answers": ["1"]}
        for i in range(2)]})
    write_json(root / "InfoVQA/infographicsVQA_val_v1.0_withQT.json", {"data": [
        {"questionId": i, "question": "which bar?", "image_local_name": f"i{i}.png", "answers": ["A"]}
        for i in range(2)]})
    write_json(root / "TextVQA/TextVQA_0.5.1_val.json", {"data": [
        {"question_id": i, "question": "what number?", "image_id": f"t{i}", "answers": ["1"] * 10}
        for i in range(2)]})
    for i in range(2):
        image(root / f"DocVQA/val/documents/d{i}.png", i)
        image(root / f"InfoVQA/infographicsvqa_images/i{i}.png", i)
        image(root / f"TextVQA/train_images/t{i}.jpg", i)
        image(root / f"ai2d/images/{i}.png", i)
        image(root / f"ScienceQA/test/{i}/image.png", i)
        image(root / f"MathVista/images/{i}.jpg", i)
        write_json(root / f"ai2d/questions/{i}.png.json", {"imageName": f"{i}.png", "questions": {
            "Which bar is largest?": {"answerTexts": ["A", "B", "C", "D"], "correctAnswer": 0,
                                      "questionId": f"{i}.png-0", "abcLabel": False}}})
    (root / "ai2d/ai2d_test_ids.csv").write_text("0\n1\n")
    write_json(root / "ScienceQA/problems.json", {str(i): {
        "question": "Which is largest?", "choices": ["A", "B"], "answer": 0, "hint": "", "image": "image.png",
        "split": "test"} for i in range(2)})
    write_json(root / "MathVista/testmini.json", {str(i): {
        "question": "What is the largest value?", "image": f"images/{i}.jpg", "choices": None, "unit": None,
        "precision": None, "answer": "6", "question_type": "free_form", "answer_type": "integer",
        "query": "Question: What is the largest value?"} for i in range(2)})
    write_json(root / "OCRBench/OCRBench.json", [{"dataset_name": "IIIT5K", "id": 0, "image_path": "IIIT5K/0.png",
                                                  "question": "what is written?", "answers": "A",
                                                  "type": "Regular Text Recognition"}])
    image(root / "OCRBench/IIIT5K/0.png")
    import base64
    b64 = base64.b64encode(open(pngs[0], "rb").read()).decode()
    (root / "MMStar.tsv").write_text("index\tquestion\tA\tB\tanswer\timage\n0\tWhich?\tx\ty\tA\t" + b64 + "\n")
    (root / "MMMU_DEV_VAL.tsv").write_text("index\tsplit\tquestion\tA\tB\tanswer\timage\n"
                                           "1\tvalidation\tWhich <image 1>?\tx\ty\tA\t" + b64 + "\n")

    # our own sampled pairs: a tiny random model's samples give none, so DPO on them trains on the teacher's
    standin = root / "standin_pairs"
    write_jsonl(standin / "pairs.jsonl", pairs[:12])
    write_jsonl(standin / "pairs.dev.jsonl", pairs[12:])

    # the launchers a reader has on the PATH
    bin_ = root / "bin"
    bin_.mkdir()
    for name in ("python", "python3"):                       # (a symlink would lose the venv)
        (bin_ / name).write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_ / "torchrun").write_text(f"#!{sys.executable}\n" + TORCHRUN)
    (bin_ / "hf").write_text(f"#!{sys.executable}\n" + HF.replace("HUB", repr(str(hub))))
    for f in ("python", "python3", "torchrun", "hf"):
        os.chmod(bin_ / f, 0o755)
    return {"root": root, "data": data, "standin": standin, "bin": bin_}


TORCHRUN = """import os, socket, sys
args = sys.argv[1:]
if "--rdzv-endpoint" not in args:                  # one node: a free port for the rendezvous
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        args = [f"--master_port={s.getsockname()[1]}"] + args
os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", *args])
"""
# hf download REPO [--repo-type dataset] --local-dir DIR: copies the stand-in hub's REPO
HF = """import shutil, sys
args = sys.argv[1:]
assert args[0] == "download", args
repo, dst = args[1], args[args.index("--local-dir") + 1]
shutil.copytree(HUB + "/" + repo, dst, dirs_exist_ok=True)
"""


def swap(cmd, w, url):
    """The command with paths and sizes swapped for the stand-ins; None when it is run elsewhere."""
    if any(re.match(p, cmd) for p in ELSEWHERE):
        return None
    rules = [
        (r"\$HEAD_NODE:29500", f"127.0.0.1:{free_port()}"), (r"--nnodes \d+", "--nnodes 1"),
        (r"--nproc_per_node \d+", "--nproc_per_node 2"),
        (r"(?<![\w/.-])((?:train_sft|train_dpo|sample|evaluate|distill)\.py)\b", rf"{ROOT}/\1"),
        (r"^bash bench/gpu_check\.sh", f"bash {ROOT}/bench/gpu_check.sh --dry --only env"),
        (r"(?<![\w/.-])demo/base_model\b", f"{ROOT}/demo/base_model"),
        (r"--pairs (runs|/shared)/\S+", f"--pairs {w['standin']}/pairs.jsonl"),
        (r"--dev-pairs (runs|/shared)/\S+", f"--dev-pairs {w['standin']}/pairs.dev.jsonl"),
        (r"(?<![\w.-])/shared/", f"{w['root']}/shared/"),
        (r"--n \d+", "--n 40"), (r"--max-steps \d+", "--max-steps 2"), (r"--epochs \d+", "--max-steps 2"),
        (r"--num-samples \d+", "--num-samples 2"),
        (r"--rerank \d+", "--rerank 2"), (r"--global-batch \d+", "--global-batch 4"),
        (r"--max-new-tokens \d+", "--max-new-tokens 12"), (r"--limit \d+", "--limit 8"),
        (r"--base-url \S+", f"--base-url {url}"), (r"--batch-size (32|16)\b", "--batch-size 4"),
    ]
    for pattern, repl in rules:
        cmd = re.sub(pattern, repl, cmd)
    if "train_dpo.py" in cmd and f"--pairs {w['standin']}" in cmd:          # the stand-in pairs' images
        cmd = re.sub(r"--image-root \S+", f"--image-root {w['data']}", cmd)
    if re.search(r"(sample|evaluate)\.py", cmd) and "--rescore" not in cmd and "--max-new-tokens" not in cmd:
        cmd += " --max-new-tokens 12"
    if "evaluate.py" in cmd and "--rescore" not in cmd and "--limit" not in cmd:
        cmd += " --limit 4"
    if "distill.py" in cmd and "--teacher openai" in cmd and "--base-url" not in cmd:
        cmd += f" --base-url {url}"
    launcher = cmd.split()[0]
    if launcher not in ("python", "torchrun", "hf", "mkdir", "for", "bash"):
        raise AssertionError(f"a doc command with an unknown launcher: {cmd}")
    return cmd


def test_every_command_of_the_readme_and_the_docs_runs_as_written(world):
    docs = {os.path.relpath(p, ROOT) for p in [os.path.join(ROOT, "README.md")] + [
        os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")]}
    assert docs <= set(DOCS), f"docs whose commands nobody runs: {sorted(docs - set(DOCS))}"
    readme = commands("README.md")
    assert any(c.startswith("torchrun") for c in readme) and any("sample.py" in c for c in readme)
    env = dict(os.environ, OPENAI_API_KEY="sk-test", PYTHONPATH=ROOT, HEAD_NODE="127.0.0.1",
               PATH=f"{world['bin']}:{os.environ['PATH']}")
    ran = set()
    with FakeOpenAI() as server:
        for doc in DOCS:
            for cmd in commands(doc):
                if cmd in ran:                           # the README repeats the guide's core: run once
                    continue
                ran.add(cmd)
                line = swap(cmd, world, server.url)
                if line is None:
                    continue
                t0 = time.time()
                out = subprocess.run(["bash", "-c", line], cwd=world["root"], env=env, capture_output=True,
                                     text=True, timeout=600)
                print(f"{time.time() - t0:5.1f}s  {doc}: {cmd[:100]}")
                assert out.returncode == 0, f"{doc}: a command failed:\n  {cmd}\nran as:\n  {line}\n" \
                                            f"{out.stdout[-1500:]}\n{out.stderr[-3000:]}"
    root = world["root"]
    # what the guide says it makes: the 9 sets trained on, the 8 benchmarks in one table
    manifest = json.load(open(root / "runs/8b/sft/manifest.json"))
    assert len(manifest["data"]) == len(SFT_FILES) == 26                 # the 9 sets' 26 files
    table = open(root / "eval/8b_dpo/results.md").read()
    for name in ("aokvqa", "chartqa", "docvqa", "infovqa", "textvqa", "ai2d", "sqa", "mathvista"):
        assert f"| {name} |" in table, table
    assert "| mode | A-OK | Chart | Doc | Info | Text | AI2D | SQA | MathV | Avg |" in table
    assert json.load(open(root / "eval/8b_dpo/results.json"))["paper_table"]["cot"]["Avg of"] == 8
    assert os.path.exists(root / "runs/8b/dpo_released/final/model.safetensors")
