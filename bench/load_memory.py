"""Peak memory while loading a multi-GB checkpoint, as a multiple of the checkpoint's size.

    python bench/load_memory.py [--dir /tmp/llava_bench_ckpt] [--keep]

Writes a ~2.3 GB bf16 LLaVA-NeXT checkpoint of random weights (CLIP-L/336 + a 0.9B Llama, 3 shards) once, then
loads it with LlavaNext.from_pretrained(dtype=bfloat16) in a fresh process and reports the growth of its peak
resident memory (VmHWM after the load minus VmRSS before it) divided by the checkpoint's bytes. Goal: <= 1.2x.
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

CONFIG = {
    "model_type": "llava_next", "image_token_index": 31999, "vision_feature_layer": -2,
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                      "projection_dim": 768},
    "text_config": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
                    "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000},
}

CHILD = r"""
import json, os, sys, time, torch
sys.path.insert(0, sys.argv[2])
from model import LlavaNext

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:       # reset the peak (VmHWM) to the current RSS
    f.write("5")
t = time.time()
model = LlavaNext.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
print(json.dumps({"before": before, "peak": status("VmHWM:"), "after": status("VmRSS:"), "seconds": time.time() - t,
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def write_checkpoint(path):
    """Random bf16 weights, written shard by shard so the writer never holds the whole model."""
    from safetensors.torch import save_file
    from model import LlavaNext, LlavaNextConfig
    from model.weights import TO_HUB, rename
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
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.dir, "model.safetensors.index.json")):
        print(f"writing a random checkpoint to {args.dir} ...")
        write_checkpoint(args.dir)
    ckpt = sum(os.path.getsize(os.path.join(args.dir, f)) for f in os.listdir(args.dir) if f.endswith(".safetensors"))
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
