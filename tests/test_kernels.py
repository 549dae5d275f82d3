"""Triton kernels against torch math, by FlashAttention's rule: our error against an fp64 reference at most ~2x
(forward) / ~3x (backward) the error of the same-precision torch computation against it.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest); bf16 runs only on CUDA
(the interpreter's tl.dot is wrong for bf16).
"""

import importlib

import pytest
import torch

import kernels
from helpers import DEVICE
from kernels import tuning
from kernels.attention import attention_triton
from kernels.logprobs import ChunkedLogProbs, TritonLogProbs, token_logprobs_ref

A = importlib.import_module("kernels.attention")          # kernels.attention is also the public function
LP = importlib.import_module("kernels.logprobs")

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="bf16 tl.dot is wrong in Triton's CPU interpreter; bf16 is tested on CUDA"))]
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def check(name, ours, same_precision, oracle, factor):
    """|ours - oracle| <= factor * |same_precision - oracle| + a few ulps (so exact references do not demand 0)."""
    ours, same_precision, oracle = ours.double(), same_precision.double(), oracle.double()
    err, err_pt = (ours - oracle).abs().max().item(), (same_precision - oracle).abs().max().item()
    ulps = 8 * EPS[torch.float32] * max(1.0, oracle.abs().max().item())
    assert err <= factor * err_pt + ulps, (f"{name}: max error {err:.3g} > {factor} x torch's {err_pt:.3g} + {ulps:.2g}"
                                            f" (mean {(ours - oracle).abs().mean().item():.3g})")


# ------------------------------------------------------------------------------------------------ attention

def math_attention(q, k, v, causal):
    """Attention written out in the inputs' precision (scores and P rounded to it, softmax in fp32)."""
    G = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    s = torch.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
    if causal:
        T = q.shape[1]
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    p = torch.softmax(s.float(), -1).to(q.dtype)
    return torch.einsum("bhts,bshd->bthd", p, v)


def run_attention(fn, q, k, v, do, **kw):
    q, k, v = (x.detach().clone().requires_grad_(do is not None) for x in (q, k, v))
    o = fn(q, k, v, **kw)
    if do is None:
        return (o,)
    o.backward(do)
    return o, q.grad, k.grad, v.grad


def compare_attention(q, k, v, causal, cu_seqlens=None, backward=True):
    do = torch.randn_like(q) if backward else None
    do64 = do.double() if backward else None
    if cu_seqlens is None:
        ours = run_attention(attention_triton, q, k, v, do, causal=causal)
        pt = run_attention(math_attention, q, k, v, do, causal=causal)
        ref = run_attention(math_attention, q.double(), k.double(), v.double(), do64, causal=causal)
    else:
        ours = run_attention(attention_triton, q, k, v, do, causal=causal, cu_seqlens=cu_seqlens,
                             max_seqlen=int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))
        bounds = cu_seqlens.tolist()

        def per_seq(q, k, v, causal):
            return torch.cat([math_attention(q[None, a:b], k[None, a:b], v[None, a:b], causal)[0]
                              for a, b in zip(bounds, bounds[1:])])

        pt = run_attention(per_seq, q, k, v, do, causal=causal)
        ref = run_attention(per_seq, q.double(), k.double(), v.double(), do64, causal=causal)
    for name, a, b, c, f in zip(["out", "dq", "dk", "dv"], ours, pt, ref, [2, 3, 3, 3]):
        check(name, a, b, c, f)


