"""What the scripts share: torchrun set-up, the LR schedule, autocast and clipping, logging. Each script owns its
own loop (helpers are shared, not a Trainer class); models on devices and checkpoints live in checkpoint.py."""

import datetime
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

# ------------------------------------------------------------------------------------------------ torchrun


class Dist:
    """rank / world / device of this process. Without torchrun's RANK variable the script runs as one process."""

    def __init__(self, timeout_minutes=60):
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
            # a generous timeout: a collective waits this long for a slow rank (a long save, a cold file system)
            dist.init_process_group(backend, device_id=self.device if self.device.type == "cuda" else None,
                                    timeout=datetime.timedelta(minutes=timeout_minutes))
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


# ------------------------------------------------------------------------------------------------ steps

def autocast(d, compute):
    if compute == torch.float32:
        return nullcontext()
    return torch.autocast(d.device.type, dtype=compute)


def clip(model, max_norm):
    """Clip the gradient norm (over all ranks' shards under FSDP); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


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
            print("(matplotlib is not installed: no loss-curve PNG; pip install -r requirements-plot.txt)",
                  file=sys.stderr)
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


class Skips:
    """Samples not trained on, counted by reason. The first of each reason is announced by the rank that met it
    (the others are counted); total() sums the counts over all ranks for the end-of-run summary."""

    def __init__(self, d):
        self.d, self.counts = d, {}

    def add(self, skipped):
        for reason, where in skipped:
            if reason not in self.counts:
                rank = f"rank {self.d.rank}: " if self.d.distributed else ""
                print(f"warning: {rank}skipping {where}: {reason} (further ones counted)", file=sys.stderr, flush=True)
            self.counts[reason] = self.counts.get(reason, 0) + 1

    def total(self):
        if not self.d.distributed:
            return dict(self.counts)
        parts = [None] * self.d.world
        dist.all_gather_object(parts, self.counts)
        out = {}
        for p in parts:
            for k, v in p.items():
                out[k] = out.get(k, 0) + v
        return out


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
