"""Generation: batched KV-cache decoding, and n samples per prompt from one shared prefill.

DPO samples 32 rationales per question (paper §5.1) and every question carries up to ~2,900 image tokens, so the
prompt is encoded once (the vision tower runs once per image) and its keys/values are shared by all n
continuations: in each decode step the n samples of a prompt are extra query rows of one matmul against that
prompt's cached keys, and only the generated tokens have per-sample keys. Both caches are preallocated; prompts
whose samples have all stopped are dropped from the batch.
"""

import torch
import torch.nn.functional as F

import kernels
from model.llama import causal_padding_mask


class KVCache:
    """Keys/values of B prompts (shared by their n samples) and of the B*n generated continuations."""

    def __init__(self, cfg, B, S, n, max_new, dtype, device, prompt_mask):
        L, H, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        self.pk = torch.zeros(L, B, S, H, D, dtype=dtype, device=device)
        self.pv = torch.zeros_like(self.pk)
        self.gk = torch.zeros(L, B * n, max_new, H, D, dtype=dtype, device=device)
        self.gv = torch.zeros_like(self.gk)
        self.prompt_mask = prompt_mask.bool()          # (B, S): False on left padding
        self.n, self.t = n, 0                          # samples per prompt, generated positions filled
        self.prefilling = True

    def attend(self, layer, q, k, v):
        if self.prefilling:                             # the prompt itself: ordinary causal attention
            self.pk[layer], self.pv[layer] = k, v
            mask = None if bool(self.prompt_mask.all()) else causal_padding_mask(self.prompt_mask, q.shape[1])
            return kernels.attention(q, k, v, causal=True, attn_mask=mask)
        return self._decode(layer, q, k, v)

    def _decode(self, layer, q, k, v):
        """One new token per row: attention over [shared prompt keys | this row's generated keys]."""
        R, _, Hq, D = q.shape
        B, n, Hkv = R // self.n, self.n, k.shape[2]
        G, t = Hq // Hkv, self.t
        self.gk[layer, :R, t], self.gv[layer, :R, t] = k[:, 0], v[:, 0]
        qg = q.view(B, n, Hkv, G, D) * D ** -0.5
        pk, pv = self.pk[layer, :B], self.pv[layer, :B]                                   # (B, S, Hkv, D)
        gk, gv = self.gk[layer, :R, :t + 1].view(B, n, t + 1, Hkv, D), self.gv[layer, :R, :t + 1].view(B, n, t + 1,
                                                                                                      Hkv, D)
        # the n samples of a prompt are the rows of one matmul against its keys: no per-sample copy of the prompt
        s_p = torch.einsum("bnhgd,bshd->bnhgs", qg, pk).float()                           # (B, n, Hkv, G, S)
        s_p = s_p.masked_fill(~self.prompt_mask[:B, None, None, None, :], float("-inf"))
        s_g = torch.einsum("bnhgd,bnthd->bnhgt", qg, gk).float()                          # (B, n, Hkv, G, t+1)
        p = torch.softmax(torch.cat([s_p, s_g], -1), -1).to(q.dtype)
        S = s_p.shape[-1]
        o = torch.einsum("bnhgs,bshd->bnhgd", p[..., :S], pv) + torch.einsum("bnhgt,bnthd->bnhgd", p[..., S:], gv)
        return o.reshape(R, 1, Hq, D)

    def keep(self, prompts):
        """Drop the prompts not in `prompts` (a LongTensor of indices into the current batch), with their rows."""
        rows = (prompts[:, None] * self.n + torch.arange(self.n, device=prompts.device)).flatten()
        self.pk, self.pv = self.pk[:, prompts], self.pv[:, prompts]
        self.gk, self.gv = self.gk[:, rows], self.gv[:, rows]
        self.prompt_mask = self.prompt_mask[prompts]


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
    probs = logits.softmax(-1)
    if isinstance(generator, list):                  # a stream per prompt: its samples ignore the rest of the batch
        per = probs.shape[0] // len(generator)
        return torch.cat([torch.multinomial(probs[i * per:(i + 1) * per], 1, generator=g)[:, 0]
                          for i, g in enumerate(generator)])
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


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
    prompt's samples do not depend on which prompts share its batch (exactly so in fp32). eos_token_id: an id or a
    list (default: the model's generation eos ids).
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
    steps = 0
    for t in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_p, top_k, generator)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        out[rows, t] = tok
        if return_logprobs:
            lp = logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0]
            out_lp[rows, t] = torch.where(done, torch.zeros_like(lp), lp)
        done = done | torch.isin(tok, eos)
        steps = t + 1
        if bool(done.all()) or t + 1 == max_new_tokens:
            break
        # drop prompts whose samples have all stopped: their rows stop costing compute
        group_done = done.view(-1, n).all(-1)
        if bool(group_done.any()):
            alive = (~group_done).nonzero()[:, 0]
            if isinstance(generator, list):
                generator = [generator[i] for i in alive.tolist()]
            cache.keep(alive)
            keep_rows = (alive[:, None] * n + torch.arange(n, device=device)).flatten()
            rows, done, tok, next_pos = rows[keep_rows], done[keep_rows], tok[keep_rows], next_pos[keep_rows]
        cache.t = t
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
def sequence_logprobs(model, prompt, responses, pixel_values=None, image_sizes=None, batch_size=16):
    """Summed log p(response | prompt) for each response (lists of token ids), prompt (list of ids) shared; the
    prompt's images are encoded once. The implicit DPO reward and reranking are built on it."""
    feats = model.encode_images(pixel_values, image_sizes) if pixel_values is not None else None
    device = model.output_weight.device
    out = []
    for b in range(0, len(responses), batch_size):
        chunk = responses[b:b + batch_size]
        seqs = [prompt + list(r) for r in chunk]
        T = max(map(len, seqs))
        ids = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        targets = torch.full_like(ids, -100)
        for i, (s, r) in enumerate(zip(seqs, chunk)):
            ids[i, :len(s)] = torch.tensor(s, device=device)
            mask[i, :len(s)] = 1
            if r:                                      # position t predicts token t + 1: the response's tokens
                targets[i, len(prompt) - 1:len(s) - 1] = torch.tensor(list(r), device=device)
        lp = model(ids, attention_mask=mask, targets=targets,
                   image_features=feats * len(seqs) if feats is not None else None)
        out.append(lp.sum(-1))
    return torch.cat(out) if out else torch.zeros(0)
