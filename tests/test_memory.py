"""training/memory.py: a run that cannot hold its model on one GPU without --fsdp stops before it loads anything."""

import json

import pytest

import train_dpo
import train_sft
from common.cli import UserError
from helpers import build_tiny_model_dir
from model import LlavaNext
from training import memory

GiB = 2 ** 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model_dir(str(tmp_path_factory.mktemp("memory")), n_train=8, n_test=2)


def test_the_whole_model_accounting_of_an_8b_model(tmp_path):
    """fp32 weights + gradients + two AdamW moments: 16 bytes per trained parameter (bench.memory's accounting)."""
    (tmp_path / "config.json").write_text(json.dumps(memory.LLAMA3_LLAVA_NEXT_8B))
    model = LlavaNext.empty(str(tmp_path))
    n = sum(p.numel() for p in model.parameters())
    assert 8.3e9 < n < 8.4e9
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert memory.whole_model_bytes(model) == 4 * n + 12 * trained
    assert memory.whole_model_bytes(model, live_reference=True) == 6 * n + 12 * trained
    assert memory.whole_model_bytes(model) / GiB > 120


@pytest.mark.parametrize("script", ["train_sft.py", "train_dpo.py"])
def test_ddp_of_an_8b_model_on_80gb_stops_before_loading_naming_fsdp(tiny, tmp_path, monkeypatch, script):
    """Only config.json is there: the stop comes before any weight, tokenizer or data row is read."""
    _, data, sft = tiny
    big = tmp_path / "llama3-llava-next-8b"
    big.mkdir()
    (big / "config.json").write_text(json.dumps(memory.LLAMA3_LLAVA_NEXT_8B))
    mod = train_sft if script == "train_sft.py" else train_dpo
    monkeypatch.setattr(mod, "gpu_bytes", lambda device: 80 * GiB)          # as on an H100
    argv = ["--model", str(big), "--image-root", data, "--out", str(tmp_path / "out")]
    argv += ["--data", sft] if script == "train_sft.py" else ["--pairs", sft]
    with pytest.raises(UserError) as e:
        mod.main(argv)
    msg = str(e.value)
    assert "--fsdp" in msg and "GiB" in msg and "80 GiB" in msg and len(msg.splitlines()) == 1, msg
    need = int(msg.split("model: ")[1].split(" GiB")[0])
    assert need > 80
    assert not (tmp_path / "out").exists()                                  # nothing written
    monkeypatch.setattr(mod, "gpu_bytes", lambda device: 1024 * GiB)        # a GPU that holds it: on to the data
    with pytest.raises(Exception) as e:
        mod.main(argv)
    assert "--fsdp" not in str(e.value)
