"""What the training scripts share: torchrun set-up, the LR schedule, atomic checkpoints, logging. Each script owns
its own loop (STYLE.md: share helpers, not a Trainer)."""

import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

# ------------------------------------------------------------------------------------------------ torchrun


class Dist:
    """rank / world / device of this process. Without torchrun's RANK variable the script runs as one process."""

    def __init__(self):
        self.distributed = "RANK" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.distributed:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, device_id=self.device if self.device.type == "cuda" else None)
        self.main = self.rank == 0

    def all_sum(self, x):
        """Sum a float or a tensor over ranks (a no-op for one process)."""
        t = torch.as_tensor(x, dtype=torch.float64, device=self.device).clone()
        if self.distributed:
            dist.all_reduce(t)
        return t

    def all_max(self, x):
        t = torch.as_tensor(x, dtype=torch.float64, device=self.device).clone()
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def close(self):
        if self.distributed:
            dist.destroy_process_group()


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def dtype_of(flag, device):
    """A --dtype flag's torch dtype: "auto" is bf16 on CUDA and fp32 on the CPU."""
    return {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
            "bfloat16": torch.bfloat16}[flag]


def precision(args, d):
    """(compute dtype, saved-weights dtype, pack) from the --dtype / --save-dtype / --pack flags: bf16 and packed
    sequences on CUDA, fp32 and padded batches on the CPU, unless a flag says otherwise."""
    pack = args.pack == "on" or (args.pack == "auto" and d.device.type == "cuda")
    return dtype_of(args.dtype, d.device), dtype_of(args.save_dtype, d.device), pack


def seed_all(seed):
    random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ schedule

def lr_factor(step, total, warmup_ratio, min_ratio=0.0):
    """Linear warm-up over the first warmup_ratio of the steps, then cosine decay to min_ratio (paper: 3% warm-up)."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer, factor):
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor


# ------------------------------------------------------------------------------------------------ checkpoints

def checkpoints(out):
    """Complete checkpoint directories under out, oldest first."""
    if not os.path.isdir(out):
        return []
    names = [n for n in os.listdir(out) if n.startswith("checkpoint-") and n[11:].isdigit()]
    return [os.path.join(out, n) for n in sorted(names, key=lambda n: int(n[11:]))]


def _discard(path):
    """Delete a checkpoint directory so that a kill midway never leaves a half-deleted checkpoint-N: one rename takes
    it out of the checkpoint-* namespace first, then the files go (leftovers are swept by the next save)."""
    trash = os.path.join(os.path.dirname(path), ".trash-" + os.path.basename(path))
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash)


def write_checkpoint(out, step, write_files, d, keep=3):
    """Write a checkpoint atomically: every rank's write_files(tmp_dir) fills a temporary directory, then rank 0
    renames it to checkpoint-{step} (one rename: a kill leaves either the old set or the new one, never half of
    one), drops all but the newest `keep`, and points `latest` at it."""
    tmp = os.path.join(out, f".tmp-checkpoint-{step:06d}")
    final = os.path.join(out, f"checkpoint-{step:06d}")
    if d.main:
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(out):                          # what a kill left behind: half-written, half-deleted
            if name.startswith((".tmp-checkpoint-", ".trash-checkpoint-")):
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        os.makedirs(tmp)
    d.barrier()
    write_files(tmp)
    d.barrier()
    if d.main:
        for name in os.listdir(tmp):                      # the bytes are on disk before the rename makes them live
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        if os.path.exists(final):
            _discard(final)
        os.rename(tmp, final)
        with open(os.path.join(out, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final) + "\n")
        os.replace(os.path.join(out, "latest.tmp"), os.path.join(out, "latest"))
        for old in checkpoints(out)[:-keep] if keep > 0 else []:
            _discard(old)
    d.barrier()
    return final


def load_trainer_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------------ models

def load_model(path, d, state):
    """fp32 master weights on this rank's device; from a checkpoint, its exact fp32 weights when it has them."""
    from model import LlavaNext
    model = LlavaNext.from_pretrained(path, dtype=torch.float32, device=d.device)
    master = os.path.join(path, "master_weights.safetensors")
    if state is not None and os.path.exists(master):
        from safetensors.torch import load_file
        model.load_state_dict(load_file(master, device=str(d.device)), strict=True)
    return model


def wrap(model, args, d, compute, frozen=False):
    """DDP, or FSDP2 (each decoder and CLIP block, then the root; bf16 params, fp32 gradient reduction). A frozen
    model (the DPO reference) is never DDP-wrapped, and under FSDP2 is sharded like the policy."""
    if not d.distributed or (frozen and not args.fsdp):
        return model
    if args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=compute if compute != torch.float32 else None,
                                  reduce_dtype=torch.float32)
        for block in list(model.vision_tower.encoder.layers) + list(model.language_model.layers):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def grad_sync(wrapped, args, d, sync):
    """Skip the gradient all-reduce on all but the last micro-batch (it must cover the forward too)."""
    if not d.distributed:
        return nullcontext()
    if args.fsdp:
        wrapped.set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if sync else wrapped.no_sync()


def autocast(d, compute):
    if compute == torch.float32:
        return nullcontext()
    return torch.autocast(d.device.type, dtype=compute)


def clip(model, max_norm):
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def save(args, d, model, wrapped, optimizer, processor, step, save_dtype):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, \
        get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(wrapped, options=opts)
    optim = get_optimizer_state_dict(wrapped, optimizer, options=opts)

    def write(tmp):
        if not d.main:
            return
        model.save_pretrained(tmp, dtype=save_dtype, state_dict=full)
        processor.save_pretrained(tmp)
        if save_dtype != torch.float32:          # exact resume needs the fp32 master weights too
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in full.items()}, os.path.join(tmp, "master_weights.safetensors"))
        torch.save({"step": step, "optimizer": optim, "rng": rng_state(), "world": d.world},
                   os.path.join(tmp, "trainer_state.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "world": d.world, "args": vars(args)}, f, indent=1)

    path = write_checkpoint(args.out, step, write, d, args.keep_checkpoints)
    print0(f"saved {path}")
    return path


# ------------------------------------------------------------------------------------------------ logging

class Metrics:
    """One JSON line per logged step (rank 0), for plots; and the loss-curve PNG when matplotlib is installed."""

    def __init__(self, path, d, resume_step=0):
        self.path, self.main = path, d.main
        if self.main:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            kept = []
            if os.path.exists(path):                      # on resume, drop lines past the checkpoint we restart from
                for line in open(path):
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if row.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
            with open(path, "w") as f:
                f.writelines(kept)
            self.f = open(path, "a")

    def log(self, row):
        if self.main:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()

    def close(self):
        if self.main:
            self.f.close()

    def plot(self, png, keys=("loss",), title=""):
        """A PNG of the curves (skipped, with a note, when matplotlib is missing)."""
        if not self.main:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("(matplotlib is not installed: no loss-curve PNG; pip install matplotlib)", file=sys.stderr)
            return None
        rows = [json.loads(line) for line in open(self.path)]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            if pts:
                ax.plot(*zip(*pts), label=k)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        plt.close(fig)
        return png


class Timer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self):
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


def peak_flops(device):
    """Dense bf16 peak of the GPU, for MFU (torchtitan's table); None off CUDA."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
                       ("A100", 312e12), ("L40S", 362e12)):
        if key in name:
            return flops
    return None
