"""sample.py: grading over all N samples, the accuracy window, pair building, step grading, resume that draws what
an uninterrupted run draws, rows of a question cut off by a kill, the dev share."""

import json
import os
import random
import zlib

import torch

import sample
from data.synthetic import teacher
from model import LlavaNext, Processor


def graded(right, wrong, unfinished, min_acc=0.25):
    """sample.grade_question on scripted samples of a chartqa question (gold 6): token k decodes to text k, EOS = 0 stops a
    sample; an unfinished one has no EOS. Returns (question log line, pairs)."""
    from types import SimpleNamespace
    texts = {1: "It reads 6.\n\n### Answer: 6"}
    samples = [[1, 0] for _ in range(right)]
    for j in range(wrong):
        texts[10 + j] = f"It reads {20 + j}.\n\n### Answer: {20 + j}"
        samples.append([10 + j, 0])
    for j in range(unfinished):
        texts[100 + j] = f"It reads {90 + j} and then on and"
        samples.append([100 + j] * 3)
    proc = SimpleNamespace(decode=lambda ids: "".join(texts[t] for t in ids))
    written = {"pairs": [], "rft": [], "questions": []}
    writers = {k: SimpleNamespace(write=lambda *rows, k=k: written[k].extend(rows)) for k in written}
    rec = {"id": "q", "image": None, "question": "What is B?", "answers": ["6"], "choices": None, "dataset": "chartqa"}
    args = SimpleNamespace(min_acc=min_acc, max_acc=0.85, pairs_per_question=3, seed=0, grade="outcome")
    stats = {"kept": 0, "too easy": 0, "too hard": 0, "pairs": 0, "bad image": 0, "dropped samples": 0}
    sample.grade_question(rec, samples, proc, {0}, set(), args, writers, stats)
    assert stats["dropped samples"] == unfinished
    return written["questions"][0], written["pairs"]


def test_sample_accuracy_counts_unfinished_samples_as_wrong():
    """The paper grades all N samples: 6 right + 18 wrong + 8 unfinished of 32 is 6/32 = 0.19, below the 0.25 window
    (not 6/24 = 0.25); unfinished samples are never rejected answers."""
    log, pairs = graded(6, 18, 8)
    assert log["accuracy"] == 6 / 32 and log["status"] == "too hard" and pairs == []
    assert log["dropped"] == 8 and log["samples"] == 32 and log["graded"] == 24
    log, pairs = graded(12, 12, 8)
    assert log["accuracy"] == 12 / 32 and log["status"] == "kept" and len(pairs) == 3
    assert all(p["chosen"].endswith("### Answer: 6") and "then on" not in p["rejected"] for p in pairs)
    log, pairs = graded(12, 0, 20)                  # in the window, but every wrong sample is cut off
    assert log["accuracy"] == 12 / 32 and log["status"] == "no pair" and pairs == []


def test_step_grading_turns_a_right_answer_with_a_wrong_step_into_a_rejected_one():
    """--grade steps on a synthetic counting question (gold 2): 4 chains with every step right, 4 with a misread bar
    that still reach 2, 4 with the answer wrong. Outcome grading: 8 of 12 right (0.67), the misread chains chosen
    answers too; step grading: 4 of 12 (0.33), the misread chains rejected answers; pairs carry the chart's data."""
    from types import SimpleNamespace
    rec = {"id": "q", "image": None, "question": "How many bars are larger than 4?", "answers": ["2"],
           "choices": None, "dataset": "synthetic", "meta": {"family": "count_above", "params": {"x": 4}, "chart": {
               "names": list("ABCD"), "values": [6, 3, 8, 1]}}}
    texts = {1: "A is 6 > 4 yes 1 . B is 3 > 4 no 1 . C is 8 > 4 yes 2 . D is 1 > 4 no 2 .\n\n### Answer: 2",
             2: "A is 6 > 4 yes 1 . B is 2 > 4 no 1 . C is 8 > 4 yes 2 . D is 1 > 4 no 2 .\n\n### Answer: 2",
             3: "A is 6 > 4 yes 1 . B is 5 > 4 yes 2 . C is 8 > 4 yes 3 . D is 1 > 4 no 3 .\n\n### Answer: 3"}
    samples = [[k, 0] for k in (1, 2, 3) for _ in range(4)]
    proc = SimpleNamespace(decode=lambda ids: "".join(texts[t] for t in ids))
    for grade, acc, rejected in (("outcome", 8 / 12, {texts[3]}), ("steps", 4 / 12, {texts[2], texts[3]})):
        written = {"pairs": [], "rft": [], "questions": []}
        writers = {k: SimpleNamespace(write=lambda *rows, k=k: written[k].extend(rows)) for k in written}
        args = SimpleNamespace(min_acc=0.25, max_acc=0.85, pairs_per_question=3, seed=0, grade=grade)
        stats = {"kept": 0, "too easy": 0, "too hard": 0, "pairs": 0, "bad image": 0, "dropped samples": 0}
        sample.grade_question(rec, samples, proc, {0}, set(), args, writers, stats)
        log = written["questions"][0]
        assert log["accuracy"] == acc and log["correct_with_wrong_steps"] == 4 and log["status"] == "kept", log
        assert {p["rejected"] for p in written["pairs"]} == rejected and all(
            p["meta"] == rec["meta"] for p in written["pairs"])
        assert {p["chosen"] for p in written["pairs"]} <= ({texts[1]} if grade == "steps" else {texts[1], texts[2]})


