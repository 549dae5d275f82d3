"""data/collate.py: rows and pairs to batches: the paper trainer's truncation, the labels, the seed-fixed share of a
file."""

import json
import os

import pytest

from data.collate import PairDataset, truncate_words
from model import Processor


def test_truncation_is_the_paper_trainers_cut():
    """run_dpo.py's maybe_truncate (LLaVA-Reasoner-DPO): pieces = text.split(' '); k > 1 keeps the first k pieces only
    when there are more, so a short response stays byte for byte; 0 < k <= 1 keeps max(int(k * n), 90) pieces."""
    short = "The bar for B reads 6.\nSo the answer is 6.\n\n### Answer: 6"      # 12 pieces: '6.\nSo', '6.\n\n###'
    assert truncate_words(short, 90) == short and truncate_words(short, 12) == short
    assert truncate_words(short, 11) == "The bar for B reads 6.\nSo the answer is 6.\n\n### Answer:"
    assert truncate_words(short, 10) == "The bar for B reads 6.\nSo the answer is 6.\n\n###"
    assert truncate_words(short, 0) == short
    body = " ".join(f"w{i}" for i in range(95))
    long = body + "\n\n### Answer: 6"                                             # 97 pieces
    assert truncate_words(long, 90) == " ".join(f"w{i}" for i in range(90))
    assert truncate_words(long, 95) == body + "\n\n###" and truncate_words(long, 96) == body + "\n\n### Answer:"
    assert truncate_words(long, 97) == long
    # double spaces and newlines: an empty piece counts as a piece, a newline does not split
    assert truncate_words("a  b\nc d", 2) == "a " and truncate_words("a  b\nc d", 3) == "a  b\nc"
    assert truncate_words("a  b\nc d", 4) == "a  b\nc d"
    assert truncate_words(long, 90.7) == truncate_words(long, 90)                     # int(k)
    # a share: max(int(k * n), 90) pieces
    many = " ".join(f"w{i}" for i in range(300))
    assert truncate_words(many, 0.5) == " ".join(f"w{i}" for i in range(150))
    assert truncate_words(long, 0.5) == " ".join(f"w{i}" for i in range(90))        # int(48.5) < 90: 90 pieces
    assert truncate_words(short, 0.5) == short and truncate_words(many, 1) == many
    with pytest.raises(ValueError):
        truncate_words(short, -1)


def test_truncation_keeps_k_words_drops_eot_and_masks_the_prompt(trained):
    proc = Processor.from_pretrained(trained["sft"])
    words = " ".join(f"w{i}" for i in range(120))
    pair = {"id": "x", "image": None, "question": "Q ?", "chosen": words, "rejected": "short answer"}
    ds = PairDataset([(pair, "x")], proc, trained["data"], truncate=90)
    item = ds[0]
    ids, tgt = item["chosen"]
    kept = [t for t in tgt.tolist() if t != -100]
    assert len(kept) == 90                                  # one (unknown-word) token per word here
    assert proc.token_id("<|eot_id|>") not in kept and ids[-1].item() != proc.token_id("<|eot_id|>")
    prompt_len = (tgt != -100).nonzero()[0, 0].item() + 1
    assert proc.token_id("<|end_header_id|>") in ids[:prompt_len].tolist()
    assert len(PairDataset([(pair, "x")], proc, trained["data"], truncate=0)[0]["chosen"][1].ne(-100).nonzero()) == 120


def test_ratio_share_depends_on_the_seed_and_file_name_not_its_directory(tmp_path):
    from data.collate import load_rows
    rows = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
            for i in range(40)]
    for d in ("a", "b/c"):
        os.makedirs(tmp_path / d)
        with open(tmp_path / d / "rows.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    pick = lambda d, seed: [r["id"] for r, _ in load_rows([str(tmp_path / d / "rows.jsonl")], [0.5], seed)]  # noqa
    assert len(pick("a", 0)) == 20 and len(set(pick("a", 0))) == 20
    assert pick("a", 0) == pick("b/c", 0)                 # a moved or differently named directory: the same rows
    assert pick("a", 0) != pick("a", 1)
    twice = [r["id"] for r, _ in load_rows([str(tmp_path / "a" / "rows.jsonl")], [2.0])]
    assert sorted(twice) == sorted([r["id"] for r in rows] * 2)
