"""What the scripts share: torchrun set-up, the LR schedule, autocast and clipping, logging. Each script owns its
own loop (helpers are shared, not a Trainer class); models on devices and checkpoints live in checkpoint.py."""

import argparse
import datetime
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from data.formats import FormatError

# ------------------------------------------------------------------------------------------------ command line


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and each flag's default (and range, when it has one) after its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        extra = []
        rng = getattr(action.type, "range_text", None)
        if rng:
            extra.append(rng)
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings and "%(default)" not in text:
            extra.append("default: %(default)s")
        return f"{text} ({'; '.join(extra)})" if extra else text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults and ranges in --help, a --debug flag, and errors on one line (exit 2)."""

    def __init__(self, description):
        super().__init__(description=description, formatter_class=HelpFormatter)
        # "-1e-3" is a (negative) number, not an option: a range error names it, instead of "expected one argument"
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
        self.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")

    def error(self, message):
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def number(kind, lo=None, hi=None, above=None):
    """An argparse type: kind (int or float) in [lo, hi], or > above. The range shows in --help and in errors."""
    parts = ([f"> {above}"] if above is not None else [f">= {lo}"] if lo is not None else []) + (
        [f"<= {hi}"] if hi is not None else [])
    text = "range: " + " and ".join(parts) if parts else ""

    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if kind is int else 'a number'}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi) or (above is not None and v <= above):
            raise argparse.ArgumentTypeError(f"{s} is out of range ({text[7:]})")
        return v
    parse.range_text = text
    parse.__name__ = kind.__name__
    return parse


def add_run_flags(ap, what):
    """The flags train_sft.py and train_dpo.py share: clipping, the seed (of the data or pair order: `what`),
    distribution, precision, checkpoints and resuming."""
    pos, nonneg = number(int, lo=1), number(int, lo=0)
    ap.add_argument("--clip", type=number(float, lo=0), default=1.0, help="gradient-norm clipping (0: off)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward")
    ap.add_argument("--seed", type=int, default=0, help=f"fixes the {what} order (and so the run)")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2: shard each block, then the root (else DDP)")
    ap.add_argument("--dist-timeout", type=number(float, above=0), default=60,
                    help="minutes a collective waits for a slow rank")
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


class UserError(Exception):
    """A failure the user can fix (a wrong path, a bad row, an output that would mix runs): one line, no traceback."""


progress = {"at": None, "then": None}      # where a run is (for Ctrl-C): e.g. {"at": "step 120", "then": "rerun with --resume to continue"}


def cli(main):
    """Run a script's main(): user-caused failures print `error: ...` on one line (exit 2); Ctrl-C says where the
    run stopped and how to continue (exit 130); --debug shows the tracebacks."""
    debug = "--debug" in sys.argv
    try:
        code = main()
    except KeyboardInterrupt:
        if debug:
            raise
        from tqdm import tqdm
        for bar in list(getattr(tqdm, "_instances", [])):       # the bars first, so that the message ends the output
            bar.close()
        if int(os.environ.get("RANK", 0)) == 0:
            where = f" at {progress['at']}" if progress["at"] else ""
            then = f"; {progress['then']}" if progress["then"] else ""
            print(f"\ninterrupted{where}{then}", file=sys.stderr, flush=True)
        code = 130
    except (UserError, OSError, FormatError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except SystemExit as e:                          # raise SystemExit("error: ...") is a one-line error too
        if not isinstance(e.code, str):
            raise
        print(e.code, file=sys.stderr, flush=True)
        code = 2
    if Dist.joined:
        # A torchrun worker leaves without interpreter teardown. torch keeps the process group alive past
        # destroy_process_group (torch._dynamo, which DDP imports after the group exists, and FSDP2's DTensor caches
        # hold it), so its gloo/NCCL threads still run while Python finalizes and C++ statics are destroyed; a peer
        # closing its sockets then can abort this rank (SIGABRT, "terminate called without an active exception")
        # after a run that had finished. Every output is written and closed by now (main() has returned): only the
        # std streams need flushing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# ------------------------------------------------------------------------------------------------ manifests

def file_id(path):
    """A data file's identity: its absolute path, size and modification time."""
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, int(st.st_mtime)]


def model_id(path):
    """A model directory's identity: its resolved path (a symlink re-pointed at another checkpoint is another
    model) and the size and modification time of each weight and config file in it."""
    real = os.path.realpath(path)
    names = sorted(f for f in os.listdir(real) if f.endswith((".safetensors", ".json"))) if os.path.isdir(real) else []
    return [real] + [[f, *file_id(os.path.join(real, f))[1:]] for f in names]


def _diff(old, new, prefix=""):
    """The first difference between two manifests, as 'field: old -> new'."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            if old.get(k) != new.get(k):
                return _diff(old.get(k), new.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')}: {json.dumps(old)[:120]} -> {json.dumps(new)[:120]}"


def claim(manifest, fields, created, overwrite, what="--out", act=True):
    """Take an output location for a run; returns True when it holds outputs of an earlier run of the same fields
    (to resume from).

    manifest: the manifest file beside (or inside) the outputs; fields: what the outputs depend on (the model's
    identity, the data files, the flags that change results); created: the paths there that a run of this stage
    writes. Another run's outputs (other fields) are refused with one line naming the first difference, unless
    overwrite: then the files this stage created are deleted first (overwrite also starts a same-fields run anew).
    Outputs without a manifest were not made by this stage: they are never touched, and the run is refused.
    act=False only checks (every rank checks, then one acts)."""
    fields = json.loads(json.dumps(fields))
    existing = [p for p in created if os.path.lexists(p)]
    old = None
    if os.path.exists(manifest):
        with open(manifest) as f:
            old = json.load(f)
    if old is None and existing:
        raise UserError(f"{existing[0]} exists and was not written by this stage (no {os.path.basename(manifest)} "
                        f"beside it); nothing was changed: choose a new {what}, or move it away")
    if old is not None and old != fields and not overwrite:
        raise UserError(f"{manifest} records another run ({_diff(old, fields)}); use --overwrite to replace its "
                        f"outputs, or a new {what}")
    if overwrite and existing:
        if act:
            for p in existing:
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
        existing = []
    if act:
        os.makedirs(os.path.dirname(os.path.abspath(manifest)), exist_ok=True)
        with open(manifest + ".tmp", "w") as f:
            json.dump(fields, f, indent=1)
        os.replace(manifest + ".tmp", manifest)
    return bool(existing)


def check_model_dir(path, flag="--model"):
    """A one-line error, before any work, when a model directory is missing or is not one."""
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such directory")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise UserError(f"{flag} {path}: no config.json, not a Hugging Face model directory")


def check_out_dir(path):
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--out {path} is a file; give a directory")
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK):
        raise UserError(f"--out {path} is not writable")


# ------------------------------------------------------------------------------------------------ torchrun


class Dist:
    """rank / world / device of this process. Without torchrun's RANK variable the script runs as one process."""

    joined = False                  # this process has been in a process group (cli() then exits without teardown)

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
            Dist.joined = True
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
            dist.barrier()                         # no rank closes its connections while another still talks
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
