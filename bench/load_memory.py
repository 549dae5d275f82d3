"""Peak memory while loading a multi-GB checkpoint, as a multiple of the checkpoint's size.

    python bench/load_memory.py [--dir /tmp/llava_bench_ckpt] [--keep]
    python bench/load_memory.py --procs 4      # FSDP2 training load: each of 4 processes reads only its shards

Writes a ~2.3 GB bf16 LLaVA-NeXT checkpoint of random weights (CLIP-L/336 + a 0.9B Llama, 3 shards) once, then
loads it with LlavaNext.from_pretrained(dtype=bfloat16) in a fresh process and reports the growth of its peak
resident memory (VmHWM after the load minus VmRSS before it) divided by the checkpoint's bytes. Goal: <= 1.2x.
With --procs N it loads the way `train_sft.py --fsdp` does under torchrun (gloo on the CPU): the model built on the
meta device, sharded over N processes, each materialising its own rows of every tensor as fp32 master weights;
the goal is a peak growth per process within its fp32 shard plus the largest single tensor (x 1.2).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from safetensors.torch import save_file  # noqa: E402
from model import LlavaNext, LlavaNextConfig  # noqa: E402
from model.weights import TO_HUB, rename  # noqa: E402

CONFIG = {
    "model_type": "llava_next", "image_token_index": 31999, "vision_feature_layer": -2,
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                      "projection_dim": 768},
    "text_config": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
                    "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000},
}

# both children: RSS before loading, the peak (VmHWM) reset to it, the clock started
PRELUDE = r"""
import json, os, sys, time, torch
sys.path.insert(0, sys.argv[2])

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

def start():
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:   # reset the peak (VmHWM) to the current RSS
        f.write("5")
    return before, time.time()
"""

CHILD = PRELUDE + r"""
from model import LlavaNext

before, t = start()
model = LlavaNext.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
print(json.dumps({"before": before, "peak": status("VmHWM:"), "after": status("VmRSS:"), "seconds": time.time() - t,
                  "params": sum(p.numel() for p in model.parameters())}))
"""


CHILD_SHARDED = PRELUDE + r"""
from argparse import Namespace
from training.checkpoint import load_for_training
from common.dist import Dist

d = Dist()
before, t = start()
model, _ = load_for_training(sys.argv[1], Namespace(fsdp=True), d, torch.bfloat16)
local = sum(p.to_local().numel() * p.element_size() if hasattr(p, "to_local") else p.numel() * p.element_size()
            for p in model.parameters())
largest = max(p.numel() * 4 for p in model.parameters())
print(json.dumps({"rank": d.rank, "before": before, "peak": status("VmHWM:"), "seconds": time.time() - t,
                  "local": local, "largest": largest}), flush=True)
d.close()
"""


def sharded(path, procs):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = os.path.join(path, "_load_child.py")
    with open(script, "w") as f:
        f.write(CHILD_SHARDED)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
                          f"--master_port={port}", script, path, ROOT], capture_output=True, text=True, check=True)
    os.remove(script)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"rank"')]
    worst = 0.0
    for r in sorted(rows, key=lambda r: r["rank"]):
        grew, bound = r["peak"] - r["before"], r["local"] + r["largest"]
        worst = max(worst, grew / bound)
        print(f"rank {r['rank']}: peak RSS growth {grew / 1e9:.2f} GB; its fp32 shard {r['local'] / 1e9:.2f} GB + "
              f"the largest tensor {r['largest'] / 1e9:.2f} GB = {bound / 1e9:.2f} GB; ratio {grew / bound:.2f} "
              f"({r['seconds']:.1f}s)")
    print(f"worst ratio {worst:.2f} (goal <= 1.2)")


def write_checkpoint(path):
    """Random bf16 weights, written shard by shard so the writer never holds the whole model."""
    os.makedirs(path, exist_ok=True)
    with torch.device("meta"):
        model = LlavaNext(LlavaNextConfig.from_dict(CONFIG))
    shapes = {rename(k, TO_HUB): v.shape for k, v in model.state_dict().items()}
    shards, current, size, limit = [], {}, 0, 1_000_000_000
    for k, shape in shapes.items():
        n = 2 * torch.Size(shape).numel()
        if current and size + n > limit:
            shards.append(current)
            current, size = {}, 0
        current[k] = shape
        size += n
    shards.append(current)
    weight_map, g = {}, torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shard.items()},
                  os.path.join(path, name))
        weight_map.update({k: name for k in shard})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(CONFIG, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/llava_bench_ckpt")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint for the next run")
    ap.add_argument("--procs", type=int, default=0, help="load sharded over N processes, as FSDP2 training does")
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.dir, "model.safetensors.index.json")):
        print(f"writing a random checkpoint to {args.dir} ...")
        write_checkpoint(args.dir)
    ckpt = sum(os.path.getsize(os.path.join(args.dir, f)) for f in os.listdir(args.dir) if f.endswith(".safetensors"))
    if args.procs:
        sharded(args.dir, args.procs)
        if not args.keep:
            shutil.rmtree(args.dir)
        return
    out = subprocess.run([sys.executable, "-c", CHILD, args.dir, ROOT], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    grew = r["peak"] - r["before"]
    print(f"checkpoint {ckpt / 1e9:.2f} GB ({r['params'] / 1e9:.2f}B params, bf16) loaded in {r['seconds']:.1f}s")
    print(f"peak RSS growth {grew / 1e9:.2f} GB = {grew / ckpt:.3f}x the checkpoint (goal <= 1.2x); "
          f"RSS after load {(r['after'] - r['before']) / 1e9:.2f} GB")
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
