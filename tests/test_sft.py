"""train_sft.py on a tiny model (CPU): learning, equivalence across process counts, exact resume, atomic
checkpoints, packing, freezing and per-module learning rates, mixed text-only / image ranks, bad data."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_sft
from training.checkpoint import checkpoints, incomplete, write_checkpoint
from helpers import ROOT, assert_close, build_tiny_model_dir, torchrun
from model import LlavaNext, Processor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model_dir(str(tmp_path_factory.mktemp("tiny")))


def args_for(tiny, out, *extra):
    model, data, sft = tiny
    return ["--model", model, "--data", sft, "--image-root", data, "--out", str(out), "--workers", "0", *extra]


def losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]


def weights(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))




def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_loss_falls_and_transformers_loads_the_checkpoint(tiny, tmp_path):
    from transformers import LlavaNextForConditionalGeneration
    out = tmp_path / "run"
    assert train_sft.main(args_for(tiny, out, "--max-steps", "30", "--batch-size", "8", "--lr", "3e-3")) == 0
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
    train_sft.main(args_for(tiny, one, *common, "--batch-size", "4"))
    train_sft.main(args_for(tiny, accum, *common, "--batch-size", "2", "--grad-accum", "2"))
    torchrun(args_for(tiny, two, *common, "--batch-size", "2"))
    for other in (accum, two):
        for a, b in zip(losses(one), losses(other)):
            assert abs(a - b) <= 1e-6 * abs(a), (losses(one), losses(other))
        assert max_diff(weights(one), weights(other)) <= 1e-5


def test_killed_run_resumes_exactly(tiny, tmp_path):
    common = ["--max-steps", "40", "--batch-size", "4", "--lr", "3e-3", "--save-every", "2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train_sft.main(args_for(tiny, straight, *common))
    proc = subprocess.Popen([sys.executable, "-u", "train_sft.py", *args_for(tiny, killed, *common)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:                        # killed the moment the first checkpoint is reported
        if line.startswith("saved "):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    resumed_at = int(checkpoints(str(killed))[-1].rsplit("-", 1)[1])
    assert resumed_at < 40, "the run finished before the kill: nothing was resumed"
    assert train_sft.main(args_for(tiny, killed, *common, "--resume")) == 0
    assert losses(killed) == losses(straight)       # bit for bit
    assert max_diff(weights(straight), weights(killed)) == 0


def test_a_kill_while_saving_leaves_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    class Boom(Exception):
        pass

    out = tmp_path / "run"
    train_sft.main(args_for(tiny, out, "--max-steps", "2", "--batch-size", "4", "--save-every", "1"))
    before = checkpoints(str(out))

    def half_written(tmp):
        with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
            f.write(b"\0" * 100)
        raise Boom()

    from common.dist import Dist
    with pytest.raises(Boom):
        write_checkpoint(str(out), 3, half_written, Dist())
    assert checkpoints(str(out)) == before
    LlavaNext.from_pretrained(before[-1])            # still loadable
    assert open(out / "latest").read().strip() == os.path.basename(before[-1])
    # a kill halfway through deleting the oldest checkpoint: no half-deleted checkpoint-N is left for a resume
    real_rmtree = shutil.rmtree

    def die_after_one_file(path, *a, **k):
        if os.path.basename(path).startswith(".trash-") and os.path.exists(path):
            os.remove(os.path.join(path, "config.json"))
            raise Boom()
        return real_rmtree(path, *a, **k)

    src = shutil.copytree(before[-1], tmp_path / "src")
    copy = lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True)   # noqa: E731
    for step in (3, 4):
        write_checkpoint(str(out), step, copy, Dist())
    with monkeypatch.context() as m, pytest.raises(Boom):
        m.setattr(shutil, "rmtree", die_after_one_file)
        write_checkpoint(str(out), 5, copy, Dist())
    assert [os.path.basename(c) for c in checkpoints(str(out))] == [f"checkpoint-00000{i}" for i in (3, 4, 5)]
    for c in checkpoints(str(out)):
        LlavaNext.from_pretrained(c)
    write_checkpoint(str(out), 6, copy, Dist())
    assert [os.path.basename(c) for c in checkpoints(str(out))] == [f"checkpoint-00000{i}" for i in (4, 5, 6)]
    assert not [n for n in os.listdir(out) if n.startswith(".")]      # the next save swept the leftovers
    # a real SIGKILL during training with a save every step, sent the moment the 4th save is reported (so it lands
    # in the next step or save, pruning included): whatever survives loads
    proc = subprocess.Popen([sys.executable, "-u", "train_sft.py",
                             *args_for(tiny, tmp_path / "k", "--max-steps", "500", "--batch-size", "4",
                                       "--save-every", "1")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    saves = 0
    for line in proc.stdout:
        saves += line.startswith("saved ")
        if saves == 4:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert saves == 4 and len(checkpoints(str(tmp_path / "k"))) >= 3
    from torch.distributed.checkpoint import FileSystemReader
    for c in checkpoints(str(tmp_path / "k")):
        assert not incomplete(c), c
        torch.load(os.path.join(c, "rng.pt"), weights_only=True)
        keys = FileSystemReader(os.path.join(c, "state")).read_metadata().state_dict_metadata
        assert any(k.startswith("model.") for k in keys) and any(k.startswith("optim.state.") for k in keys)


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
    train_sft.main(args_for(tiny, out, "--max-steps", "3", "--batch-size", "4", "--lr", "1e-4", "--projector-lr",
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
