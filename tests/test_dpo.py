"""DPO: the loss by hand, ln 2 at the start, gradients against plain torch, pair building, truncation, process-count
and precomputed-reference equivalence, exact resume, the token-reward page, and a reward-accuracy gain."""

import json
import math
import os
import random
import zlib

import pytest
import torch

import sample
import train_dpo
import train_sft
from helpers import build_tiny_model_dir
from data.collate import PairDataset, collate_pairs, per_sequence, truncate_words
from data.synthetic import teacher
from model import LlavaNext, Processor
from helpers import torchrun


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny SFT model (300 steps on the synthetic task) and teacher-made pairs: chosen = a correct rationale,
    rejected = the same steps with a wrong final answer (so preferring the chosen is learnable from the text)."""
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


def dpo_args(s, out, *extra):
    return ["--model", s["sft"], "--pairs", s["pairs"], "--image-root", s["data"], "--out", str(out), "--workers",
            "0", "--batch-size", "8", "--global-batch", "8", "--lr", "1e-3", *extra]


def rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_loss_by_hand():
    """pc=-10, pr=-12, rc=rr=-11, beta=0.1: rewards +0.1 / -0.1, z = 0.2,
    loss = log(1 + e^-0.2) = 0.5981388693; with label smoothing 0.1: 0.9 * 0.5981389 + 0.1 * log(1 + e^0.2)
    = 0.5383249824 + 0.0798138869 = 0.6181388693."""
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    loss, rc, rr = train_dpo.dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), 0.1)
    assert loss.item() == pytest.approx(0.5981388693, abs=1e-9)
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)
    smooth, _, _ = train_dpo.dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), 0.1, label_smoothing=0.1)
    assert smooth.item() == pytest.approx(0.6181388693, abs=1e-9)


def test_starts_at_ln2_with_zero_rewards(setup, tmp_path):
    train_dpo.main(dpo_args(setup, tmp_path / "d", "--max-steps", "1"))
    first = rows(tmp_path / "d")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-7
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margin"] == 0.0


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_gradients_match_plain_torch(setup, backend, monkeypatch):
    """The DPO loss through our fused log-probs (chunked torch or Triton) against logits -> log_softmax -> gather."""
    monkeypatch.setenv("LLAVA_KERNELS", backend)
    proc = Processor.from_pretrained(setup["sft"])
    pairs = [(json.loads(line), "x") for line in open(setup["pairs"])][:3]
    mb = collate_pairs([PairDataset(pairs, proc, setup["data"])[i] for i in range(3)])
    policy = LlavaNext.from_pretrained(setup["sft"])
    policy.requires_grad_(True)
    policy.freeze_unused()
    ref_c, ref_r = torch.tensor([-30.0, -28.0, -33.0]), torch.tensor([-31.0, -27.0, -30.0])

    def grads(fused):
        policy.zero_grad()
        args = (mb["input_ids"], mb["pixel_values"], mb["image_sizes"], mb["attention_mask"])
        if fused:
            lp = policy(*args, targets=mb["targets"], image_repeat=2)
        else:
            logits = policy(*args, image_repeat=2).float()
            tgt = mb["targets"]
            lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * (tgt != -100)
        seq = per_sequence(lp, mb)
        train_dpo.dpo_loss(seq[:3], seq[3:], ref_c, ref_r, 0.1)[0].mean().backward()
        return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    ours, plain = grads(True), grads(False)
    assert ours.keys() == plain.keys() and len(ours) > 10
    for n in ours:
        torch.testing.assert_close(ours[n], plain[n], atol=2e-6, rtol=1e-4, msg=n)


def grade_question(right, wrong, unfinished, min_acc=0.25):
    """sample.handle on scripted samples of one chartqa question (gold 6): token k decodes to text k, EOS = 0 stops a
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
    sample.handle(rec, samples, proc, {0}, set(), args, writers, stats)
    assert stats["dropped samples"] == unfinished
    return written["questions"][0], written["pairs"]


