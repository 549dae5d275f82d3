"""What a training run reports: one JSON line per logged step (and the loss plot made from them), the samples it
skipped and why, wall-clock laps, and the GPU's peak FLOP/s for MFU."""

import json
import os
import sys
import time

import torch


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
    """Samples not trained on, counted by reason (and those cut to --max-len). The first of each reason is announced
    by the rank that met it (the others are counted); total() sums the counts over all ranks for the end-of-run
    summary."""

    def __init__(self, d):
        self.d, self.counts = d, {}

    def add_batches(self, batches):
        """Count the skipped and the truncated samples of collated batches."""
        for mb in batches:
            self.add(mb["skipped"])
            if mb.get("truncated"):
                key = "truncated to --max-len (kept)"
                self.counts[key] = self.counts.get(key, 0) + mb["truncated"]

    def add(self, skipped):
        for reason, where in skipped:
            if reason not in self.counts:
                rank = f"rank {self.d.rank}: " if self.d.distributed else ""
                print(f"warning: {rank}skipping {where}: {reason} (further ones counted)", file=sys.stderr, flush=True)
            self.counts[reason] = self.counts.get(reason, 0) + 1

    def total(self):
        out = {}
        for p in self.d.gather_objects(self.counts):
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
