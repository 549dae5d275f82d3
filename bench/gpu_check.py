"""The one-shot GPU check: kernel correctness at real shapes, the benchmarks, and a table of every goal.

    python bench/gpu_check.py [--quick] [--only NAME,...] [--budget SECONDS]   # bench/gpu_check.sh makes the venv
    python bench/gpu_check.py --dry [--in-process]       # the same code on the CPU: Triton interpreter, toy shapes
    python bench/gpu_check.py --list

Each stage runs in its own process under its own timeout (a hung kernel or a CUDA fault ends that stage only),
prints as it goes, and reports rows (goal, measured figure, verdict). Stages that do not fit in what is left of
the budget are skipped and say so. The closing table lists every row; the exit code is 0 when every goal passed,
1 on a wrong result, a crash or a timeout, 2 when every result is right but a speed or memory goal was missed.
Correctness follows FlashAttention's rule: our error against an fp32 oracle at most 2x (forward) / 3x (backward)
the error of torch's own same-precision computation (SDPA-flash, the naive log-prob path) against it.

Adding a stage: append Stage(name, run, timeout) to STAGES. run is either a function(ctx) -> [Row] (it runs in a
child process: `gpu_check.py --stage NAME`) or an argv list, a command whose goal is exit code 0 (or pass
check=function(returncode, output tail) -> [Row]).
"""

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ROWS_TAG = "@@gpu_check rows "


@dataclasses.dataclass
class Row:
    goal: str
    measured: str
    ok: bool | None           # None: a figure with no goal, or not measured
    kind: str = "correct"     # "correct": a wrong result (exit 1); "perf": a speed / memory goal (exit 2)


@dataclasses.dataclass
class Stage:
    name: str
    run: object               # function(ctx) -> [Row], or an argv list
    timeout: int              # seconds, cold (Triton compilation included)
    quick: bool = True        # part of --quick
    needs: tuple = ()         # modules it imports; missing ones skip the stage
    check: object = None      # for commands: function(returncode, output tail) -> [Row]
    dry: bool = True          # runs under --dry (commands never do)


@dataclasses.dataclass
class Ctx:
    dry: bool = False
    quick: bool = False

    @property
    def device(self):
        return "cpu" if self.dry else "cuda"

    @property
    def dtype(self):
        import torch
        return torch.float16 if self.dry else torch.bfloat16      # the interpreter's bf16 tl.dot is wrong


# ------------------------------------------------------------------------------------------------ stages

@contextlib.contextmanager
def kernels_env(mode):
    """LLAVA_KERNELS=mode inside the block. The kernel stages force "triton" (the interpreter under --dry); the
    model stages run the default dispatch on CUDA and the torch paths under --dry (the kernels themselves are
    checked by the correctness stages, and the interpreter would take minutes on a whole model)."""
    old = os.environ.get("LLAVA_KERNELS")
    os.environ["LLAVA_KERNELS"] = mode
    try:
        yield
    finally:
        os.environ.pop("LLAVA_KERNELS") if old is None else os.environ.update(LLAVA_KERNELS=old)


