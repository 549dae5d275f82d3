"""train_dpo.py: the loss by hand, ln 2 at the start, gradients against plain torch, process-count and
precomputed-reference equivalence, exact resume, the token-reward page, a reward-accuracy gain, the reference cache,
the released pairs as released."""

import json
import math
import os

import pytest
import torch

import train_dpo
from data.collate import PairDataset, collate_pairs, per_sequence
from helpers import torchrun
from model import LlavaNext, Processor


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


def test_starts_at_ln2_with_zero_rewards(trained, tmp_path):
    train_dpo.main(dpo_args(trained, tmp_path / "d", "--max-steps", "1"))
    first = rows(tmp_path / "d")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-7
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margin"] == 0.0


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_gradients_match_plain_torch(trained, backend, monkeypatch):
    """The DPO loss through our fused log-probs (chunked torch or Triton) against logits -> log_softmax -> gather."""
    monkeypatch.setenv("LLAVA_KERNELS", backend)
    proc = Processor.from_pretrained(trained["sft"])
    pairs = [(json.loads(line), "x") for line in open(trained["pairs"])][:3]
    mb = collate_pairs([PairDataset(pairs, proc, trained["data"])[i] for i in range(3)])
    policy = LlavaNext.from_pretrained(trained["sft"])
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


def test_identical_pairs_are_dropped_and_an_all_skipped_step_says_why(trained, tmp_path, capsys):
    """A pair whose chosen equals the rejected (byte for byte, or once cut to 90 words) is dropped at load with a
    count; a step whose 8 pairs all lack their image logs the skip and its reason, not `loss 0.0000`."""
    good = [json.loads(line) for line in open(trained["pairs"])][:8]
    missing = [dict(p, id=f"m{k}", image="images/missing.png") for k, p in enumerate(good)]
    long = " ".join(f"w{i}" for i in range(95))
    same = [dict(good[0], id="same", rejected=good[0]["chosen"]),
            dict(good[0], id="same90", chosen=long + "\n\n### Answer: 6", rejected=long + "\n\n### Answer: 7")]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in missing + same))
    argv = dpo_args(trained, tmp_path / "d", "--max-steps", "1")
    argv[argv.index("--pairs") + 1] = str(path)
    assert train_dpo.main(argv) == 0
    out = capsys.readouterr().out
    assert "dropped 2 pairs whose chosen equals the rejected" in out
    (row,) = rows(tmp_path / "d")
    assert "loss" not in row and row["skipped"] == 8 and row["skip_reasons"] == {"image not found": 8}
    assert "step 1/1 | no pair trained: all 8 skipped (image not found: 8)" in out and "loss 0.0000" not in out
    assert "chosen equals rejected (dropped at load): 2" in out and "image not found: 8" in out


def test_two_processes_and_precomputed_reference_equal_one_live(trained, tmp_path):
    common = ["--max-steps", "4"]
    train_dpo.main(dpo_args(trained, tmp_path / "live", *common))
    train_dpo.main(dpo_args(trained, tmp_path / "pre", *common, "--precompute-ref"))
    args = dpo_args(trained, tmp_path / "ddp", *common)
    args[args.index("--batch-size") + 1] = "4"
    torchrun(args, script="train_dpo.py")
    live = [r["loss"] for r in rows(tmp_path / "live")]
    # tolerance 1e-4 on the loss: the step-1 losses agree exactly (ln 2), but 2 processes pad micro-batches of 4
    # (and the precomputed reference ran in other batch shapes), so float sums differ in the last bits, and AdamW's
    # first steps, which divide each gradient entry by its own magnitude, amplify that for entries near zero
    for other, tol in (("ddp", 1e-4), ("pre", 1e-4)):
        for a, b in zip(live, [r["loss"] for r in rows(tmp_path / other)]):
            assert abs(a - b) <= tol, (other, live)


def test_resume_is_exact(trained, tmp_path):
    import shutil
    common = ["--max-steps", "6", "--save-every", "3"]
    train_dpo.main(dpo_args(trained, tmp_path / "a", *common))
    train_dpo.main(dpo_args(trained, tmp_path / "b", *common))
    shutil.rmtree(tmp_path / "b" / "checkpoint-000006")       # as if killed before the final save
    (tmp_path / "b" / "latest").write_text("checkpoint-000003\n")
    assert train_dpo.main(dpo_args(trained, tmp_path / "b", *common, "--resume")) == 0
    assert [r["loss"] for r in rows(tmp_path / "a")] == [r["loss"] for r in rows(tmp_path / "b")]


