"""train_sft.py on a tiny model (CPU): learning, equivalence across process counts, exact resume, packing, freezing
and per-module learning rates, mixed text-only / image ranks, bad data, a step whose samples were all skipped."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_sft
from helpers import ROOT, assert_close, sft_args, torchrun
from model import LlavaNext, Processor
from training.checkpoint import checkpoints


def losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]


def weights(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_loss_falls_and_transformers_loads_the_checkpoint(tiny, tmp_path):
    from transformers import LlavaNextForConditionalGeneration
    out = tmp_path / "run"
    assert train_sft.main(sft_args(tiny, out, "--max-steps", "30", "--batch-size", "8", "--lr", "3e-3")) == 0
    curve = losses(out)
    assert len(curve) == 30 and sum(curve[-5:]) / 5 < 0.75 * sum(curve[:5]) / 5
    ours = LlavaNext.from_pretrained(str(out / "final")).eval()
    hf = LlavaNextForConditionalGeneration.from_pretrained(str(out / "final")).eval()
    proc = Processor.from_pretrained(str(out / "final"))
    rows = [json.loads(line) for line in open(tiny[2])][:3]
    imgs = [proc.load_image(os.path.join(tiny[1], r["image"])) for r in rows]
    px, sizes = proc.preprocess_images(imgs)
    seqs = [proc.tokenize(r["conversations"], sizes[i:i + 1])[0] for i, r in enumerate(rows)]
    T = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    with torch.no_grad():
        assert_close(ours(ids, px, sizes, mask), hf(input_ids=ids, pixel_values=px, image_sizes=sizes,
                                                     attention_mask=mask).logits, 1e-4, "our checkpoint in transformers")


def test_two_processes_equal_one(tiny, tmp_path):
    """Same global batch (4) three ways: 1 process x 4, 1 process x 2 x accumulation 2, 2 processes x 2 (DDP; FSDP2
    is rehearsed with 4 processes in test_rehearsal.py). Tolerance: losses to 1e-6 relative, weights to 1e-5 after 6
    AdamW steps (fp32 summation order only)."""
    common = ["--max-steps", "6", "--lr", "3e-3"]
    one, accum, two = tmp_path / "one", tmp_path / "accum", tmp_path / "two"
    train_sft.main(sft_args(tiny, one, *common, "--batch-size", "4"))
    train_sft.main(sft_args(tiny, accum, *common, "--batch-size", "2", "--grad-accum", "2"))
    torchrun(sft_args(tiny, two, *common, "--batch-size", "2"))
    for other in (accum, two):
        for a, b in zip(losses(one), losses(other)):
            assert abs(a - b) <= 1e-6 * abs(a), (losses(one), losses(other))
        assert max_diff(weights(one), weights(other)) <= 1e-5


def test_killed_run_resumes_exactly(tiny, tmp_path):
    common = ["--max-steps", "40", "--batch-size", "4", "--lr", "3e-3", "--save-every", "2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train_sft.main(sft_args(tiny, straight, *common))
    proc = subprocess.Popen([sys.executable, "-u", "train_sft.py", *sft_args(tiny, killed, *common)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:                        # killed the moment the first checkpoint is reported
        if line.startswith("saved "):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    resumed_at = int(checkpoints(str(killed))[-1].rsplit("-", 1)[1])
    assert resumed_at < 40, "the run finished before the kill: nothing was resumed"
    assert train_sft.main(sft_args(tiny, killed, *common, "--resume")) == 0
    assert losses(killed) == losses(straight)       # bit for bit
    assert max_diff(weights(straight), weights(killed)) == 0


def test_packed_and_padded_batches_give_the_same_loss(tiny):
    from data.collate import SFTDataset, collate, load_rows
    model_dir, data, sft = tiny
    proc = Processor.from_pretrained(model_dir)
    model = LlavaNext.from_pretrained(model_dir).eval()
    ds = SFTDataset(load_rows([sft])[:6], proc, data)
    samples = [ds[i] for i in range(6)]
    with torch.no_grad():
        padded = collate(samples, pack=False)
        lp_pad = model(padded["input_ids"], padded["pixel_values"], padded["image_sizes"], padded["attention_mask"],
                       targets=padded["targets"])
        packed = collate(samples, pack=True)
        lp_pack = model(packed["input_ids"], packed["pixel_values"], packed["image_sizes"],
                        cu_seqlens=packed["cu_seqlens"], max_seqlen=packed["max_seqlen"], targets=packed["targets"])
    assert padded["supervised"] == packed["supervised"] > 0
    torch.testing.assert_close(lp_pack.sum(), lp_pad.sum(), rtol=1e-6, atol=1e-4)


def test_frozen_modules_and_per_module_learning_rates(tiny, tmp_path):
    out = tmp_path / "run"
    train_sft.main(sft_args(tiny, out, "--max-steps", "3", "--batch-size", "4", "--lr", "1e-4", "--projector-lr",
                            "1e-3", "--freeze-vision"))
    base, after = load_file(os.path.join(tiny[0], "model.safetensors")), weights(out)
    vision = [k for k in base if k.startswith("vision_tower.")]
    assert vision and all(torch.equal(base[k], after[k]) for k in vision)
    state = json.load(open(out / "final" / "trainer_state.json"))
    lrs = {g["name"]: g["base_lr"] for g in state["param_groups"]}
    assert lrs == {"llm": 1e-4, "projector": 1e-3}

    def mean_step(prefix):
        keys = [k for k in base if k.startswith(prefix)]
        return sum((after[k] - base[k]).abs().mean().item() for k in keys) / len(keys)

    ratio = mean_step("multi_modal_projector.") / mean_step("language_model.model.layers.")
    assert 5 < ratio < 20, ratio                    # AdamW moves each weight by about its group's lr per step


def test_text_only_rank_and_image_rank_match_one_process(tiny, tmp_path):
    """4 rows: the 2 long ones carry images, the 2 short ones none. Grouped by length, rank 0 gets the images and
    rank 1 only text; the run must neither hang nor differ from one process."""
    model_dir, data, sft = tiny
    rows = [json.loads(line) for line in open(sft) if not json.loads(line)["id"].endswith("_direct")][:2]
    mixed = tmp_path / "mixed.jsonl"
    with open(mixed, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
            text = dict(r, id=r["id"] + "_text", image=None)
            text["conversations"] = [dict(t, value=t["value"].replace("<image>\n", "")) for t in r["conversations"]]
            f.write(json.dumps(text) + "\n")
    common = ["--model", model_dir, "--data", str(mixed), "--image-root", data, "--workers", "0", "--max-steps", "3",
              "--lr", "3e-3"]
    train_sft.main(common + ["--out", str(tmp_path / "one"), "--batch-size", "4"])
    torchrun(common + ["--out", str(tmp_path / "two"), "--batch-size", "2"])
    for a, b in zip(losses(tmp_path / "one"), losses(tmp_path / "two")):
        assert abs(a - b) <= 1e-6 * abs(a)
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) <= 1e-5


def test_bad_data_is_counted_or_named(tiny, tmp_path, capsys):
    model_dir, data, sft = tiny
    good = json.loads(open(sft).readline())
    bad = [dict(good, id="missing", image="images/nope.png"),
           dict(good, id="corrupt", image="corrupt.png"),
           dict(good, id="no_answer", conversations=[good["conversations"][0]]),
           dict(good, id="two_tags", conversations=[dict(good["conversations"][0], value="<image>\n<image>\nQ?"),
                                                    good["conversations"][1]])]
    (tmp_path / "corrupt.png").write_text("not a png")
    os.symlink(os.path.join(data, "images"), tmp_path / "images")
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good] * 3 + bad) + "\n")
    argv = ["--model", model_dir, "--data", str(path), "--image-root", str(tmp_path), "--workers", "0",
            "--out", str(tmp_path / "out")]
    assert train_sft.main(argv + ["--check-data"]) == 1
    report = capsys.readouterr().out
    assert "7 rows: 3 usable, 4 skipped" in report
    for reason in ("image not found", "not a readable image", "no assistant turn", "2 <image> tags but 1 images"):
        assert reason in report
    assert train_sft.main(argv + ["--max-steps", "2", "--batch-size", "2"]) == 0      # skipped with warnings
    with pytest.raises(Exception, match=r"bad\.jsonl:\d+: "):
        train_sft.main(argv + ["--max-steps", "3", "--batch-size", "2", "--strict", "--no-group-by-length",
                               "--out", str(tmp_path / "strict")])


def test_check_data_reports_words_the_word_level_tokenizer_does_not_know(tmp_path, capsys, monkeypatch):
    """`--level easy` data through the shipped base model's word-level tokenizer (built on the tiny level): names such
    as `maple` become <unk>; --check-data reports the share and warns above 1%, and training warns once at the start.
    Tiny-level data, which the tokenizer was built on, draws no warning."""
    import distill
    from data.synthetic import WORDS, generate
    from data.tokenizer import unknown_words
    base = os.path.join(ROOT, "demo", "base_model")
    for level in ("easy", "tiny"):
        data = tmp_path / level
        generate(str(data), 24, seed=0, level=level, n_test=2)
        distill.main(["--data", str(data / "train.jsonl"), "--image-root", str(data), "--out", str(data / "sft.jsonl"),
                      "--teacher", "synthetic"])
    capsys.readouterr()
    argv = lambda level: ["--model", base, "--data", str(tmp_path / level / "sft.jsonl"), "--image-root",  # noqa
                          str(tmp_path / level), "--workers", "0", "--out", str(tmp_path / "out" / level)]
    assert train_sft.main(argv("easy") + ["--check-data"]) == 0
    report = capsys.readouterr().out
    line = next(x for x in report.splitlines() if "unknown words:" in x)
    assert line.startswith("warning: unknown words: ") and "become <unk>" in line
    examples = line.split("(e.g. ")[1].split(")")[0].split(", ")
    assert len(examples) == 5 and set(examples) <= set(WORDS)           # the chart's names: mango, maple, birch, ...
    assert float(line.split("unknown words: ")[1].split("%")[0]) > 1.0
    assert unknown_words(Processor.from_pretrained(base).tokenizer, ["A is 6 . maple"])[:2] == (1, 5)
    assert train_sft.main(argv("tiny") + ["--check-data"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "unknown words:" in x)
    assert line.startswith("unknown words: 0.00% ")

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop
    monkeypatch.setattr(train_sft, "load_for_training", stop)            # the warning comes before the model loads
    with pytest.raises(Stop):
        train_sft.main(argv("easy"))
    err = capsys.readouterr().err
    assert err.count("warning: unknown words: ") == 1


def test_released_rows_with_their_authors_absolute_image_paths_load_from_the_image_root(tmp_path):
    from data.collate import image_path
    (tmp_path / "chartqa").mkdir()
    (tmp_path / "chartqa" / "x.png").write_bytes(b"")
    assert image_path(str(tmp_path), "chartqa/x.png") == str(tmp_path / "chartqa" / "x.png")
    assert image_path(str(tmp_path), "/etc/data/vlm_reason/image_data/chartqa/x.png") == str(tmp_path / "chartqa/x.png")
    assert image_path(str(tmp_path), str(tmp_path / "chartqa" / "x.png")) == str(tmp_path / "chartqa" / "x.png")


def test_a_step_whose_samples_were_all_skipped_says_so(tiny, tmp_path, capsys):
    model, data, sft = tiny
    rows = [dict(json.loads(line), image="images/nope.png") for line in open(sft)][:4]
    path = tmp_path / "gone.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert train_sft.main(["--model", model, "--data", str(path), "--image-root", data, "--out", str(tmp_path / "o"),
                           "--max-steps", "1", "--batch-size", "4", "--workers", "0"]) == 0
    cap = capsys.readouterr()
    out = cap.out + cap.err
    assert "step 1/1 | no sample trained: all 4 skipped" in out and "loss 0.0000" not in out
    logged = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert logged == [{"step": 1, "skipped": 4, "lr": logged[0]["lr"]}]
