"""The one-shot GPU check: kernel correctness at real shapes, the benchmarks, and a table of every goal.

    python bench/gpu_check.py [--quick] [--only NAME,...] [--skip NAME,...] [--budget SECONDS]   # via gpu_check.sh
    python bench/gpu_check.py --dry [--in-process]       # the same code on the CPU: Triton interpreter, toy shapes
    python bench/gpu_check.py --list

Each stage runs in its own process under its own timeout (a hung kernel or a CUDA fault ends that stage only),
prints as it goes, and reports rows (goal, measured figure, verdict). Before it starts, its modules are imported in a
child: a stage that cannot import them FAILS, as does one the budget leaves no time for; only --skip NAME skips a
stage. The stage timeouts add up to the budget (8 minutes with the set-up), so a full run checks everything. The
closing table lists every row, then the path LLAVA_KERNELS=auto chose per shape class and the tuner's configs; the
exit code is 0 when every goal passed, 1 on a wrong result, a crash, a timeout or an unplanned skip, 2 when every
result is right but a speed or memory goal was missed.
Correctness follows FlashAttention's rule: our error against an fp32 oracle at most 2x (forward) / 3x (backward)
the error of torch's own same-precision computation (SDPA-flash, the naive log-prob path) against it.

Adding a stage: append Stage(name, run, timeout) to STAGES. run is either a function(ctx) -> [Row] (it runs in a
child process: `gpu_check.py --stage NAME`) or an argv list, a command whose goal is exit code 0 (or pass
check=function(returncode, output tail) -> [Row]).
"""

import argparse
import contextlib
import dataclasses
import importlib
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
    needs: tuple = ()         # the modules it imports (project and third-party): imported in a child before it runs
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
    # imported here: each stage runs in a child of its own, and a module it cannot import fails that stage
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
    # imported here: each stage runs in a child of its own, and a module it cannot import fails that stage
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
    # imported here: each stage runs in a child of its own, and a module it cannot import fails that stage
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
    # imported here: each stage runs in a child of its own, and a module it cannot import fails that stage
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


def stage_dispatch(ctx):
    """LLAVA_KERNELS=auto as training meets it: the path timed and chosen per shape class (SFT's padded and packed
    attention, CLIP's, the log-probs at V = 128,256), a Triton launch that fails falling back to SDPA without ending
    the run, and the SFT and DPO micro-batches of a model with fp32 weights under bf16 autocast: one dtype at every
    attention call (a Triton backward rejects bf16 x fp32) and, on CUDA, no host sync (sync debug mode "error")."""
    # imported here: each stage runs in a child of its own, and a module it cannot import fails that stage
    import torch
    import kernels
    from kernels import tuning
    dev, dt = ctx.device, ctx.dtype
    rows = []
    with kernels_env("auto" if not ctx.dry else "ref"):
        g = torch.Generator(dev).manual_seed(0)
        shapes = [("padded causal GQA 32/8 d128 T=4k", (1, 4096), 32, 8, 128, True, None),
                  ("packed causal GQA 32/8 d128, 8 seqs", (8 * 1024,), 32, 8, 128, True, 1024),
                  ("CLIP non-causal 16 heads d64 T=577 x5", (5, 577), 16, 16, 64, False, None)]
        if ctx.dry:
            shapes = [("padded causal GQA 4/2 d16 T=40", (1, 40), 4, 2, 16, True, None)]
        for name, shape, H, Hkv, D, causal, seq in shapes:
            q, k, v = (torch.randn(*shape, h, D, device=dev, dtype=dt, generator=g, requires_grad=True)
                       for h in (H, Hkv, Hkv))
            cu = torch.arange(0, shape[0] + 1, seq, dtype=torch.int32, device=dev) if seq else None
            o = kernels.attention(q, k, v, causal=causal, cu_seqlens=cu, max_seqlen=seq)
            o.sum().backward()
            ok = bool(torch.isfinite(o).all()) and q.grad is not None
            rows.append(Row(f"auto path for attention, {name}: runs forward and backward", "yes" if ok else "no", ok))
        if not ctx.dry:
            N, d, V = 4096, 4096, 128256
            h = torch.randn(N, d, device=dev, dtype=dt, generator=g, requires_grad=True)
            w = (torch.randn(V, d, device=dev, dtype=dt, generator=g) * 0.02).requires_grad_()
            lp = kernels.token_logprobs(h, w, torch.randint(0, V, (N,), device=dev, generator=g))
            lp.sum().backward()
            rows.append(Row(f"auto path for token_logprobs N={N} V={V}: runs", "yes", bool(torch.isfinite(lp).all())))
        for key, path in sorted(tuning.paths().items()):
            rows.append(Row(f"path chosen: {' '.join(map(str, key))}", path, None, "perf"))
        if not ctx.dry:                        # a launch that fails: SDPA's answer, one loud line, the run goes on
            real = kernels.attention_triton

            def broken(*a, **kw):
                raise RuntimeError("a launch failure planted by gpu_check")
            kernels.attention_triton = broken
            try:
                q, k, v = (torch.randn(1, 2048, h, 128, device=dev, dtype=dt, generator=g) for h in (32, 8, 8))
                tuning._paths[("attention", 128, True, str(dt)[6:], False, 2048, "infer")] = "triton"
                got = kernels.attention(q, k, v)
                with kernels_env("ref"):
                    want = kernels.attention(q, k, v)
                ok = torch.equal(got, want)
            except Exception as e:                                         # noqa: BLE001
                ok = False
                print(f"  fallback raised {type(e).__name__}: {e}")
            finally:
                kernels.attention_triton = real
            rows.append(Row("a failing Triton launch falls back to SDPA (same output, run goes on)",
                            "yes" if ok else "no", ok))
    rows += _micro_batches(ctx)
    for r in rows:
        print(f"  {r.goal}: {r.measured} {'' if r.ok is None else 'ok' if r.ok else 'FAIL'}", flush=True)
    return rows