def test_pair_building_window_cap_determinism():
    correct, incorrect = [f"c{i}" for i in range(5)], [f"w{i}" for i in range(2)]
    a = sample.build_pairs(correct, incorrect, 3, random.Random(1))
    b = sample.build_pairs(correct, incorrect, 3, random.Random(1))
    assert a == b and len(a) == 3 and len(set(a)) == 3
    assert all(c.startswith("c") and r.startswith("w") for c, r in a)      # never two correct answers
    assert len({c for c, _ in a[:2]}) == 2 and len({r for _, r in a[:2]}) == 2   # distinct ones first
    assert sample.build_pairs(["c"], ["w"], 3, random.Random(0)) == [("c", "w")]
    assert sample.build_pairs(correct, [], 3, random.Random(0)) == []


def test_sample_py_windows_pairs_and_resumes(trained, tmp_path, monkeypatch):
    """Scripted generations (the sampler's mechanics; real sampling is tested in test_generation): 8 samples per
    question with 0, 3, 6 or 8 correct ones; the [0.25, 0.85] window keeps the middle two."""
    proc = Processor.from_pretrained(trained["sft"])
    recs = [json.loads(line) for line in open(os.path.join(trained["data"], "test.jsonl"))]
    recs = [r for r in recs if r["meta"]["family"] in ("lookup", "count_above")][:4]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    n_correct = {r["id"]: k for r, k in zip(recs, (0, 3, 6, 8))}
    eot = proc.token_id("<|eot_id|>")
    order = iter(recs)

    def fake_generate(self, ids, pv, sizes, *a, n=1, **k):
        rows = []
        for _ in range(ids.shape[0]):                          # n rows per prompt of the batch, in order
            rec = next(order)
            right = teacher(rec, random.Random(0))
            c = n_correct[rec["id"]]
            texts = [f"{j} {right}" for j in range(c)] + [right.rsplit("### Answer: ", 1)[0] +
                                                          f"### Answer: {990 + j}" for j in range(n - c)]
            rows += [proc.encode(t)[0] + [eot] for t in texts]     # distinct samples
        T = max(map(len, rows))
        return torch.tensor([r + [eot] * (T - len(r)) for r in rows])

    monkeypatch.setattr(LlavaNext, "generate", fake_generate)
    out = tmp_path / "pairs.jsonl"
    assert sample.main(["--model", trained["sft"], "--data", str(path), "--image-root", trained["data"], "--num-samples", "8",
                        "--out", str(out)]) == 0
    pairs = [json.loads(line) for line in open(out)]
    assert {p["source_id"] for p in pairs} == {recs[1]["id"], recs[2]["id"]}
    assert len(pairs) == 6 and all(p["accuracy"] in (3 / 8, 6 / 8) for p in pairs)
    assert all("### Answer : 99" in p["rejected"] and "### Answer : 99" not in p["chosen"] for p in pairs)
    assert set(pairs[0]) >= {"id", "image", "question", "chosen", "rejected"}
    rft = [json.loads(line) for line in open(tmp_path / "pairs.rft.jsonl")]
    assert rft and all(r["conversations"][1]["value"] in {p["chosen"] for p in pairs} for r in rft)
    status = [json.loads(line)["status"] for line in open(tmp_path / "pairs.questions.jsonl")]
    assert status == ["too hard", "kept", "kept", "too easy"]
    monkeypatch.setattr(LlavaNext, "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("resampled")))
    assert sample.main(["--model", trained["sft"], "--data", str(path), "--image-root", trained["data"], "--num-samples", "8",
                        "--out", str(out)]) == 0                                         # resume: nothing to do
    assert len(open(out).readlines()) == 6


def test_a_resumed_sampling_run_draws_what_an_uninterrupted_one_does(trained, tmp_path, monkeypatch):
    """Killed after question 3 of 5, inside the batch [q3, q4]: the resumed run samples q4 and q5 exactly as the
    straight run did, and writes the same files; a run with another batch size samples the same too."""
    recs = [json.loads(line) for line in open(os.path.join(trained["data"], "test.jsonl"))][:5]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    seen, grade_question = {}, sample.grade_question

    def record(rec, outs, proc, eos, *rest):            # each sample up to its stop token (the rest is padding)
        seen[rec["id"]] = [row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in outs]
        return grade_question(rec, outs, proc, eos, *rest)
    monkeypatch.setattr(sample, "grade_question", record)
    # graded by a hash of the text, so that questions land in the window and write pairs (the tiny model is never right)
    monkeypatch.setattr(sample, "grade", lambda rec, text: (text, float(zlib.crc32(text.encode()) % 2), True))
    out = tmp_path / "pairs.jsonl"
    argv = ["--model", trained["sft"], "--data", str(path), "--image-root", trained["data"], "--num-samples", "4", "--batch-size",
            "2", "--max-new-tokens", "48", "--out", str(out)]
    assert sample.main(argv) == 0
    straight = dict(seen)
    files = {name: open(tmp_path / name).read() for name in ("pairs.jsonl", "pairs.rft.jsonl", "pairs.questions.jsonl")}
    log = tmp_path / "pairs.questions.rank0.jsonl"                              # the process's own part file
    log.write_text("".join(files["pairs.questions.jsonl"].splitlines(True)[:3]))   # killed before q4's log line
    seen.clear()
    assert sample.main(argv) == 0
    assert sorted(seen) == sorted(r["id"] for r in recs[3:])
    assert all(seen[i] == straight[i] for i in seen)
    assert len({str(v) for v in straight.values()}) == 5                  # the samples do differ by question
    late = [json.loads(line)["source_id"] for line in files["pairs.jsonl"].splitlines()]
    assert set(late) & {r["id"] for r in recs[3:]}                       # pairs of q4/q5 outlived the log line
    assert {name: open(tmp_path / name).read() for name in files} == files        # ... and were not written twice
    seen.clear()                                           # another batch size draws the same samples per question
    argv[argv.index("--batch-size") + 1], argv[argv.index("--out") + 1] = "3", str(tmp_path / "b3" / "pairs.jsonl")
    assert sample.main(argv) == 0
    assert seen == straight


def test_rows_of_a_question_without_its_log_line_are_dropped_on_resume(tmp_path):
    paths = {"pairs": str(tmp_path / "p.jsonl"), "rft": str(tmp_path / "p.rft.jsonl")}
    pair = lambda q, k: {"id": f"{q}-p{k}", "source_id": q, "chosen": "c", "rejected": "r"}     # noqa: E731
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(pair(q, k)) + "\n" for q in ("a-1", "b-p2") for k in (0, 1)))
    (tmp_path / "p.rft.jsonl").write_text(json.dumps({"id": "a-1-rft0"}) + "\n" + json.dumps({"id": "b-p2-rft0"})
                                          + "\n" + '{"id": "b-p2-rf')                         # a half-written tail
    sample.drop_orphans(paths, {"a-1"})
    assert [json.loads(line)["source_id"] for line in open(paths["pairs"])] == ["a-1", "a-1"]
    assert [json.loads(line)["id"] for line in open(paths["rft"])] == ["a-1-rft0"]