SHAPES = [  # (B, T, Hq, Hkv, D)
    (2, 1, 2, 2, 16), (2, 17, 4, 2, 16), (1, 129, 4, 1, 32), (3, 45, 2, 2, 24),   # lengths 1, 17, 129; odd D
    (1, 77, 8, 2, 64), (1, 33, 2, 1, 128),                                         # CLIP and Llama-3 head dims
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_T{}_H{}x{}_D{}".format(*s))
def test_attention_padded(shape, causal, dtype):
    B, T, H, Hkv, D = shape
    g = torch.Generator().manual_seed(T * 7 + D)
    q, k, v = (torch.randn(B, T, h, D, generator=g).to(DEVICE, dtype) for h in (H, Hkv, Hkv))
    compare_attention(q, k, v, causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [[37], [1, 17, 5, 1, 40], [3, 0, 9]], ids=str)
def test_attention_varlen(lengths, causal, dtype):
    g = torch.Generator().manual_seed(len(lengths))
    N = sum(lengths)
    q, k, v = (torch.randn(N, h, 16, generator=g).to(DEVICE, dtype) for h in (4, 2, 2))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    compare_attention(q, k, v, causal, cu)


def test_varlen_equals_padded_per_sequence():
    """Packed sequences attend only within themselves: each equals its own padded run."""
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 23]
    q, k, v = (torch.randn(sum(lengths), h, 16, generator=g).to(DEVICE) for h in (4, 1, 1))
    cu = torch.tensor([0, 5, 6, 29], dtype=torch.int32, device=DEVICE)
    packed = attention_triton(q, k, v, True, cu, 23)
    for a, b in zip(cu.tolist(), cu.tolist()[1:]):
        alone = attention_triton(q[None, a:b], k[None, a:b], v[None, a:b], True)[0]
        torch.testing.assert_close(packed[a:b], alone, atol=1e-6, rtol=1e-6)