def _micro_batches(ctx):
    """train_sft.py's and train_dpo.py's micro-batch (forward + backward) on a small model with fp32 weights under
    bf16 autocast (fp32 under --dry: CPU autocast runs no Triton), with kernels.attention spied on for its dtypes;
    on CUDA inside torch.cuda.set_sync_debug_mode("error"), which raises at any host sync."""
    # imported here: each stage runs in a child of its own, and a module it cannot import fails that stage
    from types import SimpleNamespace
    import torch
    import kernels
    import train_dpo
    import train_sft
    from bench.sft_speed import TINY_CONFIG
    from model import LlavaNext, LlavaNextConfig
    from model.anyres import num_crops, num_image_tokens
    dev = torch.device(ctx.device)
    cfg = LlavaNextConfig.from_dict(TINY_CONFIG)
    model = LlavaNext.from_config(cfg, device=dev).train()
    S, img = cfg.vision.image_size, cfg.image_token_index
    size = (2 * S, 2 * S)
    n_img, crops = num_image_tokens(size, cfg.image_grid_pinpoints, S, cfg.vision.grid), \
        num_crops(size, cfg.image_grid_pinpoints, S)
    g = torch.Generator().manual_seed(0)

    def row(n_text):
        t = torch.randint(0, img, (n_text,), generator=g)
        return torch.cat([t[:5], torch.full((n_img,), img), t[5:]])
    seqs = [row(30), row(30), row(41), row(37)]             # 2 pairs: chosen rows, then rejected rows
    lens = [len(x) for x in seqs]
    ids = torch.cat(seqs)[None]
    targets = torch.where(ids == img, -100, ids.roll(-1, 1))
    targets[0, torch.tensor(lens).cumsum(0) - 1] = -100
    mb = {"n": 4, "input_ids": ids, "targets": targets, "cu_seqlens": torch.tensor([0, *torch.tensor(lens).cumsum(0)],
                                                                                  dtype=torch.int32),
          "max_seqlen": max(lens), "target_rows": (targets.reshape(-1) != -100).nonzero()[:, 0],
          "pixel_values": torch.randn(4 * crops, 3, S, S, generator=g), "image_sizes": torch.tensor([size] * 4),
          "ids": ["a", "b"]}
    pin = (lambda t: t.pin_memory()) if dev.type == "cuda" else (lambda t: t)
    mb = {k: pin(v) if torch.is_tensor(v) and k != "image_sizes" else v for k, v in mb.items()}
    seen, real = [], kernels.attention

    def spy(q, k, v, *a, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, *a, **kw)
    compute = torch.float32 if ctx.dry else torch.bfloat16
    d = SimpleNamespace(device=dev)
    sync_mode = (lambda m: torch.cuda.set_sync_debug_mode(m)) if dev.type == "cuda" else (lambda m: None)
    rows = []
    kernels.attention = spy
    try:
        for name, step in (
                ("SFT", lambda: train_sft.train_micro_batch(model, mb, d, compute, "token", 100.0, 1)),
                ("DPO", lambda: train_dpo.train_micro_batch(         # 2 pairs: the images of the first 2 rows
                    model, None, dict(mb, n=2, pixel_values=mb["pixel_values"][:2 * crops],
                                      image_sizes=mb["image_sizes"][:2], ref=pin(torch.zeros(2, 2))), d, compute,
                    SimpleNamespace(beta=0.1, label_smoothing=0.0, sft_weight=0.0), 2, 0, 1))):
            seen.clear()
            with kernels_env("auto" if not ctx.dry else "ref"):
                step()                                   # warm-up: the timed path choices and tuning sync, once
                sync_mode("error")
                try:
                    step()
                    err = None
                except RuntimeError as e:
                    err = str(e).splitlines()[0][:120]
                finally:
                    sync_mode("default")
            one = len(set(seen)) == 1 and len(set(seen[0])) == 1
            rows.append(Row(f"{name} micro-batch, fp32 weights under {str(compute)[6:]} autocast: one dtype at every "
                            "attention call", ", ".join(sorted({str(x) for x in set(seen)})), one))
            rows.append(Row(f"{name} micro-batch: no host sync" + (" (not measured on the CPU)" if ctx.dry else ""),
                            err or "none", None if ctx.dry else err is None))
    finally:
        kernels.attention = real
    return rows


