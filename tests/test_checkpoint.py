"""training/checkpoint.py: a checkpoint is written atomically and OUT/latest names what --resume continues; a run
never mixes with another's outputs."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import train_sft
from helpers import ROOT, sft_args
from model import LlavaNext
from training.checkpoint import checkpoints, incomplete, write_checkpoint


def test_a_kill_while_saving_leaves_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    class Boom(Exception):
        pass

    out = tmp_path / "run"
    train_sft.main(sft_args(tiny, out, "--max-steps", "2", "--batch-size", "4", "--save-every", "1"))
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
                             *sft_args(tiny, tmp_path / "k", "--max-steps", "500", "--batch-size", "4",
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


def test_training_never_mixes_runs_and_resumes_what_latest_names(tiny, tmp_path):
    model, data, sft = tiny
    out = tmp_path / "run"
    base = ["--model", model, "--data", sft, "--image-root", data, "--out", str(out), "--workers", "0",
            "--batch-size", "4", "--save-every", "2"]
    assert train_sft.main(base + ["--max-steps", "4"]) == 0
    from common.cli import UserError
    with pytest.raises(UserError, match="already holds this run's outputs: --resume continues it"):
        train_sft.main(base + ["--max-steps", "4"])
    with pytest.raises(UserError, match=r"flags\.lr: 5e-06 -> 0\.001.*--overwrite"):
        train_sft.main(base + ["--max-steps", "4", "--lr", "1e-3"])
    (out / "notes.txt").write_text("mine")
    assert train_sft.main(base + ["--max-steps", "2", "--lr", "1e-3", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"                    # not a training output: kept
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-000002"]
    # a stale checkpoint (from an older run, a copy) is never resumed: OUT/latest is
    os.rename(out / "checkpoint-000002", out / "checkpoint-000002x")
    import shutil
    shutil.copytree(out / "checkpoint-000002x", out / "checkpoint-000002")
    shutil.copytree(out / "checkpoint-000002x", out / "checkpoint-000009")
    shutil.rmtree(out / "checkpoint-000002x")
    log = subprocess.run([sys.executable, "train_sft.py", *base, "--max-steps", "2", "--lr", "1e-3", "--resume"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert log.returncode == 0 and "checkpoint-000002 at step 2" in log.stdout, log.stdout + log.stderr
    assert "checkpoint-000009" not in log.stdout
    (out / "latest").write_text("checkpoint-000007\n")
    with pytest.raises(UserError, match="checkpoint-000007"):
        train_sft.main(base + ["--max-steps", "2", "--lr", "1e-3", "--resume"])
