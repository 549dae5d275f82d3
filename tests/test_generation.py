"""Generation: greedy equals transformers' generate token for token; shared-prefix sampling; stops; errors."""

import tempfile

import pytest
import torch

from helpers import make_hf_model
from model import LlavaNext
from model.generation import left_pad
from helpers import batch_for


def left_padded(batch):
    """The right-padded test batch turned into left-padded prompts."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    return left_pad(rows, pad_id=0)


@pytest.fixture(scope="module", params=["llama", "mistral"])
def pair(request):
    hf = make_hf_model(request.param)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = LlavaNext.from_pretrained(d).eval()
    return hf, ours


def hf_generate(hf, ids, mask, batch, **kw):
    T = ids.shape[1]
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0, **kw,
                          **({} if batch is None else dict(pixel_values=batch["pixel_values"],
                                                           image_sizes=batch["image_sizes"])))
    return out[:, T:]


def test_greedy_equals_transformers_with_images(pair):
    """A text-only prompt and prompts with one and two images, of different lengths, left-padded."""
    hf, ours = pair
    batch = batch_for(ours)
    ids, mask = left_padded(batch)
    ref = hf_generate(hf, ids, mask, batch, max_new_tokens=16, eos_token_id=-1)
    got = ours.generate(ids, batch["pixel_values"], batch["image_sizes"], mask, max_new_tokens=16, eos_token_id=[],
                        pad_token_id=0)
    assert torch.equal(got, ref)


def test_greedy_equals_transformers_text_only(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(5)
    V = ours.config.text.vocab_size
    rows = [torch.randint(1, ours.config.image_token_index, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]
    rows = [[t if t != ours.config.image_token_index else 1 for t in r] for r in rows]
    ids, mask = left_pad(rows, 0)
    ref = hf_generate(hf, ids, mask, None, max_new_tokens=10, eos_token_id=-1)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got, ref) and got.shape == (4, 10) and int(got.max()) < V


def test_each_row_stops_at_its_own_eos(pair):
    """Pick an eos that row 0 emits early: row 0 stops there and is padded, the others run on, as in transformers."""
    hf, ours = pair
    batch = batch_for(ours)
    ids, mask = left_padded(batch)
    free = ours.generate(ids, batch["pixel_values"], batch["image_sizes"], mask, max_new_tokens=12, eos_token_id=[])
    eos = int(free[0, 3])
    first = [(r == eos).nonzero()[0, 0].item() if (r == eos).any() else None for r in free]
    got = ours.generate(ids, batch["pixel_values"], batch["image_sizes"], mask, max_new_tokens=12, eos_token_id=eos,
                        pad_token_id=0)
    ref = hf_generate(hf, ids, mask, batch, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(got, ref)
    for row, f in zip(got, first):
        if f is not None:
            assert int(row[f]) == eos and (row[f + 1:] == 0).all()
    assert got.shape[1] <= 12


def test_max_new_tokens_is_respected(pair):
    _, ours = pair
    ids, mask = left_pad([[20, 21, 22], [23]], 0)
    for k in (1, 2, 9):
        assert ours.generate(ids, attention_mask=mask, max_new_tokens=k, eos_token_id=[]).shape == (2, k)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(pair):
    _, ours = pair
    batch = batch_for(ours)
    ids, mask = left_padded(batch)
    args = (ids, batch["pixel_values"], batch["image_sizes"], mask)
    T = 50.0                             # hot enough that the tiny models' peaked distributions really vary
    a = ours.generate(*args, max_new_tokens=8, temperature=T, n=3, seed=7, eos_token_id=[])
    b = ours.generate(*args, max_new_tokens=8, temperature=T, n=3, seed=7, eos_token_id=[])
    c = ours.generate(*args, max_new_tokens=8, temperature=T, n=3, seed=8, eos_token_id=[])
    assert a.shape == (9, 8) and torch.equal(a, b) and not torch.equal(a, c)
    greedy = ours.generate(*args, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(ours.generate(*args, max_new_tokens=8, temperature=0.0, seed=3, eos_token_id=[]), greedy)
    top1 = ours.generate(*args, max_new_tokens=8, temperature=T, top_k=1, n=2, seed=1, eos_token_id=[])
    assert torch.equal(top1, greedy.repeat_interleave(2, 0))
    tiny_p = ours.generate(*args, max_new_tokens=8, temperature=T, top_p=1e-6, n=2, seed=1, eos_token_id=[])
    assert torch.equal(tiny_p, greedy.repeat_interleave(2, 0))


def test_a_seed_per_prompt_makes_its_samples_independent_of_the_batch(pair):
    """seed=[s0, s1, s2]: prompt 2's samples in the batch equal its samples alone with seed=[s2] (fp32). Half the
    vocabulary stops a row, so whole prompts finish and leave the batch at different steps, and the per-prompt
    streams must follow the survivors."""
    _, ours = pair
    batch = batch_for(ours)
    ids, mask = left_padded(batch)
    V = ours.config.text.vocab_size
    for eos in ([], list(range(1, V, 2))):
        kw = dict(max_new_tokens=10, temperature=50.0, n=3, eos_token_id=eos, pad_token_id=0)
        both = ours.generate(ids, batch["pixel_values"], batch["image_sizes"], mask, seed=[11, 12, 13], **kw)
        for b, images in ((1, slice(0, 1)), (2, slice(1, 3))):
            row = ids[b][mask[b].bool()][None]
            alone = ours.generate(row, batch["pixel_values"][images], batch["image_sizes"][images],
                                  seed=[11 + b], **kw)
            got = both[3 * b:3 * b + 3]
            assert torch.equal(got[:, :alone.shape[1]], alone) and (got[:, alone.shape[1]:] == 0).all(), (b, eos)
        assert not torch.equal(both[3:6], both[6:9])
        one = ours.generate(ids, batch["pixel_values"], batch["image_sizes"], mask, seed=11, **kw)
        assert not torch.equal(one, both)                      # an int seed is one stream for the whole batch
    with pytest.raises(ValueError, match="one per prompt"):
        ours.generate(ids, batch["pixel_values"], batch["image_sizes"], mask, seed=[1, 2], **kw)


def test_shared_prefix_logprobs_equal_a_full_forward(pair):
    """n samples from one prefill: each returned log-prob equals the model's log-softmax at that position when the
    finished sequence is run again in one ordinary forward pass. An early eos also exercises dropping prompts."""
    _, ours = pair
    batch = batch_for(ours)
    ids, mask = left_padded(batch)
    n = 4
    free = ours.generate(ids, batch["pixel_values"], batch["image_sizes"], mask, max_new_tokens=10, temperature=1.0,
                         n=n, seed=0, eos_token_id=[])
    eos = int(free[0, 2])
    toks, lps = ours.generate(ids, batch["pixel_values"], batch["image_sizes"], mask, max_new_tokens=10,
                              temperature=1.0, n=n, seed=0, eos_token_id=eos, pad_token_id=0, return_logprobs=True)
    assert toks.shape == lps.shape and toks.shape[0] == 3 * n
    valid = torch.ones_like(toks, dtype=torch.bool)
    for r in range(toks.shape[0]):
        hit = (toks[r] == eos).nonzero()
        if len(hit):
            valid[r, hit[0, 0] + 1:] = False
    full_mask = torch.cat([mask.repeat_interleave(n, 0), valid.long()], 1)
    # every sample of a prompt sees the same images: repeat each image's crops n times, in batch order
    counts = [0, 1, 2]                           # images per prompt in batch_for's order
    img_index = [i for b, c in enumerate(counts) for _ in range(n) for i in range(sum(counts[:b]), sum(counts[:b]) + c)]
    with torch.no_grad():                       # generated tokens are text, even a sampled image-token id
        x = torch.cat([ours.embed(ids.repeat_interleave(n, 0), batch["pixel_values"][img_index],
                                  batch["image_sizes"][img_index]), ours.language_model.embed_tokens(toks)], 1)
        logits = ours(inputs_embeds=x, attention_mask=full_mask)
    T = ids.shape[1]
    ref = logits[:, T - 1:-1].float().log_softmax(-1).gather(-1, toks[..., None])[..., 0]
    torch.testing.assert_close(lps[valid], ref[valid], atol=2e-5, rtol=1e-5)
    assert (lps[~valid] == 0).all() and (toks[~valid] == 0).all()


def test_vision_tower_runs_once_per_image(pair):
    _, ours = pair
    batch = batch_for(ours)
    ids, mask = left_padded(batch)
    calls = []
    hook = ours.vision_tower.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        ours.generate(ids, batch["pixel_values"], batch["image_sizes"], mask, max_new_tokens=5, temperature=1.0,
                      n=8, seed=0)
    finally:
        hook.remove()
    crops = sum(1 + r * c for r, c in [(1, 3), (3, 1), (2, 2)])      # the three images' grids, plus base crops
    assert calls == [crops]


def test_clear_errors(pair):
    _, ours = pair
    batch = batch_for(ours)
    ids, mask = left_padded(batch)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        ours.generate(ids, batch["pixel_values"], batch["image_sizes"], mask, max_new_tokens=10_000_000)
    right_ids, right_mask = batch["input_ids"], batch["attention_mask"]
    with pytest.raises(ValueError, match="must be left-padded"):
        ours.generate(right_ids, batch["pixel_values"], batch["image_sizes"], right_mask)
    bad = ids.clone()
    bad[2, -1] = ours.config.image_token_index
    with pytest.raises(ValueError, match="image tokens"):
        ours.generate(bad, batch["pixel_values"], batch["image_sizes"], mask)


def test_generate_text_round_trip(tmp_path, llama3_tokenizer_dir):
    """Chat in, strings out: a tiny model on the real Llama-3 vocabulary; decoded text equals the tokens."""
    import json
    from helpers import hf_config_dict, random_image
    from model import LlavaNextConfig, Processor
    from model.generation import generate_text
    from helpers import llama3_tokenizer_json
    d = hf_config_dict("llama")
    d["text_config"] = dict(d["text_config"], vocab_size=128320, hidden_size=32, intermediate_size=64,
                            num_attention_heads=2, num_key_value_heads=1)
    d["image_token_index"] = 128256
    cfg = LlavaNextConfig.from_dict(d)
    model = LlavaNext.from_config(cfg, seed=0).eval()
    model.save_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text(llama3_tokenizer_json(llama3_tokenizer_dir, ["<image>", "<pad>"]))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128009, 128001]}))
    model = LlavaNext.from_pretrained(str(tmp_path)).eval()
    assert model.eos_token_ids == [128009, 128001]
    proc = Processor.from_pretrained(str(tmp_path))
    convs = [[{"from": "human", "value": "<image>\nWhat is shown?"}], [{"from": "human", "value": "Say hi."}]]
    texts = generate_text(model, proc, convs, [[random_image(50, 80)], None], max_new_tokens=6, temperature=1.0,
                          n=2, seed=0)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    toks = model.generate(*_prompt_tensors(proc, convs, [[random_image(50, 80)], None]), max_new_tokens=6,
                          temperature=1.0, n=2, seed=0)
    assert texts[0] == proc.decode([t for t in toks[0].tolist()][:_stop(toks[0].tolist())])


def _prompt_tensors(proc, convs, images):
    flat = [i for imgs in images for i in (imgs or [])]
    pv, sizes = proc.preprocess_images(flat)
    rows, k = [], 0
    for conv, imgs in zip(convs, images):
        m = len(imgs or [])
        rows.append(proc.tokenize(conv, sizes[k:k + m], add_generation_prompt=True)[0])
        k += m
    ids, mask = left_pad(rows, 0)
    return ids, pv, sizes, mask


def _stop(row):
    return next((i for i, t in enumerate(row) if t in (128009, 128001)), len(row))


def test_kv_cache_decode_attention_and_dropping_prompts_in_place():
    """The cache's decode attention equals plain per-sample attention (torch math on [the prompt's real keys | the
    sample's own generated keys], GQA), before and after finished prompts leave the batch; leaving moves one live
    prompt into each hole (old slots 3 and 1 survive as new slots 0 and 1) and never reallocates the cache."""
    from types import SimpleNamespace
    from model.generation import KVCache
    cfg = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=2, num_attention_heads=6, head_dim=8)
    B, S, n, max_new, Hq, Hkv, D = 4, 5, 3, 4, 6, 2, 8
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1], [0] * 4 + [1], [0, 1, 1, 1, 1]])
    cache = KVCache(cfg, B, S, n, max_new, torch.float32, "cpu", mask)
    keys = {}                                              # (layer, prompt) -> prompt k, v; (layer, row) -> lists
    for layer in range(2):
        q, k, v = (torch.randn(B, S, H, D, generator=g) for H in (Hq, Hkv, Hkv))
        cache.attend(layer, q, k, v)
        for b in range(B):
            keys[layer, "p", b] = k[b][mask[b].bool()], v[b][mask[b].bool()]
    cache.prefilling = False
    ptr = cache.k.data_ptr()

    def reference(q, layer, prompts):
        out = []
        for i, r in enumerate(r for b in prompts for r in range(b * n, b * n + n)):
            pk, pv = keys[layer, "p", r // n]
            k = torch.cat([pk, torch.stack(keys[layer, "gk", r])])
            v = torch.cat([pv, torch.stack(keys[layer, "gv", r])])
            k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)            # (T, Hq, D)
            p = torch.einsum("hd,thd->ht", q[i, 0], k).mul(D ** -0.5).softmax(-1)
            out.append(torch.einsum("ht,thd->hd", p, v))
        return torch.stack(out)[:, None]

    prompts = [0, 1, 2, 3]
    for t in range(3):
        cache.t = t
        if t == 2:
            order = cache.drop(torch.tensor([True, False, True, False]))
            assert order.tolist() == [3, 1] and cache.k.data_ptr() == ptr
            prompts = [prompts[i] for i in order.tolist()]
        R = len(prompts) * n
        for layer in range(2):
            q, k, v = (torch.randn(R, 1, H, D, generator=g) for H in (Hq, Hkv, Hkv))
            for i, r in enumerate(r for b in prompts for r in range(b * n, b * n + n)):
                keys.setdefault((layer, "gk", r), []).append(k[i, 0])
                keys.setdefault((layer, "gv", r), []).append(v[i, 0])
            torch.testing.assert_close(cache.attend(layer, q, k, v), reference(q, layer, prompts), atol=1e-5,
                                       rtol=1e-5)


def test_sampling_draws_from_the_softmax():
    """sample_next's token frequencies over 40,000 rows match softmax(logits / T), and after top-k / top-p the
    renormalized kept tokens (torch math), within 5 standard errors; truncated tokens never appear. One stream for
    all rows, and one per block of rows."""
    from model.generation import sample_next
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0, 1.5])
    N = 40_000
    for kw, keep in ((dict(top_k=0, top_p=1.0), [0, 1, 2, 3, 4, 5, 6]), (dict(top_k=3, top_p=1.0), [0, 6, 1]),
                     (dict(top_k=0, top_p=0.6), [0, 6])):
        p = torch.full_like(logits, float("-inf"))
        p[keep] = logits[keep] / 0.8
        p = p.softmax(-1)
        for gen in (torch.Generator().manual_seed(0), [torch.Generator().manual_seed(s) for s in range(4)]):
            tok = sample_next(logits.expand(N, -1).clone(), 0.8, generator=gen, **kw)
            freq = torch.bincount(tok, minlength=len(logits)).double() / N
            se = (p.double() * (1 - p.double()) / N).sqrt()
            assert ((freq - p).abs() <= 5 * se + 1e-12).all(), (kw, freq, p)
            assert set(tok.unique().tolist()) <= set(keep)