def test_a_dev_share_of_the_questions_is_held_out_whole(tmp_path):
    """--dev-share: every pair of a held-out question goes to PAIRS.dev.jsonl, its RFT rows nowhere; the split is
    fixed by the seed, whatever the process count that wrote the parts."""
    base = str(tmp_path / "pairs")
    records = [{"id": f"q{i}"} for i in range(200)]
    for rank in (0, 1):
        paths = sample.part_paths(base, rank)
        mine = records[rank::2]
        with open(paths["pairs"], "w") as f:
            f.writelines(json.dumps({"id": f"{r['id']}-p{k}", "source_id": r["id"]}) + "\n" for r in mine
                         for k in range(2))
        with open(paths["rft"], "w") as f:
            f.writelines(json.dumps({"id": f"{r['id']}-rft0"}) + "\n" for r in mine)
        with open(paths["questions"], "w") as f:
            f.writelines(json.dumps({"id": r["id"], "status": "kept"}) + "\n" for r in mine)
    sample.merge(base + ".jsonl", base, records, dev_share=0.1, seed=0)
    train = [json.loads(line)["source_id"] for line in open(base + ".jsonl")]
    dev = [json.loads(line)["source_id"] for line in open(base + ".dev.jsonl")]
    rft = [json.loads(line)["id"].rsplit("-rft", 1)[0] for line in open(base + ".rft.jsonl")]
    assert 8 <= len(set(dev)) <= 35 and not set(dev) & set(train) and len(train) + len(dev) == 400
    assert set(rft) == set(train) and train == sorted(train, key=lambda q: int(q[1:]))
    assert len(open(base + ".questions.jsonl").readlines()) == 200
    sample.merge(base + ".jsonl", base, records, dev_share=0.1, seed=1)
    assert [json.loads(line)["source_id"] for line in open(base + ".dev.jsonl")] != dev
