"""Compile every Triton kernel, in every config the launchers may pick on CUDA, for an H100 (sm_90) on a machine
without a GPU, and report what the hardware will run.

    python bench/compile_check.py [--arch 90] [--all] [--only TEXT]

Triton ships ptxas, so the whole pipeline (Triton IR -> PTX -> SASS) runs here: this catches what the CPU
interpreter cannot. Per kernel and config it prints
  wgmma / mma.sync   tensor-core instructions in the PTX: Hopper's warpgroup MMA vs the Ampere-era instruction
                     Triton falls back to when a matmul's shape or operands do not fit wgmma (half the throughput);
  registers, spills  per thread, from the cubin (stack bytes are spills: the register file ran out), and how
                     many spill loads/stores (LDL/STL in the SASS) sit inside an innermost loop: a spill around the
                     loops (a pointer kept for the epilogue) costs a few bytes per program, one in the hot loop
                     costs every iteration;
  shared KB          shared memory per block (an H100 block may use 227 KB).
Goal: no mma.sync in any fp16/bf16 kernel, no spill in an innermost loop, <= 227 KB; the exit code is non-zero
otherwise. It does not measure speed: bench/gpu_check.sh does that on a GPU.
"""

import argparse
import importlib
import inspect
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# kernels.attention is the public function; the modules are reached by name
A = importlib.import_module("kernels.attention")
AK = importlib.import_module("kernels.attention_kernels")
L = importlib.import_module("kernels.logprobs")

H100_SMEM = 227 * 1024
ALIGNED_INTS = r"s[qkvodal][bth]|shd|swv|sdl|d"        # strides and the hidden size: multiples of 16 in real runs


