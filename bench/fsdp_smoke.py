"""FSDP2 smoke run over every GPU of the machine (NCCL, bf16): the README's SFT and DPO recipes on a tiny model.

    python bench/fsdp_smoke.py            # one process per GPU (one GPU: one process, FSDP2 over a world of one)
    python bench/fsdp_smoke.py --cpu 2    # the same over gloo with 2 CPU processes (what the CPU tests rehearse)

SFT with --fsdp, gradient accumulation, packing, gradient checkpointing and a frozen tower; a second run resumed
from its first checkpoint must end where the straight one ends; then DPO with a precomputed reference and dev pairs.
Prints one line per check and exits non-zero when any fails.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from helpers import build_tiny_model_dir, teacher_pairs  # noqa: E402  (the tests' tiny model and data; no pytest)


def torchrun(n, script, argv, log):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", script, *argv]
    t = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=600).returncode
    return rc, time.time() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", type=int, default=0, help="run over gloo with this many CPU processes instead")
    args = ap.parse_args()
    import torch
    n = args.cpu or torch.cuda.device_count()
    if n < 1:
        print("FAIL  FSDP2 smoke: no GPU (use --cpu N for gloo processes)")
        return 1
    work = tempfile.mkdtemp(prefix="fsdp_smoke_")
    model, data, sft = build_tiny_model_dir(os.path.join(work, "tiny"), n_train=48, n_test=24)
    common = ["--model", model, "--data", sft, "--image-root", data, "--fsdp", "--batch-size", "1", "--grad-accum",
              "2", "--max-steps", "6", "--lr", "1e-3", "--pack", "on", "--grad-checkpointing", "--freeze-vision",
              "--save-every", "3", "--workers", "1"]
    checks = []
    rc, dt = torchrun(n, "train_sft.py", common + ["--out", f"{work}/sft"], f"{work}/sft.log")
    checks.append((f"SFT, {n} processes, FSDP2 + accumulation + packing ({dt:.0f}s)", rc == 0, f"{work}/sft.log"))
    rc2, _ = torchrun(n, "train_sft.py", common + ["--out", f"{work}/sft_r", "--max-steps", "6"], f"{work}/r1.log")
    if rc2 == 0:                                   # resume the second run from its step-3 checkpoint
        with open(f"{work}/sft_r/latest", "w") as f:
            f.write("checkpoint-000003\n")
        rc2, _ = torchrun(n, "train_sft.py", common + ["--out", f"{work}/sft_r", "--resume"], f"{work}/r2.log")
    same = False
    if rc == 0 and rc2 == 0:
        a = [json.loads(x)["loss"] for x in open(f"{work}/sft/metrics.jsonl")]
        b = [json.loads(x)["loss"] for x in open(f"{work}/sft_r/metrics.jsonl")]
        same = len(a) == len(b) == 6 and max(abs(x - y) for x, y in zip(a, b)) < 1e-3
    checks.append(("SFT resumed from step 3 ends where the straight run ends", same, f"{work}/r2.log"))
    pairs = os.path.join(work, "pairs.jsonl")
    rows = teacher_pairs(json.loads(line) for line in open(os.path.join(data, "train.jsonl")))
    with open(pairs, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:40])
    with open(pairs + ".dev", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[40:])
    rc, dt = torchrun(n, "train_dpo.py", ["--model", f"{work}/sft/final", "--pairs", pairs, "--dev-pairs",
                                          pairs + ".dev", "--image-root", data, "--out", f"{work}/dpo", "--fsdp",
                                          "--batch-size", "1", "--global-batch", str(2 * n), "--max-steps", "4",
                                          "--lr", "1e-4", "--precompute-ref", "--grad-checkpointing", "--pack",
                                          "on", "--eval-every", "2", "--workers", "1"], f"{work}/dpo.log")
    checks.append((f"DPO, {n} processes, FSDP2, precomputed reference, dev pairs ({dt:.0f}s)", rc == 0,
                   f"{work}/dpo.log"))
    for text, ok, log in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}" + ("" if ok else f"  (log: {log})"))
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