def test_deterministic_mode_takes_the_split_backward():
    """Under torch.use_deterministic_algorithms the backward builds dQ in its own kernel (no atomics)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 70, h, 32, generator=g).to(DEVICE) for h in (4, 2, 2))
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        compare_attention(q, k, v, causal=True)
        picked = A.configs("bwd", 32, interpret=DEVICE == "cpu", deterministic=True)
        assert picked and all(c[0] == "split" for c in picked)
    finally:
        torch.use_deterministic_algorithms(was)


CUDA_DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16
OPS = (("fwd", "attn_fwd"), ("bwd", "attn_bwd"))
CUDA_CONFIGS = [(op, D, c, CUDA_DTYPE) for D in sorted(A.CUDA) for kind, op in OPS for c in A.CUDA[D][kind]] + \
    [(op, 64, c, torch.float32) for kind, op in OPS for c in A.CUDA_FP32[kind]]


@pytest.mark.parametrize("op,D,cfg,dtype", CUDA_CONFIGS, ids=lambda x: str(x).replace(" ", "").replace("torch.", ""))
def test_every_cuda_attention_config(op, D, cfg, dtype):
    """Each config the tuner may pick on a GPU, forced, on two packed causal sequences: 200 tokens (with 128-key
    blocks: diagonal steps, unmasked steps and a partial last block in every pass) and 7: the interpreter runs the
    same tiles as sm_90 would (head dim 32 for every set: the tiles, not the head dim, are what differ)."""
    g = torch.Generator().manual_seed(D)
    q, k, v = (torch.randn(207, h, 32, generator=g).to(DEVICE, dtype) for h in (2, 1, 1))
    cu = torch.tensor([0, 200, 207], dtype=torch.int32, device=DEVICE)
    with tuning.force(op, cfg):
        compare_attention(q, k, v, True, cu, backward=op == "attn_bwd")


# ------------------------------------------------------------------------------------------------ log-probs

def run_logprobs(fn, h, w, y, g):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    lp = fn(h, w, y)
    lp.backward(g)
    return lp, h.grad, w.grad


def compare_logprobs(h, w, y, ignore_index=-100):
    g = torch.randn(h.shape[0], device=h.device, generator=torch.Generator(h.device).manual_seed(1))

    def ours(h, w, y):
        return kernels.token_logprobs(h, w, y, ignore_index)

    def ref(h, w, y):
        return token_logprobs_ref(h, w, y, ignore_index)

    results = run_logprobs(ours, h, w, y, g)
    pt = run_logprobs(ref, h, w, y, g)
    oracle = run_logprobs(ref, h.double(), w.double(), y, g.double())
    assert results[0].dtype == torch.float32
    for name, a, b, c, f in zip(["logp", "dh", "dW"], results, pt, oracle, [2, 3, 3]):
        check(name, a, b, c, f)
    return results


LP_SHAPES = [(1, 16, 77), (37, 48, 300), (130, 64, 1000), (64, 40, 2049)]   # V never a multiple of the tile


@pytest.mark.parametrize("backend", ["triton", "ref"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LP_SHAPES, ids=lambda s: "N{}_d{}_V{}".format(*s))
def test_token_logprobs(shape, dtype, backend, monkeypatch):
    monkeypatch.setenv("LLAVA_KERNELS", backend)
    N, d, V = shape
    g = torch.Generator().manual_seed(N)
    h = torch.randn(N, d, generator=g).to(DEVICE, dtype)
    w = (torch.randn(V, d, generator=g) * 0.5).to(DEVICE, dtype)
    y = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    y[::3] = -100                                           # some rows ignored
    lp, dh, _ = compare_logprobs(h, w, y)
    ignored = (y == -100).nonzero()[:, 0]
    assert (lp[ignored] == 0).all() and (dh[ignored] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "ref"])
def test_token_logprobs_none_and_all_ignored(backend, monkeypatch):
    monkeypatch.setenv("LLAVA_KERNELS", backend)
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(9, 32, generator=g).to(DEVICE), torch.randn(100, 32, generator=g).to(DEVICE)
    compare_logprobs(h, w, torch.randint(0, 100, (9,), generator=g).to(DEVICE))          # none ignored
    h.requires_grad_(), w.requires_grad_()
    lp = kernels.token_logprobs(h, w, torch.full((9,), -7, device=DEVICE), ignore_index=-7)
    assert torch.equal(lp, torch.zeros(9, device=DEVICE))
    lp.sum().backward()                                     # still in the graph: zero gradients, not None
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_token_logprobs_llama3_vocabulary(monkeypatch):
    """V = 128320 (llama3-llava-next), a handful of rows, labels at both ends of the vocabulary."""
    monkeypatch.setenv("LLAVA_KERNELS", "triton")
    g = torch.Generator().manual_seed(0)
    V, d = 128320, 16
    h, w = torch.randn(4, d, generator=g).to(DEVICE), torch.randn(V, d, generator=g).to(DEVICE)
    compare_logprobs(h, w, torch.tensor([0, 128319, 64000, -100], device=DEVICE))


@pytest.mark.parametrize("op,cfg,dtype", [(f"logprobs_{k}", c, CUDA_DTYPE) for k in ("fwd", "dlogits")
                                          for c in LP.CUDA[k]] + [("logprobs_fwd", LP.CUDA_FP32, torch.float32)],
                         ids=lambda x: str(x).replace(" ", "").replace("torch.", ""))
def test_every_cuda_logprobs_config(op, cfg, dtype, monkeypatch):
    monkeypatch.setenv("LLAVA_KERNELS", "triton")
    g = torch.Generator().manual_seed(5)
    h = torch.randn(37, 48, generator=g).to(DEVICE, dtype)
    w = (torch.randn(1000, 48, generator=g) * 0.5).to(DEVICE, dtype)
    with tuning.force(op, cfg):
        compare_logprobs(h, w, torch.randint(0, 1000, (37,), generator=g).to(DEVICE))


def test_backward_uses_per_row_gradients():
    """DPO sends a different gradient to every row: d(sum_i g_i logp_i)/dh_i must scale with g_i."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(6, 16, generator=g).to(DEVICE), torch.randn(50, 16, generator=g).to(DEVICE)
    y = torch.randint(0, 50, (6,), generator=g).to(DEVICE)
    for fn in (TritonLogProbs, ChunkedLogProbs):
        hh = h.clone().requires_grad_()
        fn.apply(hh, w, y).backward(torch.tensor([1.0, 0.0, -2.0, 3.0, 0.5, 0.0], device=DEVICE))
        one = h.clone().requires_grad_()
        fn.apply(one, w, y).backward(torch.ones(6, device=DEVICE))
        torch.testing.assert_close(hh.grad[2], -2.0 * one.grad[2])
        assert torch.equal(hh.grad[1], torch.zeros(16, device=DEVICE))


