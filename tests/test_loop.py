"""training/loop.py and the trainers' micro-batch steps: a micro-batch never waits on the device.

A GPU runs ahead of the Python that feeds it only while nothing reads a value back (.item(), float(), .tolist(),
a boolean index, nonzero): each such read is a sync that empties the queue. The CPU cannot see a sync, but it can
see its shadow: the same step on the meta device, where every read of a value fails. So a micro-batch's forward and
backward run here on meta tensors, with the batches the real collate functions make; the step's one read (the
loss, the gradient norm, the SIGTERM vote) happens after the last micro-batch, in the loop.
"""

from types import SimpleNamespace

import pytest
import torch

import train_dpo
import train_sft
from data.collate import PairDataset, SFTDataset, collate, collate_pairs, load_rows
from data.formats import load_pairs
from model import LlavaNext, Processor
from training.loop import to_device

META = SimpleNamespace(device=torch.device("meta"))


def meta_model(path):
    """The model of `path` on the meta device: its real shapes and code, no values."""
    model = LlavaNext.empty(path, torch.float32)
    model.train()
    return model


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("loss_mean", ["token", "sample"])
def test_an_sft_micro_batch_never_reads_from_the_device(small, pack, loss_mean):
    model_dir, data, sft, _ = small
    proc = Processor.from_pretrained(model_dir)
    rows = load_rows([sft])
    ds = SFTDataset(rows, proc, data)
    mb = collate([ds[i] for i in range(4)], pack=pack, pad_id=1)
    assert mb["pixel_values"] is not None and "target_rows" in mb
    model = meta_model(model_dir)
    loss = train_sft.train_micro_batch(model, mb, META, torch.float32, loss_mean, mb["supervised"], 1)
    assert loss.device.type == "meta"
    assert model.language_model.layers[0].mlp.up_proj.weight.grad is not None       # the backward ran too


@pytest.mark.parametrize("precomputed", [False, True])
def test_a_dpo_micro_batch_never_reads_from_the_device(small, precomputed):
    model_dir, data, _, pairs = small
    proc = Processor.from_pretrained(model_dir)
    ds = PairDataset(load_pairs(pairs), proc, data)
    mb = collate_pairs([ds[i] for i in range(3)], pack=False, pad_id=1)
    reference = None if precomputed else meta_model(model_dir).eval()
    if precomputed:
        train_dpo.add_reference(mb, {k: (-1.0, -2.0) for k in mb["ids"]}, SimpleNamespace(device=torch.device("cpu")))
    args = SimpleNamespace(beta=0.1, label_smoothing=0.0, sft_weight=1.0)
    policy = meta_model(model_dir)
    sums = train_dpo.train_micro_batch(policy, reference, mb, META, torch.float32, args, 3, mb["chosen_supervised"], 1)
    assert sums.shape == (len(train_dpo.SUMS),) and sums.device.type == "meta"


def test_a_batch_goes_to_the_device_with_its_shapes_left_on_the_host(small):
    model_dir, data, sft, _ = small
    ds = SFTDataset(load_rows([sft]), Processor.from_pretrained(model_dir), data)
    mb = collate([ds[i] for i in range(2)], pack=True)
    to = to_device(mb, torch.device("meta"))
    assert to["input_ids"].device.type == "meta" and to["cu_seqlens"].device.type == "meta"
    assert to["image_sizes"].device.type == "cpu"          # anyres shapes are computed from it: never read back
    assert isinstance(to["max_seqlen"], int) and to["n"] == 2


def test_the_loader_pins_its_batches_on_cuda_and_its_workers_leave_sigterm_to_the_trainer(monkeypatch):
    """Pinned host memory makes the copy to the GPU asynchronous (non_blocking=True does not wait); a worker ignores
    the scheduler's SIGTERM, which the trainer answers after its step."""
    import signal
    from training import loop
    seen = {}

    class Spy:
        def __init__(self, dataset, **kw):
            seen.update(kw)

        def __iter__(self):
            return iter([])
    monkeypatch.setattr(loop.torch.utils.data, "DataLoader", Spy)
    loop.loader([0, 1], [[0], [1]], None, 2, torch.device("cuda", 0))
    assert seen["pin_memory"] is True and seen["persistent_workers"] is True
    loop.loader([0, 1], [[0], [1]], None, 0, torch.device("cpu"))
    assert seen["pin_memory"] is False and seen["worker_init_fn"] is None
    old = signal.getsignal(signal.SIGTERM)
    try:
        loop._worker_init(0)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, old)


@pytest.mark.parametrize("script", ["train_sft", "train_dpo", "sample", "evaluate"])
def test_every_torchrun_script_takes_a_collective_timeout(script):
    import importlib
    mod = importlib.import_module(script)
    argv = {"train_sft": ["--model", "m", "--data", "d", "--out", "o"],
            "train_dpo": ["--model", "m", "--pairs", "p", "--out", "o"],
            "sample": ["--model", "m", "--data", "d", "--out", "o.jsonl"],
            "evaluate": ["--model", "m", "--data", "d", "--out", "o"]}[script]
    assert mod.parse_args(argv + ["--dist-timeout", "7.5"]).dist_timeout == 7.5
    assert mod.parse_args(argv).dist_timeout == 60