def test_sample_accuracy_counts_unfinished_samples_as_wrong():
    """The paper grades all N samples: 6 right + 18 wrong + 8 unfinished of 32 is 6/32 = 0.19, below the 0.25 window
    (not 6/24 = 0.25); unfinished samples are never rejected answers."""
    log, pairs = grade_question(6, 18, 8)
    assert log["accuracy"] == 6 / 32 and log["status"] == "too hard" and pairs == []
    assert log["dropped"] == 8 and log["samples"] == 32 and log["graded"] == 24
    log, pairs = grade_question(12, 12, 8)
    assert log["accuracy"] == 12 / 32 and log["status"] == "kept" and len(pairs) == 3
    assert all(p["chosen"].endswith("### Answer: 6") and "then on" not in p["rejected"] for p in pairs)
    log, pairs = grade_question(12, 0, 20)                  # in the window, but every wrong sample is cut off
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
        sample.handle(rec, samples, proc, {0}, set(), args, writers, stats)
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


def test_sample_py_windows_pairs_and_resumes(setup, tmp_path, monkeypatch):
    """Scripted generations (the sampler's mechanics; real sampling is tested in test_generation): 8 samples per
    question with 0, 3, 6 or 8 correct ones; the [0.25, 0.85] window keeps the middle two."""
    proc = Processor.from_pretrained(setup["sft"])
    recs = [json.loads(line) for line in open(os.path.join(setup["data"], "test.jsonl"))]
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
    assert sample.main(["--model", setup["sft"], "--data", str(path), "--image-root", setup["data"], "--num-samples", "8",
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
    assert sample.main(["--model", setup["sft"], "--data", str(path), "--image-root", setup["data"], "--num-samples", "8",
                        "--out", str(out)]) == 0                                         # resume: nothing to do
    assert len(open(out).readlines()) == 6


def test_a_resumed_sampling_run_draws_what_an_uninterrupted_one_does(setup, tmp_path, monkeypatch):
    """Killed after question 3 of 5, inside the batch [q3, q4]: the resumed run samples q4 and q5 exactly as the
    straight run did, and writes the same files; a run with another batch size samples the same too."""
    recs = [json.loads(line) for line in open(os.path.join(setup["data"], "test.jsonl"))][:5]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    seen, handle = {}, sample.handle

    def record(rec, outs, proc, eos, *rest):            # each sample up to its stop token (the rest is padding)
        seen[rec["id"]] = [row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in outs]
        return handle(rec, outs, proc, eos, *rest)
    monkeypatch.setattr(sample, "handle", record)
    # graded by a hash of the text, so that questions land in the window and write pairs (the tiny model is never right)
    monkeypatch.setattr(sample, "grade", lambda rec, text: (text, float(zlib.crc32(text.encode()) % 2), True))
    out = tmp_path / "pairs.jsonl"
    argv = ["--model", setup["sft"], "--data", str(path), "--image-root", setup["data"], "--num-samples", "4", "--batch-size",
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


def test_truncation_keeps_k_words_drops_eot_and_masks_the_prompt(setup):
    proc = Processor.from_pretrained(setup["sft"])
    words = " ".join(f"w{i}" for i in range(120))
    pair = {"id": "x", "image": None, "question": "Q ?", "chosen": words, "rejected": "short answer"}
    ds = PairDataset([(pair, "x")], proc, setup["data"], truncate=90)
    item = ds[0]
    ids, tgt = item["chosen"]
    trained = [t for t in tgt.tolist() if t != -100]
    assert len(trained) == 90                               # one (unknown-word) token per word here
    assert proc.token_id("<|eot_id|>") not in trained and ids[-1].item() != proc.token_id("<|eot_id|>")
    prompt_len = (tgt != -100).nonzero()[0, 0].item() + 1
    assert proc.token_id("<|end_header_id|>") in ids[:prompt_len].tolist()
    assert len(PairDataset([(pair, "x")], proc, setup["data"], truncate=0)[0]["chosen"][1].ne(-100).nonzero()) == 120


def test_identical_pairs_are_dropped_and_an_all_skipped_step_says_why(setup, tmp_path, capsys):
    """A pair whose chosen equals the rejected (byte for byte, or once cut to 90 words) is dropped at load with a
    count; a step whose 8 pairs all lack their image logs the skip and its reason, not `loss 0.0000`."""
    good = [json.loads(line) for line in open(setup["pairs"])][:8]
    missing = [dict(p, id=f"m{k}", image="images/missing.png") for k, p in enumerate(good)]
    long = " ".join(f"w{i}" for i in range(95))
    same = [dict(good[0], id="same", rejected=good[0]["chosen"]),
            dict(good[0], id="same90", chosen=long + "\n\n### Answer: 6", rejected=long + "\n\n### Answer: 7")]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in missing + same))
    argv = dpo_args(setup, tmp_path / "d", "--max-steps", "1")
    argv[argv.index("--pairs") + 1] = str(path)
    assert train_dpo.main(argv) == 0
    out = capsys.readouterr().out
    assert "dropped 2 pairs whose chosen equals the rejected" in out
    (row,) = rows(tmp_path / "d")
    assert "loss" not in row and row["skipped"] == 8 and row["skip_reasons"] == {"image not found": 8}
    assert "step 1/1 | no pair trained: all 8 skipped (image not found: 8)" in out and "loss 0.0000" not in out
    assert "chosen equals rejected (dropped at load): 2" in out and "image not found: 8" in out


def test_two_processes_and_precomputed_reference_equal_one_live(setup, tmp_path):
    common = ["--max-steps", "4"]
    train_dpo.main(dpo_args(setup, tmp_path / "live", *common))
    train_dpo.main(dpo_args(setup, tmp_path / "pre", *common, "--precompute-ref"))
    args = dpo_args(setup, tmp_path / "ddp", *common)
    args[args.index("--batch-size") + 1] = "4"
    torchrun(args, script="train_dpo.py")
    live = [r["loss"] for r in rows(tmp_path / "live")]
    # tolerance 1e-4 on the loss: the step-1 losses agree exactly (ln 2), but 2 processes pad micro-batches of 4
    # (and the precomputed reference ran in other batch shapes), so float sums differ in the last bits, and AdamW's
    # first steps, which divide each gradient entry by its own magnitude, amplify that for entries near zero
    for other, tol in (("ddp", 1e-4), ("pre", 1e-4)):
        for a, b in zip(live, [r["loss"] for r in rows(tmp_path / other)]):
            assert abs(a - b) <= tol, (other, live)


def test_resume_is_exact(setup, tmp_path):
    import shutil
    common = ["--max-steps", "6", "--save-every", "3"]
    train_dpo.main(dpo_args(setup, tmp_path / "a", *common))
    train_dpo.main(dpo_args(setup, tmp_path / "b", *common))
    shutil.rmtree(tmp_path / "b" / "checkpoint-000006")       # as if killed before the final save
    (tmp_path / "b" / "latest").write_text("checkpoint-000003\n")
    assert train_dpo.main(dpo_args(setup, tmp_path / "b", *common, "--resume")) == 0
    assert [r["loss"] for r in rows(tmp_path / "a")] == [r["loss"] for r in rows(tmp_path / "b")]


def test_dpo_lifts_heldout_reward_accuracy_and_writes_the_audit_page(setup, tmp_path):
    out = tmp_path / "d"
    train_dpo.main(dpo_args(setup, out, "--max-steps", "40", "--dev-pairs", setup["dev"], "--audit-pairs", "3"))
    dev = [r for r in rows(out) if "dev/accuracy" in r][-1]
    # held-out pairs: at the start every reward is 0 (loss ln 2, margin 0, strict-win accuracy 0)
    assert dev["dev/loss"] < math.log(2) - 0.02 and dev["dev/margin"] > 0.02 and dev["dev/accuracy"] > 0.55, dev
    page = open(out / "token_rewards.html").read()
    assert page.count("<h3>") == 3 and "title='" in page and "rgba(" in page
    # every rejected chain's only error is its answer: DPO learned to push that token down (2 of the 3 chains,
    # where a token drawn at random would land about a quarter of the time)
    audit = json.load(open(out / "token_rewards.json"))
    assert audit["rejected_checked"] == 3 and audit["min_at_first_error"] >= 2 and audit["chance"] < 0.4, audit
    assert "have their most negative token at or right after" in page


def test_error_window_is_the_first_wrong_step_and_the_token_after_it(setup):
    from model import Processor
    proc = Processor.from_pretrained(setup["sft"])
    meta = {"family": "count_above", "params": {"x": 4}, "chart": {"names": list("ABCD"), "values": [6, 3, 8, 1]}}
    text = "A is 6 > 4 yes 1 . B is 5 > 4 yes 2 . C is 8 > 4 yes 3 . D is 1 > 4 no 3 .\n\n### Answer: 3"
    toks = proc.tokenizer.encode(text, add_special_tokens=False).ids
    words = [proc.decode([t]) for t in toks]
    window = train_dpo.error_window(meta, toks, proc)
    assert [words[j] for j in window] == "B is 5 > 4 yes 2 . C".split(), [words[j] for j in window]
    right = text.replace("B is 5 > 4 yes 2", "B is 3 > 4 no 1").replace("yes 3", "yes 2").replace("no 3", "no 2")
    toks = proc.tokenizer.encode(right, add_special_tokens=False).ids         # steps right, the answer wrong
    assert [proc.decode([t]) for t in (toks[j] for j in train_dpo.error_window(meta, toks, proc))] == \
        ["###", "Answer", ":", "3"]


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


def test_every_file_a_run_writes_is_0644(setup, tmp_path):
    """Weights, configs, metrics, the reference table, the token-reward page, the DCP state: plain 0644 files (the
    old safetensors writer left model.safetensors 0600, unreadable to the rest of a team), directories 0755."""
    import stat
    old = os.umask(0o022)
    try:
        out = tmp_path / "d"
        train_dpo.main(dpo_args(setup, out, "--max-steps", "1", "--precompute-ref", "--dev-pairs", setup["dev"],
                                "--audit-pairs", "1"))
    finally:
        os.umask(old)
    modes = {}
    for top, dirs, files in os.walk(out):
        for name in dirs + files:
            path = os.path.join(top, name)
            if not os.path.islink(path):
                modes[os.path.relpath(path, out)] = stat.S_IMODE(os.stat(path).st_mode)
    kinds = {os.path.splitext(p)[1] for p in modes}
    assert {".safetensors", ".json", ".jsonl", ".html", ".pt", ".distcp"} <= kinds, kinds
    wrong = {p: oct(m) for p, m in modes.items() if m != (0o755 if os.path.isdir(out / p) else 0o644)}
    assert not wrong, wrong


def test_the_released_pairs_train_as_released(setup, tmp_path):
    """The authors' dpo_data rows: no "id", an "idx" that a question's pairs share, extra fields of their own. They
    load as released; each pair is known by its file and line (in the reference cache and the audit too), and the
    run equals the same pairs with unique ids."""
    ours = [json.loads(line) for line in open(setup["pairs"])][:16]
    released = []
    for k, p in enumerate(ours):
        row = {"idx": k // 3, "question": p["question"], "chosen": p["chosen"], "rejected": p["rejected"],
               "image": p["image"], "origin_dataset": "synthetic", "orig_idx": k // 3, "ds_name": "synthetic"}
        released.append(row)
    released[5].pop("idx")                                     # an id is optional, not only shared
    path = tmp_path / "chartqa.pairwise.train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in released))
    unique = tmp_path / "unique.jsonl"
    unique.write_text("".join(json.dumps(dict(p, id=f"q{k}")) + "\n" for k, p in enumerate(ours)))

    def args(pairs, out, *extra):
        a = dpo_args(setup, out, "--max-steps", "2", "--precompute-ref", *extra)
        a[a.index("--pairs") + 1] = str(pairs)
        return a
    assert train_dpo.main(args(path, tmp_path / "released", "--audit-pairs", "4")) == 0
    assert train_dpo.main(args(unique, tmp_path / "unique")) == 0
    assert [r["loss"] for r in rows(tmp_path / "released")] == [r["loss"] for r in rows(tmp_path / "unique")]
    table = torch.load(tmp_path / "released" / "reference_logps.pt", weights_only=True)["table"]
    assert sorted(table) == sorted(f"{path}:{n}" for n in range(1, 17))       # 16 pairs, 6 ids: keyed by line
    assert f"{path.name}:1" in open(tmp_path / "released" / "token_rewards.html").read()
