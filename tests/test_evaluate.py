"""evaluate.py end to end on a tiny model, batching, resume, rescore, rerank; the benchmark converters."""

import argparse
import json
import os
from types import SimpleNamespace

import pytest
import torch

import evaluate
import sample
from data import convert
from data.collate import PairDataset, collate_pairs, per_sequence
from data.formats import FormatError
from model import LlavaNext, Processor
from model.generation import row_logprobs
from training.loop import pair_logps


def preds(out):
    return [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl"))]


def run(tiny, out, *extra, data=None):
    model, root, _ = tiny
    argv = ["--model", model, "--data", *(data or [os.path.join(root, "test.jsonl")]), "--image-root", root,
            "--out", str(out), "--max-new-tokens", "24", "--max-new-tokens-direct", "6", *extra]
    return evaluate.main(argv)


def test_batched_answers_equal_batch_size_one(tiny, tmp_path):
    run(tiny, tmp_path / "b1", "--mode", "cot", "--batch-size", "1", "--limit", "12")
    run(tiny, tmp_path / "b8", "--mode", "cot", "--batch-size", "8", "--limit", "12")
    one = {p["id"]: p["output"] for p in preds(tmp_path / "b1")}
    eight = {p["id"]: p["output"] for p in preds(tmp_path / "b8")}
    assert one == eight and len(one) == 12


def test_both_modes_table_and_resume(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "e"
    assert run(tiny, out, "--mode", "both", "--batch-size", "4") == 0
    rows = preds(out)
    n = sum(1 for _ in open(os.path.join(tiny[1], "test.jsonl")))
    assert len(rows) == 2 * n and {r["mode"] for r in rows} == {"direct", "cot"}
    assert all({"prompt", "output", "answer", "score", "format_ok"} <= set(r) for r in rows)
    assert rows[0]["prompt"].startswith("<image>\n")
    md = open(out / "results.md").read()
    assert "| synthetic count_above |" in md and "**Avg**" in md and "| dataset | direct | cot |" in md
    res = json.load(open(out / "results.json"))
    assert sum(v["cot"]["n"] for k, v in res["results"].items() if k.startswith("synthetic")) == n
    # a rerun generates nothing
    from model import LlavaNext
    monkeypatch.setattr(LlavaNext, "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("generated")))
    assert run(tiny, out, "--mode", "both") == 0
    assert len(preds(out)) == 2 * n
    assert "already done" in capsys.readouterr().out


def test_missing_image_fails_that_record_only(tiny, tmp_path):
    model, root, _ = tiny
    recs = [json.loads(line) for line in open(os.path.join(root, "test.jsonl"))][:4]
    recs[1]["image"] = "images/missing.png"
    path = tmp_path / "recs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert run(tiny, tmp_path / "e", "--mode", "direct", data=[str(path)]) == 0
    rows = {r["id"]: r for r in preds(tmp_path / "e")}
    assert "image not found" in rows[recs[1]["id"]]["error"] and len(rows) == 4
    results = json.load(open(tmp_path / "e/results.json"))["results"]
    assert sum(v["direct"]["failed"] for v in results.values()) == 1


def test_unknown_dataset_is_an_error_listing_the_known(tiny, tmp_path):
    path = tmp_path / "recs.jsonl"
    path.write_text(json.dumps({"id": "1", "image": None, "question": "q", "answers": ["a"], "choices": None,
                                "dataset": "vqav2"}) + "\n")
    with pytest.raises(FormatError, match=r"'dataset' is 'vqav2', not one of .*'chartqa'"):
        run(tiny, tmp_path / "e", data=[str(path)])


def test_rescore_recomputes_without_generating(tiny, tmp_path):
    out = tmp_path / "e"
    run(tiny, out, "--mode", "cot", "--limit", "3")
    rows = preds(out)
    rows[0]["output"] = "made up\n\n### Answer: " + rows[0]["gold"][0]
    rows[1]["output"] = "no marker here"
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert evaluate.main(["--out", str(out), "--rescore"]) == 0
    after = preds(out)
    assert after[0]["score"] == 1.0 and after[0]["format_ok"] and not after[1]["format_ok"]


def test_rerank_with_an_implicit_reward(tiny, tmp_path):
    model, root, _ = tiny
    out = tmp_path / "r"
    assert run(tiny, out, "--mode", "cot", "--limit", "3", "--rerank", "3", "--reward-model", model,
               "--reference", model) == 0
    rows = preds(out)
    assert {r["mode"] for r in rows} == set(evaluate.RERANK) and len(rows) == 12
    best = [r for r in rows if r["mode"] == "cot best-of-n"][0]
    assert len(best["samples"]) == 3 and best["rewards"] == [0.0, 0.0, 0.0]      # same model: reward 0
    assert all(set(r["by_n"]) == {"1", "2"} for r in rows)                        # 1, 2, 4, ... up to 3
    assert "DPO as a verifier on synthetic" in open(out / "results.md").read()


def test_two_processes_resume_a_killed_run_and_equal_one_process(tiny, tmp_path):
    """torchrun, 2 processes (gloo), images decoded in a DataLoader worker, resuming a killed 3-process run: its
    merged rows and a stale rank-2 part file (ending in a half-written line) are kept, not redone; each process
    answers every other record left; rank 0 merges. predictions.jsonl (in record order) and the results then equal
    one process's, and no part file is left. A missing image fails when planned, a truncated one (a
    readable header) in the worker."""
    import shutil
    from helpers import torchrun
    model, root, _ = tiny
    recs = [json.loads(line) for line in open(os.path.join(root, "test.jsonl"))][:9]
    images = tmp_path / "img"
    for r in recs:
        os.makedirs(images / os.path.dirname(r["image"]), exist_ok=True)
        shutil.copy(os.path.join(root, r["image"]), images / r["image"])
    recs[2]["image"] = "images/missing.png"
    (images / "images/truncated.png").write_bytes((images / recs[4]["image"]).read_bytes()[:120])
    recs[4]["image"] = "images/truncated.png"
    data = tmp_path / "recs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    argv = ["--model", model, "--data", str(data), "--image-root", str(images), "--mode", "both", "--batch-size", "2",
            "--max-new-tokens", "24", "--max-new-tokens-direct", "6"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert evaluate.main(argv + ["--out", str(one), "--workers", "0"]) == 0
    rows = preds(one)
    assert len(rows) == 18 and [r["id"] for r in rows[:4]] == [recs[0]["id"]] * 2 + [recs[1]["id"]] * 2
    assert "image not found" in rows[4]["error"] and "not a readable image" in rows[8]["error"]
    rows[0]["output"] = rows[11]["output"] = "kept, not redone"
    os.makedirs(two)
    shutil.copy(one / "manifest.json", two / "manifest.json")          # what the killed run had written first
    (two / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (two / "predictions.rank2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[9:12]) + '{"id": "')
    log = torchrun(argv + ["--out", str(two), "--workers", "1"], n=2, script="evaluate.py").stdout
    for rank in (0, 1):                    # 6 of 9 records left in each mode: every other one to each process
        assert f"[rank {rank}/2] direct: 3 of 6" in log and f"[rank {rank}/2] cot: 3 of 6" in log, log
    assert preds(two) == rows
    assert not [f for f in os.listdir(two) if f.startswith("predictions.rank")]
    assert (two / "results.md").read_text() == (one / "results.md").read_text()


# ------------------------------------------------------------------------------------------------ converters

SAMPLES = {
    "chartqa": ("test_human.json", [{"imgname": "10095.png", "query": "What is the peak value?", "label": "56.2"}]),
    "aokvqa": ("aokvqa_v1p0_val.json", [{"split": "val", "image_id": 461751, "question_id": "22jbM6gDxdaMaunuzgrsBB",
                                         "question": "What is in the motorcyclist's mouth?",
                                         "choices": ["toothpick", "food", "popsicle stick", "cigarette"],
                                         "correct_choice_idx": 3, "direct_answers": ["cigarette"] * 10,
                                         "difficult_direct_answer": False, "rationales": ["He is smoking."]}]),
    "docvqa": ("val_v1.0.json", {"dataset_name": "docvqa", "dataset_split": "val", "data": [
        {"questionId": 337, "question": "what is the date mentioned in this letter?",
         "image": "documents/xnbl0037_1.png", "docId": 279, "answers": ["1/8/93"], "data_split": "val"}]}),
    "infovqa": ("infographicsVQA_val_v1.0_withQT.json", {"data": [
        {"questionId": 98313, "question": "Which social platform has heavy female audience?",
         "image_local_name": "37313.jpeg", "answers": ["pinterest"], "answer_type": ["single span"]}]}),
    "textvqa": ("TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "question": "what is the brand of this camera?", "image_id": "003a8ae2ef43b901",
         "answers": ["nous les gosses", "dakota", "clos culombu"] + ["dakota digital"] * 7}]}),
    "sqa": ("problems.json", {"5": {"question": "Which of these states is farthest north?", "choices":
                                    ["West Virginia", "Louisiana", "Arizona", "Oklahoma"], "answer": 0,
                                    "hint": "", "image": "image.png", "split": "test"},
                              "6": {"question": "No image here", "choices": ["a", "b"], "answer": 1, "hint": "h",
                                    "image": None, "split": "test"}}),
    "mathvista": ("testmini.json", {"1": {"question": "When a spring does work on an object, we cannot find...",
                                          "image": "images/1.jpg", "choices": None, "unit": None, "precision": 1.0,
                                          "answer": "1.2", "question_type": "free_form", "answer_type": "float"},
                                    "2": {"question": "what is the total volume?", "image": "images/2.jpg",
                                          "choices": ["1000", "1500", "2000"], "answer": "1500",
                                          "question_type": "multi_choice", "answer_type": "text"}}),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_converters_on_hand_written_samples(name, tmp_path):
    fname, content = SAMPLES[name]
    path = tmp_path / fname
    path.write_text(json.dumps(content))
    recs = list(convert.CONVERTERS[name](str(path)))
    from data.formats import validate_qa
    for r in recs:
        validate_qa(dict(r), name)
    want = {
        "chartqa": dict(image="png/10095.png", answers=["56.2"], dataset="chartqa"),
        "aokvqa": dict(image="val2017/000000461751.jpg", answers=["D"], dataset="aokvqa"),
        "docvqa": dict(image="documents/xnbl0037_1.png", answers=["1/8/93"], dataset="docvqa"),
        "infovqa": dict(image="infographicsvqa_images/37313.jpeg", answers=["pinterest"], dataset="infovqa"),
        "textvqa": dict(image="train_images/003a8ae2ef43b901.jpg", dataset="textvqa"),
        "sqa": dict(image="test/5/image.png", answers=["A"], dataset="sqa"),
        "mathvista": dict(image="images/1.jpg", answers=["1.2"], dataset="mathvista"),
    }[name]
    assert {k: recs[0][k] for k in want} == want
    if name == "textvqa":
        assert len(recs[0]["answers"]) == 10
    if name == "sqa":
        assert len(recs) == 1                          # the image subset only
    if name == "mathvista":
        assert recs[0]["meta"]["precision"] == 1 and recs[1]["answers"] == ["B"] and recs[1]["choices"]


def test_ai2d_converter(tmp_path):
    q = tmp_path / "questions"
    q.mkdir()
    (q / "4.png.json").write_text(json.dumps({"imageName": "4.png", "questions": {
        "Which stage is shown at D?": {"abcLabel": True, "answerTexts": ["egg", "larva", "pupa", "adult"],
                                       "correctAnswer": 2, "questionId": "4.png-0"}}}))
    (q / "5.png.json").write_text(json.dumps({"imageName": "5.png", "questions": {}}))
    ids = tmp_path / "test_ids.csv"
    ids.write_text("4\n")
    recs = list(convert.ai2d(str(q), ids=str(ids)))
    assert recs == [{"id": "ai2d-4.png-0", "image": "images/4.png", "question": "Which stage is shown at D?",
                     "choices": ["egg", "larva", "pupa", "adult"], "answers": ["C"], "dataset": "ai2d"}]


def test_rerank_scores_a_response_exactly_as_dpo_training_does(tiny):
    """The verifier's log p of a sampled response equals train_dpo.py's for the same text as a pair's rejected
    answer: the same tokens (the paper's truncation, here to 5 words; no final end-of-turn token), the same sum."""
    model_dir, root, _ = tiny
    rec = json.loads(open(os.path.join(root, "test.jsonl")).readline())
    proc, model = Processor.from_pretrained(model_dir), LlavaNext.from_pretrained(model_dir).eval()
    texts = ["A is 6 > 4 yes 1 . B is 0 > 4 no 1 .\n\n### Answer: 1", "A is 6 ."]
    pv, sizes = proc.preprocess_images([proc.load_image(os.path.join(root, rec["image"]))])
    rows = evaluate.dpo_rows(rec, texts, proc, sizes, argparse.Namespace(image_root=root, truncate_words=5,
                                                                           template="llava"))
    ours = row_logprobs(model, rows, pv, sizes)
    eot = proc.tokenizer.token_to_id("<|eot_id|>")
    assert all(int(ids[-1]) != eot for ids, _ in rows) and int((rows[0][1] != -100).sum()) == 5
    pairs = [({"id": f"p{i}", "image": rec["image"], "question": sample.pair_question(rec), "chosen": "A is 1 .",
               "rejected": t}, "test") for i, t in enumerate(texts)]
    dataset = PairDataset(pairs, proc, root, truncate=5)
    batch = collate_pairs([dataset[0], dataset[1]])
    with torch.no_grad():
        to, lp = pair_logps(model, batch, SimpleNamespace(device=torch.device("cpu")))
    theirs = per_sequence(lp, to)[2:].tolist()                 # rows: the 2 chosen, then the 2 rejected
    assert ours == pytest.approx(theirs, abs=1e-5), (ours, theirs)


def test_benchmarks_in_their_own_image_roots_give_one_table(tiny, tmp_path):
    """--data A B C --image-root RA RB RC: each file's images under its own root, one results table with every
    benchmark and the paper's Table 3 row averaging those present; under torchrun the same table. One root for all
    files works too; a root count that is neither 1 nor the file count is refused before anything is written."""
    import shutil
    from helpers import torchrun
    model, root, _ = tiny
    recs = [json.loads(line) for line in open(os.path.join(root, "test.jsonl"))][:9]
    files, roots = [], []
    for k, name in enumerate(("chartqa", "docvqa", "textvqa")):
        img_root = tmp_path / f"{name}_images"
        part = [dict(r, id=f"{name}-{i}", dataset=name, image=f"{name}/{i}.png", choices=None)
                for i, r in enumerate(recs[3 * k:3 * k + 3])]
        for r, src in zip(part, recs[3 * k:3 * k + 3]):
            os.makedirs(img_root / name, exist_ok=True)
            shutil.copy(os.path.join(root, src["image"]), img_root / r["image"])
        path = tmp_path / f"{name}_test.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        files.append(str(path))
        roots.append(str(img_root))
    argv = ["--model", model, "--data", *files, "--mode", "both", "--max-new-tokens", "12",
            "--max-new-tokens-direct", "4", "--workers", "0"]
    assert evaluate.main(argv + ["--image-root", *roots, "--out", str(tmp_path / "one")]) == 0
    rows = preds(tmp_path / "one")
    assert len(rows) == 18 and not any(r.get("error") for r in rows)
    md = (tmp_path / "one" / "results.md").read_text()
    for name in ("chartqa", "docvqa", "textvqa"):
        assert f"| {name} |" in md
    assert "| mode | A-OK | Chart | Doc | Info | Text | AI2D | SQA | MathV | Avg |" in md
    paper = json.load(open(tmp_path / "one" / "results.json"))["paper_table"]
    assert paper["cot"]["Avg of"] == 3 and set(paper["cot"]) >= {"Chart", "Doc", "Text"}
    torchrun(argv + ["--image-root", *roots, "--out", str(tmp_path / "two")], n=2, script="evaluate.py")
    assert (tmp_path / "two" / "results.md").read_text() == md
    # one root for all: the images must then be where each record's path says, under it
    common = tmp_path / "all"
    for r in roots:
        shutil.copytree(r, common, dirs_exist_ok=True)
    assert evaluate.main(argv + ["--image-root", str(common), "--out", str(tmp_path / "shared")]) == 0
    assert (tmp_path / "shared" / "results.md").read_text() == md
    with pytest.raises(SystemExit):
        evaluate.main(argv + ["--image-root", *roots[:2], "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