def stage_attention_bench(ctx):
    # imported here: each stage runs in a child of its own, and a module it cannot import fails that stage
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
    # imported here: each stage runs in a child of its own, and a module it cannot import fails that stage
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
    # imported here: each stage runs in a child of its own, and a module it cannot import fails that stage
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
    # imported here: each stage runs in a child of its own, and a module it cannot import fails that stage
    from bench import dpo_speed
    with kernels_env("ref" if ctx.dry else "auto"):
        r = dpo_speed.main(["--smoke", "--steps", "1"] if ctx.dry else ["--steps", "3" if ctx.quick else "6"])
    return [Row(f"DPO step, 2 pairs x 2 x 2k tokens, {k} reference", f"{v:.2f} pairs/s", None, "perf")
            for k, v in r.items()]


def stage_sampling(ctx):
    """Sampling at 8B shapes: 8 prompts of ~3k tokens x 32 samples x 256 tokens, decode tokens/s and peak memory,
    the in-place KV cache against the implementation before it (from git history, when present)."""
    # imported here: each stage runs in a child of its own, and a module it cannot import fails that stage
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
    return rows or [Row("FSDP2 smoke over every GPU", f"exit {returncode}", False)]


# timeouts, cold (Triton compiling included): they add up to BUDGET, which with gpu_check.sh's set-up fits 8 minutes
STAGES = [
    Stage("env", stage_env, 20, needs=("torch", "triton")),
    Stage("attention-correct", stage_attention_correct, 75, needs=("bench.kernels_bench", "kernels")),
    Stage("logprobs-correct", stage_logprobs_correct, 35, needs=("kernels",)),
    Stage("dispatch", stage_dispatch, 45, needs=("kernels", "model", "train_sft", "train_dpo", "bench.sft_speed")),
    Stage("attention-bench", stage_attention_bench, 45, quick=False, needs=("bench.kernels_bench",)),
    Stage("logprobs-bench", stage_logprobs_bench, 25, quick=False, needs=("bench.kernels_bench",)),
    Stage("sft-mfu", stage_sft, 45, quick=False, needs=("bench.sft_speed",)),
    Stage("sampling", stage_sampling, 35, quick=False, needs=("bench.generate_speed",)),
    Stage("dpo-step", stage_dpo, 35, quick=False, needs=("bench.dpo_speed",)),
    Stage("fsdp-smoke", [sys.executable, "bench/fsdp_smoke.py"], 45, quick=False, needs=("bench.fsdp_smoke",),
          check=check_fsdp_smoke, dry=False),
    Stage("kernel-tests", [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "tests/test_kernels.py", "-k", "not every_cuda"], 55, quick=False,
          needs=("pytest", "kernels", "model"), dry=False),
]
BUDGET = sum(s.timeout for s in STAGES)                             # 460 s
QUICK_BUDGET = sum(s.timeout for s in STAGES if s.quick)            # 175 s: correctness and dispatch