def stage_env(ctx):
    import torch
    import triton
    name = "cpu (dry run)" if ctx.dry else torch.cuda.get_device_name()
    print(f"torch {torch.__version__} | triton {triton.__version__} | {name}")
    if not ctx.dry:
        p = torch.cuda.get_device_properties(0)
        print(f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
        try:
            subprocess.run(["nvidia-smi", "--query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit",
                            "--format=csv,noheader"], check=False, timeout=20)
        except (OSError, subprocess.SubprocessError) as e:
            print(f"nvidia-smi: {e}")
    return [Row("a CUDA GPU", name, None if ctx.dry else torch.cuda.is_available())]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def judge(label, ours, same, oracle, names, factors):
    """One row per tensor by FlashAttention's rule, plus a few ulps of slack for near-exact references."""
    rows = []
    for name, a, b, c, f in zip(names, ours, same, oracle, factors):
        err, err_pt = max_err(a, c), max_err(b, c)
        slack = 2 ** -12 * c.abs().max().item()
        rows.append(Row(f"{label}: {name} error <= {f}x torch's", f"{err:.2e} vs torch {err_pt:.2e}",
                        err <= f * err_pt + slack))
    return rows


def _attention_case(ctx, label, B, T, H, Hkv, D, causal, lengths=None):
    import torch
    from bench.kernels_bench import expand, sdpa
    from kernels.attention import attention_triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev, dt = ctx.device, ctx.dtype
    g = torch.Generator(dev).manual_seed(T + D)
    shape = (sum(lengths),) if lengths else (B, T)
    q, k, v = (torch.randn(*shape, h, D, device=dev, dtype=dt, generator=g) for h in (H, Hkv, Hkv))
    do = torch.randn_like(q)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev) \
        if lengths else None
    bounds = cu.tolist() if lengths else None

    def torch_attn(q, k, v, flash):
        k, v = expand(k, q.shape[-2] // k.shape[-2]), expand(v, q.shape[-2] // k.shape[-2])
        if not lengths:
            return sdpa(q, k, v, causal, flash)
        return torch.cat([sdpa(q[None, a:b], k[None, a:b], v[None, a:b], causal, flash)[0]
                          for a, b in zip(bounds, bounds[1:])])

    def grads(fn, *xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        o = fn(*xs)
        o.backward(do.to(o.dtype))
        return [o.detach()] + [x.grad for x in xs]

    def oracle_grads(q, k, v):
        """fp32 (fp64 on the CPU) math attention, one KV head group at a time (no Hq x T x T matrix at once)."""
        up = torch.float32 if q.is_cuda else torch.float64
        G, outs = H // Hkv, []
        for j in range(Hkv):
            qs, ks, vs = (x[..., a:b, :].to(up).requires_grad_() for x, a, b in
                          ((q, j * G, (j + 1) * G), (k, j, j + 1), (v, j, j + 1)))
            with sdpa_kernel([SDPBackend.MATH]):
                o = torch_attn(qs, ks, vs, flash=False)
            o.backward(do[..., j * G:(j + 1) * G, :].to(up))
            outs.append((o.detach(), qs.grad, ks.grad, vs.grad))
        return [torch.cat(t, -2) for t in zip(*outs)]

    ref = oracle_grads(q, k, v)
    same = grads(lambda q, k, v: torch_attn(q, k, v, flash=True), q, k, v)
    rows = []
    A = importlib.import_module("kernels.attention")
    import kernels.tuning as tuning
    # the config the tuner picks, then (first CUDA case only) every other config of the set forced in turn
    cases = [("tuned", None, None)]
    if label.startswith("*") and not ctx.dry:
        cases += [(f"fwd {c}", "attn_fwd", c) for c in A.configs("fwd", D)[1:]]
        cases += [(f"bwd {c[:5]}", "attn_bwd", c) for c in A.configs("bwd", D)[1:]]
    for tag, op, cfg in cases:
        def ours(q, k, v):
            return attention_triton(q, k, v, causal, cu, max(lengths) if lengths else None)
        if op:
            with tuning.force(op, cfg):
                got = grads(ours, q, k, v)
        else:
            got = grads(ours, q, k, v)
        name = label.lstrip("*") + ("" if op is None else f" [{tag}]")
        rows += judge(name, got, same, ref, ["out", "dq", "dk", "dv"], [2, 3, 3, 3])
        print("\n".join(f"  {r.goal}: {r.measured} {'ok' if r.ok else 'FAIL'}" for r in rows[-4:]), flush=True)
    return rows


def stage_attention_correct(ctx):
    """bf16 attention at real shapes against SDPA-flash and an fp32 oracle (every config at the first shape)."""
    from bench.kernels_bench import VARLEN_LENGTHS
    if ctx.dry:
        cases = [("*padded causal GQA 4/2 d64 T=150", 1, 150, 4, 2, 64, True, None),
                 ("packed causal GQA 4/2 d16, 3 seqs", 1, 0, 4, 2, 16, True, [40, 1, 77])]
    else:
        cases = [("*padded causal GQA 32/8 d128 T=4k", 1, 4096, 32, 8, 128, True, None),
                 ("packed causal GQA 32/8 d128, 8 seqs", 1, 0, 32, 8, 128, True,
                  VARLEN_LENGTHS)]
        if not ctx.quick:
            cases += [("padded causal GQA 32/8 d128 T=8k", 1, 8192, 32, 8, 128, True, None),
                      ("CLIP non-causal 16 heads d64 T=577 x4", 4, 577, 16, 16, 64, False, None)]
    rows = []
    for case in cases:
        rows += _attention_case(ctx, *case)
    return rows


def stage_logprobs_correct(ctx):
    """token_logprobs at V = 128,256 against the naive bf16 path and an fp32 oracle, arbitrary upstream grads."""
    import torch
    import kernels
    from kernels.logprobs import token_logprobs_ref
    dev, dt = ctx.device, ctx.dtype
    N, d, V = (37, 48, 1000) if ctx.dry else (2048 if ctx.quick else 4096, 4096, 128256)
    g = torch.Generator(dev).manual_seed(0)
    h = torch.randn(N, d, device=dev, dtype=dt, generator=g)
    w = torch.randn(V, d, device=dev, dtype=dt, generator=g) * 0.02
    y = torch.randint(0, V, (N,), device=dev, generator=g)
    y[::4] = -100
    gout = torch.randn(N, device=dev, generator=g)

    def grads(fn, h, w):
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        lp = fn(h, w, y)
        lp.backward(gout.to(lp.dtype))
        return [lp.detach(), h.grad, w.grad]

    up = torch.float32 if h.is_cuda else torch.float64
    ref = grads(token_logprobs_ref, h.to(up), w.to(up))
    same = grads(token_logprobs_ref, h, w)
    with kernels_env("triton"):
        ours = grads(kernels.token_logprobs, h, w)
    rows = judge(f"token_logprobs N={N} d={d} V={V}", ours, same, ref, ["logp", "dh", "dW"], [2, 3, 3])
    zero = bool((ours[0][y == -100] == 0).all()) and bool((ours[1][y == -100] == 0).all())
    rows.append(Row("token_logprobs: ignored rows give 0 and no gradient", "yes" if zero else "no", zero))
    for r in rows:
        print(f"  {r.goal}: {r.measured} {'ok' if r.ok else 'FAIL'}", flush=True)
    return rows


def stage_attention_bench(ctx):
    from bench.kernels_bench import VARLEN_LENGTHS, attention_bench
    if ctx.dry:
        shapes = [("causal GQA 4/2 d32 T=64", 1, 64, 4, 2, 32, True, None),
                  ("causal GQA 4/2 d32 packed 3 seqs", 1, 0, 4, 2, 32, True, [40, 7, 20])]
    else:
        shapes = [("causal GQA 32/8 d128 T=4k x4", 4, 4096, 32, 8, 128, True, None),
                  ("causal GQA 32/8 d128 packed 8 seqs (16k tokens)", 1, 0, 32, 8, 128, True, VARLEN_LENGTHS)]
        if not ctx.quick:
            shapes.insert(1, ("causal GQA 32/8 d128 T=8k x2", 2, 8192, 32, 8, 128, True, None))
            shapes.append(("CLIP non-causal 16 heads d64 T=577 x28", 28, 577, 16, 16, 64, False, None))
    rows = []
    for name, *shape in shapes:
        r = attention_bench(*shape, device=ctx.device, dtype=ctx.dtype)
        (bf, bfb), (of, ofb) = r["base"], r["ours"]
        print(f"  {name}: {r['baseline']} {bf:.0f} / {bfb:.0f} TFLOP/s, ours {of:.0f} / {ofb:.0f} "
              "(forward / forward+backward)", flush=True)
        goal = "CLIP" not in name and not ctx.dry
        rows.append(Row(f"attention fwd+bwd >= 1.0x {r['baseline']}, {name}",
                        f"{ofb / bfb:.2f}x ({ofb:.0f} vs {bfb:.0f} TFLOP/s)", ofb >= bfb if goal else None, "perf"))
        rows.append(Row(f"attention fwd vs {r['baseline']}, {name}", f"{of / bf:.2f}x ({of:.0f} vs {bf:.0f})",
                        None, "perf"))
    return rows


def stage_logprobs_bench(ctx):
    from bench.kernels_bench import logprobs_bench
    sizes = [(64, 64, 2000)] if ctx.dry else [(n, 4096, 128256) for n in ([4096] if ctx.quick else [4096, 16384])]
    rows = []
    for N, d, V in sizes:
        with kernels_env("triton"):
            r = logprobs_bench(N, d, V, device=ctx.device, dtype=ctx.dtype)
        (tn, mn), (to, mo) = r["naive"], r["ours"]
        print(f"  N={N}: naive {tn:.1f} ms, ours {to:.1f} ms ({r['tflops']:.0f} TFLOP/s); extra memory "
              f"{'n/a' if mn is None else f'{mn / 2**30:.2f} vs {mo / 2**30:.2f} GiB'}", flush=True)
        judge_it = not ctx.dry
        rows.append(Row(f"token_logprobs N={N} V={V}: speed >= 1.0x naive", f"{tn / to:.2f}x ({to:.1f} vs {tn:.1f} ms)",
                        to <= tn if judge_it else None, "perf"))
        if mn is not None:
            rows.append(Row(f"token_logprobs N={N} V={V}: extra memory <= 1/20 of naive",
                            f"1/{mn / max(mo, 1):.0f} ({mo / 2**20:.0f} vs {mn / 2**20:.0f} MiB)",
                            mo * 20 <= mn, "perf"))
    return rows


def stage_sft(ctx):
    from bench.sft_speed import GPU_CONFIG, TINY_CONFIG, step_bench
    if ctx.dry:
        with kernels_env("ref" if ctx.dry else "auto"):
            r = step_bench(TINY_CONFIG, samples=2, text=40, steps=1, device="cpu")
    else:
        with kernels_env("ref" if ctx.dry else "auto"):
            r = step_bench(GPU_CONFIG, steps=3 if ctx.quick else 8)
    print(f"  {r['params'] / 1e9:.2f}B params, {r['tokens']} tokens: {r['ms']:.0f} ms, {r['tok_s']:,.0f} tok/s, "
          f"{r['tflops']:.0f} TFLOP/s" + (f", peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] else ""), flush=True)
    mfu = r["mfu"]
    return [Row("SFT step MFU >= 40% (~1B LLaVA-NeXT, 8B-shaped layers, 1 GPU)",
                "n/a (dry)" if mfu is None else f"{mfu:.1f}% ({r['tok_s']:,.0f} tok/s)",
                None if mfu is None else mfu >= 40, "perf")]


def stage_dpo(ctx):
    from bench import dpo_speed
    with kernels_env("ref" if ctx.dry else "auto"):
        r = dpo_speed.main(["--smoke", "--steps", "1"] if ctx.dry else ["--steps", "3" if ctx.quick else "6"])
    return [Row(f"DPO step, 2 pairs x 2 x 2k tokens, {k} reference", f"{v:.2f} pairs/s", None, "perf")
            for k, v in r.items()]


def stage_sampling(ctx):
    """Sampling at 8B shapes: 8 prompts of ~3k tokens x 32 samples x 256 tokens, decode tokens/s and peak memory,
    the in-place KV cache against the implementation before it (from git history, when present)."""
    from bench import generate_speed
    r = generate_speed.gpu(smoke=ctx.dry)
    rows = [Row("sampling decode, 8B-shaped 4 layers, 8 x 3k-token prompts x 32 samples", f"{r['after']:,.0f} tok/s, "
                f"peak {r['after_peak_gib']:.2f} GiB over the weights", None, "perf")]
    if "before" in r:
        rows.append(Row("sampling decode after / before the in-place KV cache >= 1.0x",
                        f"{r['after'] / r['before']:.2f}x", None if ctx.dry else r["after"] >= r["before"], "perf"))
    return rows


def check_fsdp_smoke(returncode, tail):
    """bench/fsdp_smoke.py prints PASS / FAIL per check (or one 'skipped' line below 2 GPUs)."""
    rows = [Row(line.split(None, 1)[1].strip(), line.split()[0], line.startswith("PASS"))
            for line in tail if line.startswith(("PASS", "FAIL"))]
    if not rows:
        skipped = any("skipped" in line for line in tail)
        rows = [Row("FSDP2 smoke over every GPU", "skipped: 1 GPU" if skipped else f"exit {returncode}",
                    None if skipped else returncode == 0)]
    return rows


MODEL_NEEDS = ("numpy", "PIL", "safetensors", "tokenizers")          # what `import model` pulls in
STAGES = [
    Stage("env", stage_env, 60),
    Stage("attention-correct", stage_attention_correct, 150),
    Stage("logprobs-correct", stage_logprobs_correct, 90),
    Stage("attention-bench", stage_attention_bench, 150),
    Stage("logprobs-bench", stage_logprobs_bench, 90),
    Stage("sft-mfu", stage_sft, 150, needs=MODEL_NEEDS),
    Stage("sampling", stage_sampling, 120, quick=False, needs=MODEL_NEEDS),
    Stage("dpo-step", stage_dpo, 120, quick=False, needs=MODEL_NEEDS),
    Stage("fsdp-smoke", [sys.executable, "bench/fsdp_smoke.py"], 240, quick=False, needs=MODEL_NEEDS,
          check=check_fsdp_smoke, dry=False),
    Stage("kernel-tests", [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "tests/test_kernels.py"], 240, quick=False, needs=("pytest",) + MODEL_NEEDS, dry=False),
]


# ------------------------------------------------------------------------------------------------ runner

def _stream(proc, tail):
    """Print a child's output as it comes; collect its rows."""
    rows = []
    for line in proc.stdout:
        if line.startswith(ROWS_TAG):
            rows += [Row(**r) for r in json.loads(line[len(ROWS_TAG):])]
            continue
        print(f"  | {line}", end="", flush=True)
        tail.append(line)
        del tail[:-40]
    return rows


def run_child(stage, argv, timeout):
    """Run argv under `timeout` seconds, streaming its output. Returns (rows, returncode or 'timeout', tail)."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, bufsize=1, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    tail, result = [], {}
    reader = threading.Thread(target=lambda: result.setdefault("rows", _stream(proc, tail)), daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # the whole group: a torchrun launcher takes its workers along
        proc.wait()
        rc = "timeout"
    reader.join(timeout=5)
    return result.get("rows", []), rc, tail


def run_stage(stage, ctx, timeout, in_process=False):
    """Rows of one stage; a crash, a timeout or a silent stage is a failed row (a timeout shortened by the budget
    is reported as not measured instead: the budget, not the stage, ran out)."""
    if in_process:
        try:
            return stage.run(ctx)
        except Exception as e:
            traceback.print_exc()
            return [Row(f"{stage.name} runs", f"crashed: {type(e).__name__}: {e}"[:200], False)]
    if callable(stage.run):
        argv = [sys.executable, os.path.abspath(__file__), "--stage", stage.name] + \
            (["--dry"] if ctx.dry else []) + (["--quick"] if ctx.quick else [])
    else:
        argv = list(stage.run)
    rows, rc, tail = run_child(stage, argv, timeout)
    if rc == "timeout" and timeout < stage.timeout:
        return rows + [Row(f"{stage.name}", f"skipped: the budget ran out after {timeout} s", None)]
    if not callable(stage.run):
        return stage.check(rc, tail) if stage.check else [Row(f"{stage.name}: exit code 0", f"exit {rc}", rc == 0)]
    if rc == "timeout":
        rows.append(Row(f"{stage.name} finishes within {timeout} s", "timed out", False))
    elif rc != 0:
        last = next((t.strip() for t in reversed(tail) if t.strip()), "")
        rows.append(Row(f"{stage.name} runs", f"exit {rc}: {last}"[:200], False))
    elif not rows:
        rows.append(Row(f"{stage.name} reports", "no rows", False))
    return rows


def run_stages(stages, ctx, budget=None, in_process=False):
    """Run the stages in order within `budget` seconds; print each stage's rows as it ends. Returns all rows
    as (stage name, Row)."""
    t0 = time.perf_counter()
    out = []
    for st in stages:
        left = None if budget is None else budget - (time.perf_counter() - t0)
        missing = [m for m in st.needs if importlib.util.find_spec(m) is None]
        if ctx.dry and not st.dry:
            rows = [Row(f"{st.name}", "skipped: not part of --dry", None)]
        elif missing:
            rows = [Row(f"{st.name}", f"skipped: {', '.join(missing)} not installed", None)]
        elif left is not None and left < min(st.timeout, 30):
            rows = [Row(f"{st.name}", f"skipped: {left:.0f} s of the budget left", None)]
        else:
            timeout = st.timeout if left is None else min(st.timeout, int(left))
            print(f"\n== {st.name} (timeout {timeout} s)", flush=True)
            t = time.perf_counter()
            rows = run_stage(st, ctx, timeout, in_process)
            print(f"== {st.name}: {time.perf_counter() - t:.0f} s, "
                  f"{sum(r.ok is True for r in rows)} passed, {sum(r.ok is False for r in rows)} failed", flush=True)
        out += [(st.name, r) for r in rows]
    return out


def verdict(r):
    return {True: "pass", False: "FAIL", None: "-"}[r.ok]


def report(results, elapsed):
    """The goal table; returns the exit code."""
    print(f"\n## gpu_check: {elapsed:.0f} s\n")
    print("| stage | goal | measured | verdict |\n|---|---|---|---|")
    for name, r in results:
        print(f"| {name} | {r.goal} | {r.measured} | {verdict(r)} |")
    from kernels import tuning
    picked = tuning.disk_cache()
    if picked:
        print("\nconfigs the tuner picked (device | triton | op, head dim, causal, dtype, packed -> config):")
        for key, cfg in sorted(picked.items()):
            print(f"  {key} -> {tuple(cfg)}")
    wrong = sum(r.ok is False and r.kind == "correct" for _, r in results)
    missed = sum(r.ok is False and r.kind == "perf" for _, r in results)
    skipped = sum(r.measured.startswith("skipped") for _, r in results)
    print(f"\n{sum(r.ok is True for _, r in results)} passed, {wrong + missed} failed "
          f"({wrong} wrong results or crashes, {missed} goals missed), {skipped} stages skipped")
    return 1 if wrong else 2 if missed else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes, fewer stages: within 3 minutes")
    ap.add_argument("--dry", action="store_true", help="on the CPU: Triton interpreter, toy shapes, no goals judged")
    ap.add_argument("--only", default="", help="comma-separated stage names")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all stages (default 450, --quick 170, --dry none)")
    ap.add_argument("--in-process", action="store_true", help="run the stages in this process (no timeouts)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)             # a child: run one stage, print its rows
    ap.add_argument("--list", action="store_true", help="print the stages and exit")
    args = ap.parse_args(argv)
    if args.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")            # before triton is imported
    ctx = Ctx(dry=args.dry, quick=args.quick)
    if args.stage:
        rows = next(s for s in STAGES if s.name == args.stage).run(ctx)
        print(ROWS_TAG + json.dumps([dataclasses.asdict(r) for r in rows]), flush=True)
        return 0
    stages = [s for s in STAGES if (not args.quick or s.quick) and (not args.only or s.name in args.only.split(","))]
    if args.list:
        for s in stages:
            print(f"{s.name:20s} timeout {s.timeout:4d} s  {'quick ' if s.quick else ''}"
                  f"{'' if callable(s.run) else ' '.join(s.run)}")
        return 0
    budget = args.budget if args.budget is not None else None if args.dry else 170 if args.quick else 450
    t0 = time.perf_counter()
    results = run_stages(stages, ctx, budget, args.in_process)
    code = report(results, time.perf_counter() - t0)
    out = os.environ.get("OUT")
    if out and os.path.isdir(out):
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump([dict(stage=n, **dataclasses.asdict(r)) for n, r in results], f, indent=1)
    return code


if __name__ == "__main__":
    sys.exit(main())
