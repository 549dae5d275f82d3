"""Generation: batched KV-cache decoding, and n samples per prompt from one shared prefill.

DPO samples 32 rationales per question (paper §5.1) and every question carries up to ~2,900 image tokens, so the
prompt is encoded once (the vision tower runs once per image) and its keys/values are shared by all n
continuations. A decode step is one attention call (torch SDPA) per layer: for each prompt and key/value head the
n samples x G query heads are the query rows, the keys are the prompt's followed by every generated token of its n
samples, and a bias built once lets each row see only the prompt's real tokens and its own sample's tokens. The
prompt's keys are read once per step for all n samples, never copied per sample. (The price: each row also scores
its sibling samples' tokens, masked out, so the generated part costs n times its share of the matmuls; that is
small next to the prompt until n * new tokens outgrows it, and needs no kernel beyond SDPA.) The cache is
preallocated once; a prompt whose samples have all stopped leaves the batch by moving one live prompt into its slot.
"""

import torch
import torch.nn.functional as F

import kernels


class KVCache:
    """Keys/values of B prompts and of their B*n generated continuations, per layer in the layout decode attention
    reads, (B, Hkv, S + n * max_new, D): positions 0..S-1 hold the (left-padded) prompt; the token that sample j
    generates at step t sits at S + t*n + j, so after step t the first S + (t+1)*n positions are exactly the filled
    ones and attention reads a plain slice (no per-step copy, permute or concatenation of the prompt's keys)."""

    def __init__(self, cfg, B, S, n, max_new, dtype, device, prompt_mask):
        L, Hkv, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        G = cfg.num_attention_heads // Hkv
        K = S + n * max_new
        self.k = torch.zeros(L, B, Hkv, K, D, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        prompt_mask = prompt_mask.bool()                   # (B, S): False on left padding
        # query row j*G + g of a prompt (sample j, query head g of a key/value head) may see the prompt's real tokens
        # and the tokens its own sample generated; an additive bias (0 / -inf) in the model's dtype, so attention
        # takes it as is. Its rows are padded to a multiple of 16 so that slices of it stay aligned for the fused
        # CUDA kernels (an unaligned bias is copied on every call).
        sample = torch.arange(n, device=device).repeat_interleave(G)                               # (n*G,)
        own = (torch.arange(n * max_new, device=device) % n)[None, :] == sample[:, None]           # (n*G, n*max_new)
        seen = torch.cat([prompt_mask[:, None, :].expand(B, n * G, S), own.expand(B, n * G, n * max_new)], -1)
        self.bias = torch.zeros(B, 1, n * G, -(-K // 16) * 16, dtype=dtype, device=device)
        self.bias[:, 0, :, :K].masked_fill_(~seen, float("-inf"))                                  # (B, 1, n*G, K')
        # the prompt pass runs on the real tokens only, packed (varlen attention): no (B, S, S) mask
        self.packed = None
        if not bool(prompt_mask.all()):
            lengths = prompt_mask.sum(-1)
            cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
            self.packed = prompt_mask.flatten().nonzero()[:, 0], cu, int(lengths.max())
        self.S, self.n, self.t = S, n, 0                  # prompt length, samples per prompt, decode step
        self.prefilling = True

    def attend(self, layer, q, k, v):
        if self.prefilling:                                # the prompt itself: ordinary causal attention
            self.k[layer, :, :, :self.S] = k.transpose(1, 2)
            self.v[layer, :, :, :self.S] = v.transpose(1, 2)
            if self.packed is None:
                return kernels.attention(q, k, v, causal=True)
            idx, cu, longest = self.packed                 # real tokens, prompt after prompt; padding outputs stay 0
            o = kernels.attention(*(x.flatten(0, 1)[idx] for x in (q, k, v)), causal=True, cu_seqlens=cu,
                                  max_seqlen=longest)                                           # (N, Hq, D)
            return q.new_zeros(q.shape).flatten(0, 1).index_copy_(0, idx, o).view(q.shape)
        return self._decode(layer, q, k, v)

    def _decode(self, layer, q, k, v):
        """One new token per row (rows grouped by prompt, n each): attention over its prompt and its own tokens."""
        R, _, Hq, D = q.shape
        n, Hkv = self.n, k.shape[2]
        B, G = R // n, Hq // Hkv
        end = self.S + (self.t + 1) * n
        self.k[layer, :B, :, end - n:end] = k.view(B, n, Hkv, D).transpose(1, 2)                # (B, Hkv, n, D)
        self.v[layer, :B, :, end - n:end] = v.view(B, n, Hkv, D).transpose(1, 2)
        q = q.view(B, n, Hkv, G, D).transpose(1, 2).reshape(B, Hkv, n * G, D)                  # (B, Hkv, n*G, D)
        o = F.scaled_dot_product_attention(q, self.k[layer, :B, :, :end], self.v[layer, :B, :, :end],
                                           attn_mask=self.bias[:B, :, :, :end])                # (B, Hkv, n*G, D)
        return o.view(B, Hkv, n, G, D).transpose(1, 2).reshape(R, 1, Hq, D)

    def drop(self, finished):
        """Drop the prompts flagged in `finished` (bool, one per live prompt) without copying the cache: each hole
        below the new prompt count is filled by moving one live prompt from above it (its filled positions only).
        Returns `order`, LongTensor: for each new slot, the old slot it holds (the caller reorders its rows so)."""
        finished = finished.tolist()
        keep = len(finished) - sum(finished)
        order = list(range(keep))
        holes = [s for s in range(keep) if finished[s]]
        movers = [s for s in range(keep, len(finished)) if not finished[s]]     # as many as there are holes
        filled = self.S + self.t * self.n
        for h, m in zip(holes, movers):
            self.k[:, h, :, :filled] = self.k[:, m, :, :filled]
            self.v[:, h, :, :filled] = self.v[:, m, :, :filled]
            self.bias[h] = self.bias[m]
            order[h] = m
        return torch.tensor(order, device=self.k.device)


def sample_next(logits, temperature, top_p, top_k, generator):
    """Next token per row from fp32 logits (R, V): argmax at temperature 0, else temperature / top-k / top-p.
    generator: one torch.Generator (or None) for all rows, or a list of them, one per equal block of rows."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens before it already hold top_p of the mass (the first one always stays)
        drop = (probs.cumsum(-1) - probs) > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # inverse-CDF sampling: one uniform draw per row, where torch.multinomial draws one per vocabulary entry (most of
    # a small model's decode step); the running sum in fp64 keeps even the rarest tokens' shares
    cdf = logits.softmax(-1).cumsum(-1, dtype=torch.float64)                              # (R, V)
    R, total = cdf.shape[0], cdf[:, -1:]
    if isinstance(generator, list):                  # a stream per prompt: its samples ignore the rest of the batch
        per = R // len(generator)
        u = torch.cat([torch.rand(per, 1, generator=g, device=cdf.device, dtype=cdf.dtype) for g in generator])
    else:
        u = torch.rand(R, 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    u = torch.minimum(u * total, total.nextafter(torch.zeros_like(total)))   # below the total: lands on a p > 0 token
    return torch.searchsorted(cdf, u, right=True)[:, 0]


def check_left_padded(attention_mask):
    """Generation appends after the last column, so every row's padding must come first."""
    m = attention_mask.long()
    if bool((m[:, 1:] < m[:, :-1]).any()):
        rows = (m[:, 1:] < m[:, :-1]).any(-1).nonzero()[:, 0].tolist()
        raise ValueError(f"prompts must be left-padded (padding before the text); rows {rows[:8]} have padding "
                         "after a real token")
    if bool((m.sum(-1) == 0).any()):
        raise ValueError("a prompt has no real tokens")


@torch.no_grad()
def generate(model, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, max_new_tokens=64,
             temperature=0.0, top_p=1.0, top_k=0, n=1, eos_token_id=None, pad_token_id=None, seed=None,
             return_logprobs=False, image_features=None):
    """Decode from left-padded prompts. Returns new tokens only, LongTensor (B*n, L_new), rows b*n .. b*n+n-1 for
    prompt b; each row ends with its stop token and is padded after it (pad_token_id, default the first eos id).
    With return_logprobs, also the model's log-probability (temperature 1, no truncation) of every returned token,
    fp32 (B*n, L_new), 0 on padding: the numbers DPO and reranking need.

    temperature 0 is greedy; otherwise temperature, then top_k (0 = off), then top_p (1 = off). seed makes sampling
    reproducible: an int seeds one stream for the batch; a list of B ints gives every prompt its own stream, so a
    prompt's samples do not depend on which prompts share its batch (up to the rounding that the batch's padding and
    shapes bring). eos_token_id: an id or a list (default: the model's generation eos ids).
    """
    cfg = model.config.text
    B, S = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    check_left_padded(attention_mask)
    if S + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt length {S} + max_new_tokens {max_new_tokens} exceeds the model's context of "
                         f"{cfg.max_position_embeddings} positions")
    eos = eos_token_id if eos_token_id is not None else model.eos_token_ids
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long, device=device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if len(eos) else (cfg.pad_token_id or 0)
    pad = pad_token_id
    generator = None
    if isinstance(seed, (list, tuple)):
        if len(seed) != B:
            raise ValueError(f"seed: {len(seed)} seeds for {B} prompts (one per prompt, or one int for the batch)")
        generator = [torch.Generator(device=device).manual_seed(int(s)) for s in seed]
    elif seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    dtype = model.output_weight.dtype

    # ---- prefill: the prompts once, images once
    cache = KVCache(cfg, B, S, n, max_new_tokens, dtype, device, attention_mask)
    pos = torch.where(attention_mask.bool(), attention_mask.long().cumsum(-1) - 1, 0)
    h = model(input_ids, pixel_values, image_sizes, position_ids=pos, cache=cache, image_features=image_features,
              return_hidden=True)
    cache.prefilling = False
    logits = F.linear(h[:, -1], model.output_weight).float().repeat_interleave(n, 0)      # (B*n, V)
    next_pos = attention_mask.long().sum(-1).repeat_interleave(n)                          # (B*n,)

    # ---- decode
    out = torch.full((B * n, max_new_tokens), pad, dtype=torch.long, device=device)
    out_lp = torch.zeros(B * n, max_new_tokens, device=device) if return_logprobs else None
    rows = torch.arange(B * n, device=device)          # original row of each live row, grouped by prompt
    done = torch.zeros(B * n, dtype=torch.bool, device=device)
    samples = torch.arange(n, device=device)
    steps = 0
    for t in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_p, top_k, generator).masked_fill_(done, pad)
        out[rows, t] = tok
        if return_logprobs:                            # log-softmax at the sampled token only: no (R, V) copy
            lp = logits.gather(-1, tok[:, None])[:, 0] - logits.logsumexp(-1)
            out_lp[rows, t] = lp.masked_fill_(done, 0.0)
        done |= torch.isin(tok, eos)
        steps = t + 1
        group_done = done.view(-1, n).all(-1)
        finished = int(group_done.sum())               # the step's one host sync
        if finished == len(group_done) or t + 1 == max_new_tokens:
            break
        cache.t = t                                    # generated positions already in the cache
        if finished:                                   # prompts whose samples have all stopped leave the batch
            order = cache.drop(group_done)
            if isinstance(generator, list):
                generator = [generator[i] for i in order.tolist()]
            keep_rows = (order[:, None] * n + samples).flatten()
            rows, done, tok, next_pos = rows[keep_rows], done[keep_rows], tok[keep_rows], next_pos[keep_rows]
        # generated tokens are plain text, even an image token id a model may emit
        x = model.language_model.embed_tokens(tok[:, None])
        h = model(inputs_embeds=x, position_ids=(next_pos + t)[:, None], cache=cache, return_hidden=True)
        logits = F.linear(h[:, 0], model.output_weight).float()
    out = out[:, :steps]
    return (out, out_lp[:, :steps]) if return_logprobs else out


def left_pad(sequences, pad_id):
    """Lists of ids -> (input_ids, attention_mask), padded on the left."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), T, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s):] = 1
    return ids, mask


def generate_text(model, processor, conversations, images=None, template="llava", **kwargs):
    """Chat in, text out. conversations: a list of message lists (ShareGPT or role/content), each ending with a
    user turn whose <image> tags match its images; images: per conversation a list of PIL images (or None).
    kwargs go to generate (max_new_tokens, temperature, n, seed, ...). Returns B*n strings, special tokens skipped."""
    images = images or [None] * len(conversations)
    if len(images) != len(conversations):
        raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
    flat = [img for imgs in images for img in (imgs or [])]
    pixel_values, image_sizes = processor.preprocess_images(flat)
    prompts, k = [], 0
    for conv, imgs in zip(conversations, images):
        m = len(imgs or [])
        ids, _ = processor.tokenize(conv, image_sizes[k:k + m], template=template, add_generation_prompt=True)
        prompts.append(ids)
        k += m
    input_ids, mask = left_pad(prompts, pad_id=0)
    device = model.output_weight.device
    out = model.generate(input_ids.to(device), pixel_values.to(device) if flat else None,
                         image_sizes if flat else None, mask.to(device), **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    eos = kwargs.get("eos_token_id", model.eos_token_ids)
    eos = {eos} if isinstance(eos, int) else set(eos)
    texts = []
    for row in out.tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), len(row))   # the stop token and the padding go
        texts.append(processor.decode(row[:stop]))
    return texts


@torch.no_grad()
def row_logprobs(model, rows, pixel_values, image_sizes, batch_size=16):
    """Summed log p of each row's target tokens, for rows of (input ids, targets) that share one prompt and its
    images (encoded once): the implicit DPO reward and reranking are built on it. A list of floats."""
    device = model.output_weight.device
    feats = model.encode_images(pixel_values.to(device), image_sizes) if pixel_values is not None else None
    out = []
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        T = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        targets = torch.full((len(chunk), T), -100, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for i, (x, t) in enumerate(chunk):
            ids[i, :len(x)], targets[i, :len(t)], mask[i, :len(x)] = x, t, 1
        lp = model(ids.to(device), attention_mask=mask.to(device), targets=targets.to(device),
                   image_features=feats * len(chunk) if feats is not None else None)
        out.append(lp.float().sum(-1).cpu())
    return torch.cat(out).tolist() if out else []