# ------------------------------------------------------------------------------------------------ runner

IMPORTS_TAG = "@@gpu_check imports "
IMPORTED = {}                 # stage name -> the top-level modules its child had imported when it ended (tests)


def _stream(proc, tail, name):
    """Print a child's output as it comes; collect its rows (and the modules it imported)."""
    rows = []
    for line in proc.stdout:
        if line.startswith(ROWS_TAG):
            rows += [Row(**r) for r in json.loads(line[len(ROWS_TAG):])]
            continue
        if line.startswith(IMPORTS_TAG):
            IMPORTED[name] = set(json.loads(line[len(IMPORTS_TAG):]))
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
    reader = threading.Thread(target=lambda: result.setdefault("rows", _stream(proc, tail, stage.name)), daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # the whole group: a torchrun launcher takes its workers along
        proc.wait()
        rc = "timeout"
    reader.join(timeout=5)
    return result.get("rows", []), rc, tail


def import_errors(stages):
    """{stage name: the first import error} for the stages whose modules do not import, found in one child process
    (the project's modules and the packages they pull in, as a stage's child would import them)."""
    mods = sorted({m for st in stages for m in st.needs})
    code = ("import importlib, json, sys\nsys.path[:0] = [%r, %r]\nbad = {}\n"
            "for m in %r:\n    try:\n        importlib.import_module(m)\n"
            "    except Exception as e:\n        bad[m] = f'{type(e).__name__}: {e}'\nprint(json.dumps(bad))"
            % (ROOT, os.path.join(ROOT, "tests"), mods))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    try:
        bad = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        bad = {m: f"the import check itself failed: {out.stderr.strip()[-200:]}" for m in mods}
    return {st.name: f"{m}: {bad[m]}"[:200] for st in stages for m in st.needs if m in bad}


def run_stage(stage, ctx, timeout, in_process=False):
    """Rows of one stage; a crash, a timeout or a silent stage is a failed row, and so is a timeout that the budget
    shortened (the check did not happen)."""
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
        return rows + [Row(f"{stage.name} finishes", f"not run to its end: the budget ran out after {timeout} s",
                           False)]
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


def run_stages(stages, ctx, budget=None, in_process=False, skip=()):
    """Run the stages in order within `budget` seconds; print each stage's rows as it ends. Returns all rows as
    (stage name, Row). Only a stage named in `skip` (or one that is no part of --dry) is skipped without failing:
    one whose modules do not import, or which the budget leaves no time for, is a failed row."""
    t0 = time.perf_counter()
    planned = [st for st in stages if st.name not in skip and not (ctx.dry and not st.dry)]
    broken = import_errors(planned)
    out = []
    for st in stages:
        left = None if budget is None else budget - (time.perf_counter() - t0)
        if st.name in skip:
            rows = [Row(f"{st.name}", "skipped: --skip", None)]
        elif ctx.dry and not st.dry:
            rows = [Row(f"{st.name}", "skipped: not part of --dry", None)]
        elif st.name in broken:
            rows = [Row(f"{st.name}: its modules import", broken[st.name], False)]
        elif left is not None and left < min(st.timeout, 30):
            rows = [Row(f"{st.name} runs", f"not run: {left:.0f} s of the budget left", False)]
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
    """The goal table, the kernel paths and configs chosen on this GPU; returns the exit code."""
    print(f"\n## gpu_check: {elapsed:.0f} s\n")
    print("| stage | goal | measured | verdict |\n|---|---|---|---|")
    for name, r in results:
        print(f"| {name} | {r.goal} | {r.measured} | {verdict(r)} |")
    from kernels import tuning              # (here: the parent imports no project module until the report)
    cached = tuning.disk_cache()
    paths = {k: v for k, v in cached.items() if "|path|" in k}
    if paths:
        print("\npath LLAVA_KERNELS=auto chose per shape class (device | torch | triton | kernels | op, dims, causal, "
              "dtype, packed, length bucket, train/infer -> path):")
        for key, path in sorted(paths.items()):
            print(f"  {key.replace('|path|', '|')} -> {path}")
    configs = {k: v for k, v in cached.items() if k not in paths}
    if configs:
        print("\nconfigs the tuner picked (device | torch | triton | kernels | op, head dim, causal, dtype, packed, "
              "length bucket -> config):")
        for key, cfg in sorted(configs.items()):
            print(f"  {key} -> {tuple(cfg)}")
    wrong = sum(r.ok is False and r.kind == "correct" for _, r in results)
    missed = sum(r.ok is False and r.kind == "perf" for _, r in results)
    skipped = sum(r.measured.startswith("skipped") for _, r in results)
    print(f"\n{sum(r.ok is True for _, r in results)} passed, {wrong + missed} failed "
          f"({wrong} wrong results, crashes or unchecked stages, {missed} goals missed), {skipped} stages skipped "
          "on purpose")
    return 1 if wrong else 2 if missed else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="correctness and dispatch only, smaller shapes: within 3 minutes")
    ap.add_argument("--dry", action="store_true", help="on the CPU: Triton interpreter, toy shapes, no goals judged")
    ap.add_argument("--only", default="", help="comma-separated stage names")
    ap.add_argument("--skip", default="", help="comma-separated stage names to skip on purpose (any other skip fails)")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for all stages (default {BUDGET}, --quick {QUICK_BUDGET}, --dry none)")
    ap.add_argument("--in-process", action="store_true", help="run the stages in this process (no timeouts)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)             # a child: run one stage, print its rows
    ap.add_argument("--list", action="store_true", help="print the stages and exit")
    args = ap.parse_args(argv)
    if args.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")            # before triton is imported
    ctx = Ctx(dry=args.dry, quick=args.quick)
    names = {s.name for s in STAGES}
    unknown = [n for n in (args.only + "," + args.skip).split(",") if n and n not in names]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; the stages: {', '.join(sorted(names))}")
    if args.stage:
        rows = next(s for s in STAGES if s.name == args.stage).run(ctx)
        print(ROWS_TAG + json.dumps([dataclasses.asdict(r) for r in rows]), flush=True)
        print(IMPORTS_TAG + json.dumps(sorted({m.split(".")[0] for m in sys.modules})), flush=True)
        return 0
    stages = [s for s in STAGES if (not args.quick or s.quick) and (not args.only or s.name in args.only.split(","))]
    if args.list:
        for s in stages:
            print(f"{s.name:20s} timeout {s.timeout:4d} s  {'quick ' if s.quick else ''}"
                  f"{'' if callable(s.run) else ' '.join(s.run)}")
        return 0
    budget = args.budget if args.budget is not None else None if args.dry else QUICK_BUDGET if args.quick else BUDGET
    t0 = time.perf_counter()
    results = run_stages(stages, ctx, budget, args.in_process, skip=set(filter(None, args.skip.split(","))))
    code = report(results, time.perf_counter() - t0)
    out = os.environ.get("OUT")
    if out and os.path.isdir(out):
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump([dict(stage=n, **dataclasses.asdict(r)) for n, r in results], f, indent=1)
    return code


if __name__ == "__main__":
    sys.exit(main())