def compile_kernel(kernel, types, constexprs, num_warps, num_stages, arch):
    """types: {arg name: triton type string} for runtime args; constexprs: {arg name: value}.
    Returns (shared bytes, registers, spill bytes, spill instructions in innermost loops, wgmma, mma.sync)."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: ("constexpr" if n in constexprs else types.get(n, "i32")) for n in names}
    consts = {(names.index(n),): v for n, v in constexprs.items()}
    # what the JIT sees at run time: 16-byte aligned pointers and strides that are multiples of 16 elements
    aligned = [i for i, n in enumerate(names) if signature[n].startswith("*") or re.fullmatch(ALIGNED_INTS, n)]
    src = ASTSource(fn=kernel, signature=signature, constexprs=consts,
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps,
                                                                          "num_stages": num_stages})
    ptx = k.asm["ptx"]
    return (k.metadata.shared,) + resource_usage(k.asm["cubin"]) + (
        len(re.findall(r"\bwgmma\.mma_async", ptx)), len(re.findall(r"\bmma\.sync", ptx)))


def resource_usage(cubin):
    """(registers, stack bytes, spill instructions inside innermost loops) per thread from the cubin, via the
    cuobjdump that ships with Triton."""
    path = os.path.join(tempfile.mkdtemp(), "k.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    regs, stack = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    hot = 0
    if stack:
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
        lines = [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
        # a loop is a backward branch; the innermost ones contain no other loop (a branch to itself is the trap)
        loops = [(int(t, 16), a) for a, text in lines for t in re.findall(r"\bBRA\s+0x([0-9a-f]+)", text)
                 if int(t, 16) < a]
        inner = [(lo, hi) for lo, hi in loops if not any(lo <= l2 and h2 <= hi and (l2, h2) != (lo, hi)
                                                         for l2, h2 in loops)]
        hot = sum(1 for a, text in lines if re.search(r"\b(LDL|STL)\b", text)
                  and any(lo <= a <= hi for lo, hi in inner))
    return regs, stack, hot


def attention_rows(dt, D, variants):
    """(name, config text, kernel, types, constexprs, warps, stages) for every attention config."""
    bd = max(16, triton.next_power_of_2(D))
    types = {n: f"*{dt}" for n in ("Q", "K", "V", "O", "DO", "DK", "DV")}
    types.update(LSE="*fp32", DELTA="*fp32", CU="*i32", scale="fp32")
    rows = []
    for causal, varlen in variants:
        tag = f"{dt} D{D} {'causal' if causal else 'full'}{' varlen' if varlen else ''}"
        common = dict(D=D, BLOCK_D=bd, CAUSAL=causal, VARLEN=varlen, PREC="ieee" if dt == "fp32" else "tf32")
        for BM, BN, w, s in A.configs("fwd", D, fp32=dt == "fp32"):
            rows.append((f"attn_fwd {tag}", f"{BM}x{BN} w{w} s{s}", AK._attn_fwd, types,
                         dict(common, BLOCK_M=BM, BLOCK_N=BN), w, s))
        dq_seen = set()
        for strategy, BN, BM, w, s, BM2, BN2, w2, s2 in A.configs("bwd", D, fp32=dt == "fp32"):
            fused = strategy == "fused"
            t = dict(types, DQ="*fp32" if fused else f"*{dt}")
            rows.append((f"attn_bwd_dkdv {tag}", f"{strategy} {BN}x{BM} w{w} s{s}", AK._attn_bwd_dkdv, t,
                         dict(common, BLOCK_M=BM, BLOCK_N=BN, FUSED_DQ=fused), w, s))
            if not fused and (BM2, BN2, w2, s2) not in dq_seen:
                dq_seen.add((BM2, BN2, w2, s2))
                rows.append((f"attn_bwd_dq {tag}", f"{BM2}x{BN2} w{w2} s{s2}", AK._attn_bwd_dq, t,
                             dict(common, BLOCK_M=BM2, BLOCK_N=BN2), w2, s2))
    rows.append((f"attn_bwd_delta {dt} D{D}", "64 w4", AK._attn_bwd_delta, types,
                 dict(D=D, BLOCK_D=bd, BLOCK_M=64, VARLEN=False), 4, 1))
    return rows


def logprobs_rows(dt):
    types = dict(H=f"*{dt}", W=f"*{dt}", Y="*i64", PM="*fp32", PS="*fp32", PT="*fp32", LSE2="*fp32", G="*fp32",
                 DL=f"*{dt}")
    rows = []
    for kind, kernel in (("fwd", L._logprobs_fwd), ("dlogits", L._logprobs_dlogits)):
        for BM, BV, BK, w, s in L.configs(kind, fp32=dt == "fp32"):
            rows.append((f"logprobs_{kind} {dt}", f"{BM}x{BV}x{BK} w{w} s{s}", kernel, types,
                         dict(BLOCK_M=BM, BLOCK_V=BV, BLOCK_K=BK, PREC="ieee" if dt == "fp32" else "tf32"), w, s))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--all", action="store_true", help="fp16 and fp32 too, head dim 80, every causal/varlen pair "
                                                       "(slow: several minutes)")
    ap.add_argument("--only", default="", help="compile only the rows whose name and config contain this text")
    args = ap.parse_args()
    rows = []
    for dt in ("bf16", "fp16", "fp32") if args.all else ("bf16",):
        variants = [(c, v) for c in (True, False) for v in (False, True)] if args.all else [(True, True),
                                                                                           (False, False)]
        for D in (64, 128, 80) if args.all else (64, 128):
            rows += attention_rows(dt, D, variants)
        rows += logprobs_rows(dt)
    rows = [r for r in rows if args.only in f"{r[0]} {r[1]}"]
    print(f"triton {triton.__version__}, sm_{args.arch}")
    print("| kernel | config | wgmma | mma.sync | registers | spill bytes / in loops | shared KB |\n"
          "|---|---|---|---|---|---|---|")
    failures = 0
    for name, cfg, kernel, types, consts, w, s in rows:
        try:
            shared, regs, spills, hot, wgmma, mma = compile_kernel(kernel, types, consts, w, s, args.arch)
        except Exception as e:                                  # report every failure, then exit non-zero
            failures += 1
            print(f"| {name} | {cfg} | FAILED: {type(e).__name__}: {str(e).splitlines()[0][:150]} | | | | |")
            continue
        bad = [why for why, hit in (("mma.sync", mma and "fp32" not in name), ("spills in a loop", hot),
                                    ("over 227 KB", shared > H100_SMEM)) if hit]
        failures += bool(bad)
        print(f"| {name} | {cfg} | {wgmma} | {mma} | {regs} | {spills} / {hot} | {shared / 1024:.0f} |"
              + (f"  <-- {', '.join(bad)}" if bad else ""), flush=True)
    print(f"{len(rows)} kernels, {failures} off goal")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