def test_bad_labels_are_refused():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        kernels.token_logprobs(torch.randn(2, 4), torch.randn(10, 4), torch.tensor([3, 10]))


# ------------------------------------------------------------------------------------------------ tuning

def test_grid_fills_whole_waves():
    """The log-prob forward's V split: 32 row blocks on 132 one-block SMs -> 4 splits (128 programs, one wave),
    not 9 (288 programs: 2.2 waves padded to 3)."""
    assert tuning.whole_waves(32, 1000, 132) == 4
    assert tuning.whole_waves(128, 1000, 132) == 1
    assert tuning.whole_waves(1, 3, 132) == 3                 # never more splits than V blocks
    assert tuning.whole_waves(200, 1000, 132) == 7            # 1400 programs in 11 waves: 96% of the ideal


def test_resident_blocks_from_registers_and_shared_memory(monkeypatch):
    class Props:
        multi_processor_count, regs_per_multiprocessor = 132, 65536
        shared_memory_per_multiprocessor, max_threads_per_multi_processor = 228 * 1024, 2048

    class Compiled:
        def __init__(self, regs, warps, shared):
            self.n_regs, self.metadata = regs, type("M", (), dict(num_warps=warps, shared=shared))

        def _init_handles(self):
            pass

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    assert tuning.resident_blocks(Compiled(254, 8, 96 * 1024), 0) == 132         # registers: 1 block per SM
    assert tuning.resident_blocks(Compiled(128, 4, 96 * 1024), 0) == 2 * 132     # shared memory: 2
    assert tuning.resident_blocks(Compiled(32, 4, 0), 0) == 16 * 132             # threads: 2048 / 128


def test_tuning_picks_the_first_config_without_a_gpu_and_force_overrides():
    x = torch.zeros(1)
    assert not tuning.tuning_enabled(x, large=True)
    assert tuning.pick(("op",), [(1,), (2,)], lambda c: 1 / 0, tune=False) == (1,)
    with tuning.force("op", (2,)):
        assert tuning.pick(("op",), [(1,), (2,)], lambda c: 1 / 0, tune=False) == (2,)
    assert tuning.pick(("op",), [(1,), (2,)], lambda c: 1 / 0, tune=False) == (1,)


# ------------------------------------------------------------------------------------------------ dispatch

def test_switch_is_read_at_call_time(monkeypatch):
    x = torch.zeros(1, device=DEVICE)
    monkeypatch.setenv("LLAVA_KERNELS", "ref")
    assert kernels.backend(x) == "ref"
    monkeypatch.setenv("LLAVA_KERNELS", "triton")
    assert kernels.backend(x) == "triton"
    monkeypatch.setenv("LLAVA_KERNELS", "cuda")
    with pytest.raises(ValueError, match="expected 'ref', 'triton' or 'auto'"):
        kernels.backend(x)


def test_model_runs_on_the_triton_kernels(monkeypatch):
    """Both towers go through kernels.attention: forcing Triton gives the reference model's logits and grads."""
    pytest.importorskip("transformers")
    from helpers import make_hf_model
    from model import LlavaNext
    from helpers import batch_for
    import tempfile
    hf = make_hf_model("llama")
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = LlavaNext.from_pretrained(d, device=DEVICE)
    batch = batch_for(model)
    n = int(batch["attention_mask"][1].sum())
    ids, px, sizes = batch["input_ids"][1:2, :n].to(DEVICE), batch["pixel_values"][:1].to(DEVICE), \
        batch["image_sizes"][:1]
    out = {}
    for backend in ("ref", "triton"):
        monkeypatch.setenv("LLAVA_KERNELS", backend)
        model.zero_grad()
        logits = model(ids, px, sizes)
        logits.float().logsumexp(-1).sum().backward()
        out[backend] = (logits.detach(), model.vision_tower.encoder.layers[0].self_attn.q_proj.weight.grad.clone(),
                        model.language_model.layers[1].self_attn.k_proj.weight.grad.clone())
    for a, b in zip(out["triton"], out["ref"]):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ one dtype per call

