"""Compile every Triton kernel for an H100 (sm_90) on a machine without a GPU, and report its resources.

    python bench/compile_check.py [--arch 90]

Triton ships ptxas, so the whole pipeline (Triton IR -> PTX -> SASS) runs here: this catches what the CPU
interpreter cannot (front-end limits, register spills, shared memory over the 227 KB an H100 block may use) for
the block sizes the launchers pick on CUDA. It does not measure speed: bench/gpu_check.sh does that on a GPU.
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
L = importlib.import_module("kernels.logprobs")

H100_SMEM = 227 * 1024
ALIGNED_INTS = r"s[qkvod][bth]|shd|swv|sdl|d"         # strides and the hidden size: multiples of 16 in real runs


def compile_kernel(kernel, types, constexprs, num_warps, num_stages, arch):
    """types: {arg name: triton type string} for runtime args; constexprs: {arg name: value}."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: ("constexpr" if n in constexprs else types.get(n, "i32")) for n in names}
    consts = {(names.index(n),): v for n, v in constexprs.items()}
    # what the JIT sees at run time: 16-byte aligned pointers and strides that are multiples of 16 elements
    aligned = [i for i, n in enumerate(names) if signature[n].startswith("*") or re.fullmatch(ALIGNED_INTS, n)]
    src = ASTSource(fn=kernel, signature=signature, constexprs=consts,
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps,
                                                                          "num_stages": num_stages})
    return (k.metadata.shared,) + resource_usage(k.asm["cubin"])


def resource_usage(cubin):
    """(registers, stack bytes) per thread from the cubin, via the cuobjdump that ships with Triton. Stack bytes
    are spills: the register file ran out."""
    path = os.path.join(tempfile.mkdtemp(), "k.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--all", action="store_true", help="fp16 and fp32 too, and head dim 80 (slow: ~4 minutes)")
    args = ap.parse_args()
    failures = 0
    rows = []
    for dt in ("bf16", "fp16", "fp32") if args.all else ("bf16",):
        for D in (64, 128, 80) if args.all else (64, 128):
            blocks = A._blocks(D, interpret=False)
            bd = max(16, triton.next_power_of_2(D))
            ptr = {n: f"*{dt}" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
            ptr.update(LSE="*fp32", DELTA="*fp32", CU="*i32", scale="fp32")
            for causal in (True, False):
                for varlen in (False, True) if args.all else (causal,):
                    common = dict(D=D, BLOCK_D=bd, CAUSAL=causal, VARLEN=varlen,
                                  PREC="ieee" if dt == "fp32" else "tf32", GROUP=4)
                    BM, BN, w, s = blocks["fwd"]
                    rows.append((f"attn_fwd {dt} D{D} causal={causal} varlen={varlen}", A._attn_fwd, ptr,
                                 dict(common, BLOCK_M=BM, BLOCK_N=BN), w, s))
                    BM, BN, w, s = blocks["dkdv"]
                    rows.append((f"attn_bwd_dkdv {dt} D{D} causal={causal} varlen={varlen}", A._attn_bwd_dkdv, ptr,
                                 dict(common, BLOCK_M=BM, BLOCK_N=BN), w, s))
                    BM, BN, w, s = blocks["dq"]
                    rows.append((f"attn_bwd_dq {dt} D{D} causal={causal} varlen={varlen}", A._attn_bwd_dq, ptr,
                                 dict(common, BLOCK_M=BM, BLOCK_N=BN), w, s))
            rows.append((f"attn_bwd_delta {dt} D{D}", A._attn_bwd_delta, ptr,
                         dict(D=D, BLOCK_D=bd, BLOCK_M=blocks["dq"][0], VARLEN=False), 4, 1))
        BM, BV, BK, w, s = L._tiles(type("dev", (), {"type": "cuda"})())
        ptr = dict(H=f"*{dt}", W=f"*{dt}", Y="*i64", PM="*fp32", PS="*fp32", PT="*fp32", LSE2="*fp32", G="*fp32",
                   DL=f"*{dt}")
        tiles = dict(BLOCK_M=BM, BLOCK_V=BV, BLOCK_K=BK, PREC="ieee" if dt == "fp32" else "tf32")
        rows.append((f"logprobs_fwd {dt}", L._logprobs_fwd, ptr, tiles, w, s))
        rows.append((f"logprobs_dlogits {dt}", L._logprobs_dlogits, ptr, tiles, w, s))
    print("| kernel | shared KB | registers | stack (spill) bytes |\n|---|---|---|---|")
    for name, kernel, types, consts, w, s in rows:
        try:
            shared, regs, spills = compile_kernel(kernel, types, consts, w, s, args.arch)
            flag = "  <-- over the H100 limit" if shared > H100_SMEM else ("  <-- spills" if spills else "")
            failures += shared > H100_SMEM
            print(f"| {name} | {shared / 1024:.0f} | {regs} | {spills}{flag} |")
        except Exception as e:                                  # report every failure, then exit non-zero
            failures += 1
            print(f"| {name} | FAILED: {type(e).__name__}: {str(e).splitlines()[0][:150]} | | |")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
