"""common/manifest.py: an output folder holds one run's outputs; a file a stage did not write is never touched; a
difference from the earlier run is one line naming the field."""

import json
import os

import pytest

import evaluate
import sample


def test_sampling_never_empties_a_file_it_did_not_write(tiny, tmp_path):
    model, data, _ = tiny
    mine = tmp_path / "existing.jsonl"
    mine.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(389)))
    from common.cli import UserError
    with pytest.raises(UserError, match="not written by this stage"):
        sample.main(["--model", model, "--data", os.path.join(data, "test.jsonl"), "--image-root", data,
                     "--out", str(mine), "--num-samples", "2", "--max-new-tokens", "4"])
    assert len(mine.read_text().splitlines()) == 389


def test_evaluation_never_reports_another_models_answers(tiny, tmp_path):
    """The first round's bug: evaluate.py --model OTHER into a folder holding an earlier model's predictions said
    "20 already done" and reported them. The folder's manifest names the model's files: another model is refused."""
    import shutil
    from common.cli import UserError
    model, data, _ = tiny
    other = tmp_path / "other"
    shutil.copytree(model, other)
    argv = ["--data", os.path.join(data, "test.jsonl"), "--image-root", data, "--out", str(tmp_path / "eval"),
            "--mode", "direct", "--limit", "2", "--max-new-tokens-direct", "3", "--workers", "0"]
    assert evaluate.main(["--model", model] + argv) == 0
    assert evaluate.main(["--model", model] + argv) == 0                    # the same model: resumed, nothing redone
    with pytest.raises(UserError, match=r"model.*--overwrite"):
        evaluate.main(["--model", str(other)] + argv)
    assert evaluate.main(["--model", str(other), "--overwrite"] + argv) == 0
    assert json.load(open(tmp_path / "eval" / "manifest.json"))["model"][0] == str(other)


def test_a_manifest_difference_is_one_line_naming_the_field_with_both_values(tmp_path):
    from common.cli import UserError
    from common.manifest import claim
    manifest = str(tmp_path / "out" / "manifest.json")
    old = {"stage": "sft", "model": ["/a/very/long/path/" + "x" * 300, ["model.safetensors", 1, 2]],
           "flags": {"lr": 1e-3, "seed": 0}}
    claim(manifest, old, [], False)
    new = dict(old, flags={"lr": 2e-3, "seed": 0})
    with pytest.raises(UserError) as e:
        claim(manifest, new, [], False)
    msg = f"error: {e.value}"
    assert "\n" not in msg and len(msg) <= 200, msg
    assert "flags.lr: 0.001 -> 0.002" in msg and "--overwrite" in msg
    longer = dict(old, model=["/another/" + "y" * 300, ["model.safetensors", 1, 2]])
    with pytest.raises(UserError) as e:
        claim(manifest, longer, [], False)
    assert len(f"error: {e.value}") <= 200 and "model.0: " in str(e.value), str(e.value)


def test_a_refused_command_leaves_nothing_behind(tiny, tmp_path):
    """Every check runs before the first write: a command refused for its flags, and a dry run, leave no file."""
    model, data, _ = tiny
    import distill
    from common.cli import UserError
    out = tmp_path / "eval"
    with pytest.raises(UserError, match="--rerank needs --reward-model"):
        evaluate.main(["--model", model, "--data", os.path.join(data, "test.jsonl"), "--image-root", data,
                       "--out", str(out), "--rerank", "4"])
    assert not out.exists()
    assert distill.main(["--data", os.path.join(data, "train.jsonl"), "--image-root", data, "--teacher", "openai",
                         "--out", str(tmp_path / "d" / "cot.jsonl"), "--dry-run"]) == 0
    assert not (tmp_path / "d").exists()
    with pytest.raises(UserError, match="--data .*nope.jsonl: no such file"):
        sample.main(["--model", model, "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "s/p.jsonl")])
    assert not (tmp_path / "s").exists()


def test_file_mistakes_name_their_flag_in_one_line(tiny, tmp_path):
    """A missing input names its flag; an --out under a regular file says so (not errno 17 or 20); a line cut off
    at its end says so, and a malformed one says where, without "at at"."""
    import train_sft
    from common.cli import UserError
    from data.formats import FormatError, read_jsonl
    model, data, sft = tiny
    with pytest.raises(UserError, match=r"^--data .*missing\.jsonl: no such file$"):
        train_sft.main(["--model", model, "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"--out .*afile/run: .*afile is a file, so the directory cannot be made"):
        train_sft.main(["--model", model, "--data", sft, "--out", str(tmp_path / "afile" / "run")])
    cut = tmp_path / "cut.jsonl"
    cut.write_text('{"id": "1", "question": "q"}\n{"id": "2", "quest')
    with pytest.raises(FormatError, match=r"cut\.jsonl:2: the line ends \(column 18\) before its JSON object does"):
        list(read_jsonl(str(cut)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1" "question": "q"}\n')
    with pytest.raises(FormatError) as e:
        list(read_jsonl(str(bad)))
    assert str(e.value).endswith("bad.jsonl:1: not valid JSON: Expecting ',' delimiter (column 12)")
    assert "at at" not in str(e.value)