def tiny_model_and_batch():
    """A random tiny LLaVA-NeXT (fp32 weights) and a right-padded batch: text only, one image, two images."""
    from helpers import PINPOINTS, hf_config_dict, mixed_batch
    from model import ImageProcessor, LlavaNext, LlavaNextConfig
    from model.anyres import num_image_tokens
    model = LlavaNext.from_config(LlavaNextConfig.from_dict(hf_config_dict("llama")))
    cfg = model.config

    def n_tokens(h, w):
        return num_image_tokens((h, w), cfg.image_grid_pinpoints, cfg.vision.image_size, cfg.vision.grid)
    ids, mask, images = mixed_batch(n_tokens, cfg.image_token_index, cfg.text.vocab_size)
    pv, sizes = ImageProcessor(PINPOINTS, crop_size=42)(images)
    return model, ids, mask, pv, sizes


def test_attention_gets_one_dtype_under_cpu_autocast_with_fp32_weights(monkeypatch):
    """Training keeps fp32 weights under bf16 autocast: q, k and v must reach kernels.attention in one dtype, the
    compute dtype, in both towers, padded and packed (a CUDA Triton backward rejects bf16 x fp32 operands)."""
    monkeypatch.setenv("LLAVA_KERNELS", "ref")
    model, ids, mask, pv, sizes = tiny_model_and_batch()
    seen, real = [], kernels.attention

    def spy(q, k, v, *args, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, *args, **kw)
    monkeypatch.setattr(kernels, "attention", spy)
    targets = torch.where(mask.bool(), ids.roll(-1, 1), -100)
    n = int(mask[2].sum())
    cu = torch.tensor([0, n], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = model(ids, pv, sizes, mask, targets=targets)                                  # padded, both towers
        lp = lp.sum() + model(ids[2:, :n].reshape(1, -1), pv[1:], sizes[1:], cu_seqlens=cu, max_seqlen=n,
                              targets=targets[2:, :n].reshape(1, -1)).sum()                  # packed
    lp.backward()
    assert len(seen) == 2 * (model.config.text.num_hidden_layers + 2), seen      # 2 CLIP layers run, 2 blocks
    assert set(seen) == {(torch.bfloat16,) * 3}, seen


def test_attention_never_mixes_dtypes(monkeypatch):
    """Under autocast kernels.attention casts to the autocast dtype (as SDPA gets from autocast); without it mixed
    dtypes are an error, not a silent promotion."""
    monkeypatch.setenv("LLAVA_KERNELS", "ref")
    q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16)
    v = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    got = []
    monkeypatch.setattr(kernels, "attention_ref", lambda q, k, v, **kw: got.append((q.dtype, k.dtype, v.dtype)) or v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernels.attention(q, k, v)
    assert got == [(torch.bfloat16,) * 3]
    with pytest.raises(ValueError, match="mixed dtypes"):
        kernels.attention(q, k, v)


# ------------------------------------------------------------------------------------------------ timed dispatch

def test_auto_keeps_triton_only_where_it_ran_and_was_as_fast(monkeypatch, capsys):
    """LLAVA_KERNELS=auto on CUDA: per shape class, Triton wins only when it ran and was at least as fast; a
    Triton that raised sends its class to torch with one loud line; each class is decided once."""
    monkeypatch.setattr(tuning, "_paths", {})
    ms = {"fast": 1.0, "slow": 3.0}

    def timer(fn):
        return ms[fn()]

    assert tuning.prefer(("attention", 128, True, "bfloat16", False, 4096, "train"), lambda: "fast", lambda: "slow",
                         timer=timer) == "triton"
    assert tuning.prefer(("attention", 128, True, "bfloat16", False, 8192, "train"), lambda: "slow", lambda: "fast",
                         timer=timer) == "torch"
    calls = []
    assert tuning.prefer(("attention", 128, True, "bfloat16", False, 8192, "train"), lambda: calls.append(1),
                         lambda: calls.append(1), timer=timer) == "torch"
    assert calls == []                                         # decided once per class
    assert tuning.prefer(("attention", 64, False, "bfloat16", False, 1024, "infer"), lambda: 1 / 0, lambda: "fast",
                         timer=timer) == "torch"
    err = capsys.readouterr().err
    assert "-> triton" in err and "-> torch" in err
    assert "WARNING: attention 64 False bfloat16 False 1024 infer: the Triton kernel failed" in err
    assert set(tuning.paths().values()) == {"triton", "torch"}


def test_a_failing_triton_launch_falls_back_to_torch_and_the_run_goes_on(monkeypatch, capsys):
    """A Triton forward or backward that raises under auto: torch's result instead, the class demoted, one loud line."""
    monkeypatch.setattr(tuning, "_paths", {})
    monkeypatch.setattr(kernels, "mode", lambda: "auto")
    monkeypatch.setattr(kernels, "backend", lambda x: "triton")       # as on CUDA
    monkeypatch.setattr(kernels, "_timed", lambda *a, **kw: "triton")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, h, 16, generator=g) for h in (4, 2, 2))
    want = run_attention(A.attention_ref, q, k, v, torch.ones_like(q))

    def broken(*a, **kw):
        raise RuntimeError("out of resource: shared memory")
    monkeypatch.setattr(kernels, "attention_triton", broken)          # the forward launch fails
    got = run_attention(kernels.attention, q, k, v, torch.ones_like(q))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert "WARNING: attention 16 True float32 False 1024 train: the Triton kernel failed" in capsys.readouterr().err
    assert tuning.paths()[("attention", 16, True, "float32", False, 1024, "train")] == "torch"

    # the forward runs (the interpreter's real kernel), the backward launch fails: torch's gradients instead
    monkeypatch.setattr(kernels, "attention_triton", attention_triton)
    monkeypatch.setattr(A.TritonAttention, "_backward", staticmethod(broken))
    got = run_attention(kernels.attention, q, k, v, torch.ones_like(q))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_tuned_configs_are_kept_per_length_bucket():
    """A tile config picked at 1k tokens is not reused at 24k: the tuning key carries the length bucket."""
    q = torch.zeros(1, 8, 4, 64)
    assert A._key("attn_fwd", q, True, False, 1000) != A._key("attn_fwd", q, True, False, 24000)
    assert [tuning.bucket(n) for n in (1, 1024, 1025, 24000)] == [1024, 1024, 2048, 32768]


@pytest.mark.parametrize("causal", [True, False])
def test_packed_torch_path_is_one_call_without_a_host_sync(causal):
    """The packed SDPA path equals attention per sequence, and runs on the meta device (any read of a value from
    the device, a .tolist() or .item(), would fail there: on a GPU it would be a sync in every layer)."""
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 17, 9]
    N = sum(lengths)
    q, k, v = (torch.randn(N, h, 16, generator=g) for h in (4, 2, 2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    got = A.attention_ref(q, k, v, causal, cu_seqlens=cu, max_seqlen=max(lengths))
    want = torch.cat([A.attention_ref(q[None, a:b], k[None, a:b], v[None, a:b], causal)[0]
                      for a, b in zip(cu.tolist(), cu.tolist()[1:])])
    torch.testing.assert_close(got, want)
    meta = [x.to("meta") for x in (q, k, v, cu)]
    assert A.attention_ref(*meta[:3], causal, cu_seqlens=meta[3], max_seqlen=max(lengths)).shape == q.shape
