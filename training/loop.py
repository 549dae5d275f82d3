"""The pieces of a training loop that train_sft.py and train_dpo.py share: their common flags, precision, this rank's
batch order, the loader, resuming the optimizer, moving a batch to the device, and clipping. Each script keeps its
own loop; nothing here hides a step.

No function here waits on the GPU: the loop syncs with the host once per optimizer step, where it reads the step's
metrics (train_sft.py / train_dpo.py), never per micro-batch.
"""

import random
import signal
from contextlib import nullcontext

import torch

from common.cli import UserError, add_dist_timeout, number
from common.dist import dtype_of, print0
from data.collate import balance, global_batches, split_batch
from training.checkpoint import load_state


def add_run_flags(ap, what):
    """The flags train_sft.py and train_dpo.py share: clipping, the seed (of the data or pair order: `what`),
    distribution, precision, checkpoints and resuming."""
    pos, nonneg = number(int, lo=1), number(int, lo=0)
    ap.add_argument("--clip", type=number(float, lo=0), default=1.0, help="gradient-norm clipping (0: off)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward")
    ap.add_argument("--seed", type=int, default=0, help=f"fixes the {what} order (and so the run)")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2: shard each block, then the root (else DDP)")
    add_dist_timeout(ap)
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="compute dtype (auto: bf16 on CUDA, fp32 on CPU); master weights stay fp32")
    # checkpoints, logs
    ap.add_argument("--save-every", type=nonneg, default=0, help="checkpoint every K steps (0: only at the end)")
    ap.add_argument("--save-hf-every", type=nonneg, default=0,
                    help="also write the Hugging Face weights into every K-th step's checkpoint (0: the final only)")
    ap.add_argument("--keep-checkpoints", type=pos, default=3, help="keep the newest N checkpoints")
    ap.add_argument("--save-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="dtype of the saved HF weights (auto: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint OUT/latest names")


def precision(args, d):
    """(compute dtype, saved-weights dtype, pack) from the --dtype / --save-dtype / --pack flags: bf16 and packed
    sequences on CUDA, fp32 and padded batches on the CPU, unless a flag says otherwise."""
    pack = args.pack == "on" or (args.pack == "auto" and d.device.type == "cuda")
    return dtype_of(args.dtype, d.device), dtype_of(args.save_dtype, d.device), pack


def seed_all(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def autocast(d, compute):
    """Mixed precision for the forward: fp32 master weights, matmuls in the compute dtype (none for fp32)."""
    if compute == torch.float32:
        return nullcontext()
    return torch.autocast(d.device.type, dtype=compute)


def clip_grad(model, max_norm):
    """Clip the gradient norm (over all ranks' shards under FSDP); returns the norm before clipping as a 0-d tensor on
    the device (not read here: the loop reads it with the step's other metrics, in one sync)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


# keys of a batch that stay on the host: shapes are computed from them (reading them back from the GPU would sync)
HOST_KEYS = ("image_sizes",)


def to_device(mb, device):
    """A collated batch on the device: tensors copied asynchronously (from pinned memory on CUDA), the host-side
    keys (image sizes, counts, ids) left where they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) and k not in HOST_KEYS else v
            for k, v in mb.items()}


def rank_schedule(lengths, micro, world, accum, rank, seed, per_epoch, start, total, group_by_length=True):
    """This rank's micro-batches (lists of sample indices) for steps start..total-1, in order. The global batches
    depend on the seed alone (data/collate.py); each is split by length across the accumulation steps and balanced
    across the ranks by tokens. Prints how balanced the ranks are."""
    schedule, splits = [], []
    global_size = micro * world * accum
    for step in range(start, total):
        batch = global_batches(lengths, global_size, seed, step // per_epoch)[step % per_epoch]
        split = split_batch(batch, lengths, micro, world, accum, group_by_length)
        schedule += [s[rank] for s in split]
        if len(splits) < 200:
            splits += split
    if world > 1:
        print0(f"ranks balanced by tokens: mean / max per micro-batch {balance(splits, lengths):.3f}")
    return schedule


def pair_logps(model, mb, d):
    """(the batch on the device, per-position log-probs) of a pair batch (2B rows, or packed) through the model's
    own forward; each image is encoded once for its chosen and rejected rows (image_repeat=2)."""
    to = to_device(mb, d.device)
    return to, model(to["input_ids"], to.get("pixel_values"), to.get("image_sizes"), to.get("attention_mask"),
                     cu_seqlens=to.get("cu_seqlens"), max_seqlen=to.get("max_seqlen"), targets=to["targets"],
                     target_rows=to.get("target_rows"), image_repeat=2, keep_vision_in_graph=True)


def _worker_init(_):
    # a job scheduler's SIGTERM reaches the loader's workers too: the main process decides when to stop (after its
    # step, with a checkpoint) and ends them itself
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader(dataset, schedule, collate, workers, device):
    """The batches of `schedule` in order: decoded in worker processes, pinned for an asynchronous copy on CUDA."""
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=schedule, collate_fn=collate,
                                            num_workers=workers, persistent_workers=workers > 0,
                                            pin_memory=device.type == "cuda",
                                            worker_init_fn=_worker_init if workers > 0 else None))


def step_plan(n, micro, world, accum, max_steps, epochs, flag):
    """(global batch, steps per epoch, total steps) for n samples; a one-line error naming `flag` when they make no
    global batch."""
    global_size = micro * world * accum
    per_epoch = n // global_size
    if per_epoch == 0:
        raise UserError(f"{flag}: {n} samples make no global batch of {global_size} ({micro} per micro-batch x "
                        f"{world} processes x {accum} accumulation)")
    return global_size, per_epoch, max_steps or max(1, int(epochs * per_epoch))


def set_base_lrs(optimizer, lrs):
    """Each group's base learning rate (the schedule scales it), by group name: {name: lr}."""
    for g in optimizer.param_groups:
        g["base_lr"] = lrs[g["name"]]


def resume_optimizer(resume, wrapped, optimizer, lrs):
    """The step to start from: 0, or the step of the checkpoint `resume` (weights, optimizer state and RNG restored,
    resharded onto this process count). The base learning rates are set either way."""
    set_base_lrs(optimizer, lrs)
    if not resume:
        return 0
    step = load_state(resume, wrapped, optimizer)["step"]
    set_base_lrs(optimizer, lrs)
    print0(f"resumed from {resume} at step {step}")
    return step


def read_step(d, sums, gnorm, guard):
    """The step's one read from the device: the sums (a float64 vector) summed over the ranks, the gradient norm,
    and whether any rank was sent SIGTERM. Returns (sums as floats, gnorm, stop)."""
    flag = torch.full((1,), guard.flag(), dtype=torch.float64, device=sums.device)
    *totals, stop = d.all_sum(torch.cat([sums, flag])).tolist()
    return totals, float(gnorm), stop > 0