def test_dpo_lifts_heldout_reward_accuracy_and_writes_the_audit_page(trained, tmp_path):
    out = tmp_path / "d"
    train_dpo.main(dpo_args(trained, out, "--max-steps", "40", "--dev-pairs", trained["dev"], "--audit-pairs", "3"))
    dev = [r for r in rows(out) if "dev/accuracy" in r][-1]
    # held-out pairs: at the start every reward is 0 (loss ln 2, margin 0, strict-win accuracy 0)
    assert dev["dev/loss"] < math.log(2) - 0.02 and dev["dev/margin"] > 0.02 and dev["dev/accuracy"] > 0.55, dev
    page = open(out / "token_rewards.html").read()
    assert page.count("<h3>") == 3 and "title='" in page and "rgba(" in page
    # every rejected chain's only error is its answer: DPO learned to push that token down (2 of the 3 chains,
    # where a token drawn at random would land about a quarter of the time)
    summary = json.load(open(out / "token_rewards.json"))
    assert summary["rejected_checked"] == 3 and summary["min_at_first_error"] >= 2 and summary["chance"] < 0.4, summary
    assert "have their most negative token at or right after" in page


def test_every_file_a_run_writes_is_0644(trained, tmp_path):
    """Weights, configs, metrics, the reference table, the token-reward page, the DCP state: plain 0644 files (the
    old safetensors writer left model.safetensors 0600, unreadable to the rest of a team), directories 0755."""
    import stat
    old = os.umask(0o022)
    try:
        out = tmp_path / "d"
        train_dpo.main(dpo_args(trained, out, "--max-steps", "1", "--precompute-ref", "--dev-pairs", trained["dev"],
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


def test_the_released_pairs_train_as_released(trained, tmp_path):
    """The authors' dpo_data rows: no "id", an "idx" that a question's pairs share, extra fields of their own. They
    load as released; each pair is known by its file and line (in the reference cache and the audit too), and the
    run equals the same pairs with unique ids."""
    ours = [json.loads(line) for line in open(trained["pairs"])][:16]
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
        a = dpo_args(trained, out, "--max-steps", "2", "--precompute-ref", *extra)
        a[a.index("--pairs") + 1] = str(pairs)
        return a
    assert train_dpo.main(args(path, tmp_path / "released", "--audit-pairs", "4")) == 0
    assert train_dpo.main(args(unique, tmp_path / "unique")) == 0
    assert [r["loss"] for r in rows(tmp_path / "released")] == [r["loss"] for r in rows(tmp_path / "unique")]
    table = torch.load(tmp_path / "released" / "reference_logps.pt", weights_only=True)["table"]
    assert sorted(table) == sorted(f"{path}:{n}" for n in range(1, 17))       # 16 pairs, 6 ids: keyed by line
    assert f"{path.name}:1" in open(tmp_path / "released" / "token_rewards.html").read()


def test_the_reference_cache_follows_the_weights_not_the_path(tiny, tmp_path):
    """--precompute-ref's cache key: a symlink re-pointed at another checkpoint, or weights rewritten in place, are
    another reference (the path alone kept the stale log-probs: a first loss of 0.72 instead of ln 2)."""
    import shutil
    from argparse import Namespace
    model = tiny[0]
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(model, a)
    shutil.copytree(model, b)
    (tmp_path / "sft").symlink_to(a)
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("{}\n")
    args = Namespace(model=str(tmp_path / "sft"), truncate_words=90, template="llava", pairs=[str(pairs)],
                     dev_pairs=None)
    key = train_dpo.reference_key(args)
    assert train_dpo.reference_key(args) == key
    (tmp_path / "sft").unlink()
    (tmp_path / "sft").symlink_to(b)
    assert train_dpo.reference_key(args) != key
    (tmp_path / "sft").unlink()
    (tmp_path / "sft").symlink_to(a)
    os.utime(a / "model.safetensors", (1, 1))                # the weights rewritten in place
    assert train_dpo.reference_key(args) != key
