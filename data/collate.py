"""SFT rows -> training batches: images, tokens, labels, lengths, and a batch order fixed by the seed alone.

A row is the released LLaVA / ShareGPT-4o-Reasoning format. Each becomes input_ids with every <image> expanded to
its features, and `targets` = the next token at each position where the assistant is trained (-100 elsewhere),
shifted inside the sample so that packing never trains one sample's last token on the next sample's first.

Batch order: the seed fixes a permutation cut into *global* batches of micro x world x accum samples; each is split
into micro-batches (sorted by length into accumulation steps, then balanced across ranks by token count). The
sequence of global batches is therefore the same for 1 process with --grad-accum 2 and for 2 processes: only the
split differs.
"""

import os
import random
import re
from collections import Counter

import torch

from data.formats import FormatError, read_jsonl, validate_sft
from model.anyres import num_crops

ROLE = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "system": "system"}


class Skip:
    """A sample that is not trained on, and why: reason is the category counted in summaries ("image not found"),
    where names the row and the details (the path, the length)."""

    def __init__(self, reason, where):
        self.reason, self.where = reason, where

    @classmethod
    def of(cls, error, where):
        msg = re.sub(r"^\S+:\d+: ", "", str(error))
        reason = next((k for k in ("image not found", "not a readable image") if k in msg), msg)
        return cls(reason, where if reason == msg else f"{where} ({msg})")


def load_rows(files, ratios=None, seed=0):
    """[(row, 'file:line')] from SFT JSONL files; a ratio r < 1 keeps a seeded r share of a file, r > 1 repeats it."""
    ratios = ratios or [1.0] * len(files)
    if len(ratios) != len(files):
        raise ValueError(f"{len(files)} data files but {len(ratios)} ratios")
    rows = []
    for path, r in zip(files, ratios):
        part = [(validate_sft(obj, f"{path}:{n}"), f"{path}:{n}") for n, obj in read_jsonl(path)]
        rng = random.Random(f"{seed}/{os.path.basename(path)}")     # the same share wherever the file lives
        whole, frac = int(r), r - int(r)
        rows += part * whole + rng.sample(part, round(frac * len(part)))
    return rows


def row_images(row):
    img = row.get("image")
    return [] if img is None else [img] if isinstance(img, str) else list(img)


def image_path(root, path):
    """Where a row's image is: relative to --image-root. Released rows that carry their authors' absolute paths
    (".../image_data/chartqa/x.png") are read from the root as well, as the paper's trainer reads them."""
    if os.path.isabs(path) and not os.path.exists(path) and "image_data/" in path:
        path = path.split("image_data/")[-1]
    return os.path.join(root, path)


def messages_of(row, n_images, where):
    """The conversation as {"from", "value"} turns, with LLaVA's conventions: a leading non-human turn is
    dropped, and a row with images but no <image> tag gets "<image>\\n" in front of its first human turn."""
    turns = [{"from": ROLE.get(t["from"], t["from"]), "value": t["value"]} for t in row["conversations"]]
    while turns and turns[0]["from"] not in ("human", "system"):
        turns = turns[1:]
    if not any(t["from"] == "gpt" and t["value"].strip() for t in turns):
        raise FormatError(f"{where}: no assistant turn to train on")
    tags = sum(t["value"].count("<image>") for t in turns)
    if tags == 0 and n_images:
        first = next(t for t in turns if t["from"] == "human")
        first["value"] = "<image>\n" * n_images + first["value"]
    elif tags != n_images:
        raise FormatError(f"{where}: {tags} <image> tags but {n_images} images")
    return turns


class SFTDataset(torch.utils.data.Dataset):
    """Map-style: item i is a tokenized sample, or a Skip. Runs in DataLoader workers (images decoded there)."""

    def __init__(self, rows, processor, image_root, max_len=6144, overlong="truncate", template="llava",
                 strict=False):
        if overlong not in ("truncate", "skip"):
            raise ValueError(f"overlong={overlong!r}: expected 'truncate' or 'skip'")
        self.rows, self.proc, self.root = rows, processor, image_root
        self.max_len, self.overlong, self.template, self.strict = max_len, overlong, template, strict

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row, where = self.rows[i]
        try:
            return self.sample(row, where)
        except (FormatError, FileNotFoundError, ValueError, OSError) as e:
            if self.strict:
                raise FormatError(f"{where}: {e}" if not str(e).startswith(where) else str(e)) from None
            return Skip.of(e, where)

    def sample(self, row, where):
        paths = [image_path(self.root, p) for p in row_images(row)]
        turns = messages_of(row, len(paths), where)
        images = [self.proc.load_image(p) for p in paths]
        pixel_values, image_sizes = self.proc.preprocess_images(images)
        cfg = self.proc.config
        # keep each image's own crops only (the processor pads to the batch's largest crop count)
        crops = [pixel_values[i, :num_crops(tuple(hw), cfg.image_grid_pinpoints, cfg.vision.image_size)]
                 for i, hw in enumerate(image_sizes.tolist())]
        pixel_values = torch.cat(crops) if crops else None
        ids, labels = self.proc.tokenize(turns, image_sizes, template=self.template)
        cut = None
        if len(ids) > self.max_len:
            image_pos = [k for k, t in enumerate(ids) if t == self.proc.image_token_id]
            if self.overlong == "skip":
                return Skip(f"longer than --max-len {self.max_len}", f"{where} ({len(ids)} tokens)")
            if image_pos and image_pos[-1] >= self.max_len:          # never cut inside the image tokens
                return Skip(f"image tokens end past --max-len {self.max_len}", f"{where} ({len(ids)} tokens)")
            cut = len(ids)
            ids, labels = ids[:self.max_len], labels[:self.max_len]
        targets = labels[1:] + [-100]
        if all(t == -100 for t in targets):
            return Skip("no supervised tokens" + (" left after truncation" if cut else ""), where)
        return {"input_ids": torch.tensor(ids), "targets": torch.tensor(targets), "pixel_values": pixel_values,
                "image_sizes": image_sizes, "truncated": cut, "where": where}


def estimate_length(row, processor, image_root):
    """Token count without tokenizing or decoding: text chars / 3.5 + image tokens from the image header."""
    from PIL import Image
    n = sum(len(t["value"]) for t in row["conversations"]) / 3.5 + 40
    for p in row_images(row):
        try:
            with Image.open(image_path(image_root, p)) as img:
                n += processor.num_image_tokens(img.size[1], img.size[0])
        except OSError:
            pass
    return int(n)


# ------------------------------------------------------------------------------------------------ batch order

def global_batches(lengths, global_size, seed, epoch):
    """Lists of global_size sample indices for one epoch, from (seed, epoch) alone: each global batch a random draw
    (the number of processes never changes what a step trains on). An incomplete last batch is dropped."""
    rng = random.Random(f"{seed}/{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    return [order[b:b + global_size] for b in range(0, len(order) - global_size + 1, global_size)]


def split_batch(batch, lengths, micro, world, accum, group_by_length=True):
    """One global batch -> micro-batches [accumulation step][rank] of `micro` samples each.

    group_by_length sorts the batch longest first, so that each accumulation step holds similar lengths (less
    padding) without making whole optimizer steps of one kind of sample, which stalls learning (LLaVA's
    modality-length grouping does the same). Within a step the samples go longest first onto the rank with the
    fewest tokens so far that still has room: the ranks' work is balanced, so that none waits at every gradient
    reduction for one that always got the longest samples. Deterministic: the same batch splits the same way."""
    order = sorted(batch, key=lambda i: -lengths[i]) if group_by_length else list(batch)
    steps = []
    for a in range(accum):
        group = order[a * world * micro:(a + 1) * world * micro]
        bins, load = [[] for _ in range(world)], [0] * world
        for i in sorted(group, key=lambda i: -lengths[i]):
            r = min((r for r in range(world) if len(bins[r]) < micro), key=lambda r: (load[r], r))
            bins[r].append(i)
            load[r] += lengths[i]
        steps.append(bins)
    return steps


def balance(steps, lengths):
    """How evenly the ranks are loaded: the mean over steps of mean / max tokens per rank (1.0 = even)."""
    ratios = []
    for bins in steps:
        loads = [sum(lengths[i] for i in b) for b in bins]
        if max(loads):
            ratios.append(sum(loads) / len(loads) / max(loads))
    return sum(ratios) / len(ratios) if ratios else 1.0


# ------------------------------------------------------------------------------------------------ collate

def collate(samples, pack=False, pad_id=0):
    """Real samples -> one batch. Padded: input_ids / targets / attention_mask (B, T), right-padded. Packed: one
    row (1, N) with cu_seqlens marking each sample (varlen attention: no padding, no attention across samples).
    Images of all samples are concatenated crop by crop (the model splits them by image_sizes)."""
    skipped = [s for s in samples if isinstance(s, Skip)]
    real = [s for s in samples if not isinstance(s, Skip)]
    batch = {"skipped": [(s.reason, s.where) for s in skipped], "n": len(real),
             "truncated": sum(1 for s in real if s["truncated"])}
    if not real:
        return batch
    crops = [s["pixel_values"] for s in real if s["pixel_values"] is not None]
    batch["pixel_values"] = torch.cat(crops) if crops else None
    batch["image_sizes"] = torch.cat([s["image_sizes"] for s in real]) if crops else None
    if pack:
        batch["input_ids"] = torch.cat([s["input_ids"] for s in real])[None]
        batch["targets"] = torch.cat([s["targets"] for s in real])[None]
        lens = torch.tensor([0] + [len(s["input_ids"]) for s in real])
        batch["cu_seqlens"] = lens.cumsum(0).to(torch.int32)
        batch["max_seqlen"] = int(lens.max())
    else:
        T = max(len(s["input_ids"]) for s in real)
        ids = torch.full((len(real), T), pad_id, dtype=torch.long)
        tgt = torch.full((len(real), T), -100, dtype=torch.long)
        mask = torch.zeros(len(real), T, dtype=torch.long)
        for i, s in enumerate(real):
            n = len(s["input_ids"])
            ids[i, :n], tgt[i, :n], mask[i, :n] = s["input_ids"], s["targets"], 1
        batch.update(input_ids=ids, targets=tgt, attention_mask=mask)
    batch["tokens"] = sum(len(s["input_ids"]) for s in real)
    rows = (batch["targets"].reshape(-1) != -100).nonzero()[:, 0]
    batch["target_rows"] = rows                      # the trained positions, found here on the host (no GPU sync)
    batch["supervised"] = len(rows)
    return batch


def histogram(lengths, bins=(256, 512, 1024, 2048, 3072, 4096, 6144, 8192)):
    """A text histogram of sample lengths."""
    counts = Counter(next((b for b in bins if n <= b), f">{bins[-1]}") for n in lengths)
    keys = [b for b in bins if b in counts] + ([f">{bins[-1]}"] if f">{bins[-1]}" in counts else [])
    top = max(counts.values()) if counts else 1
    return "\n".join(f"  <= {k:>6} {'#' * max(1, round(40 * counts[k] / top)):40s} {counts[k]}" for k in keys)


# ------------------------------------------------------------------------------------------------ DPO pairs

def truncate_words(text, k, min_words=90):
    """A response cut as the paper's DPO trainer cuts it (LLaVA-Reasoner-DPO, scripts_dpo/run_dpo.py,
    DPODataCollator.maybe_truncate), the paper's k being 90. The text is split on single spaces, so a newline or a
    second space stays inside a piece and "\n\n### Answer:" survives. k > 1: the first int(k) pieces, and only
    when there are more; a shorter response stays byte for byte. 0 < k <= 1: a share of the pieces, never fewer
    than min_words (the trainer's min_len). k = 0: the whole text (our "off"; the trainer has None for it)."""
    if k < 0:
        raise ValueError(f"truncate_words: k = {k} must be >= 0")
    if not k:
        return text
    pieces = text.split(" ")
    if k > 1:
        k = int(k)
        return " ".join(pieces[:k]) if len(pieces) > k else text
    return " ".join(pieces[:max(int(k * len(pieces)), min_words)])


class PairDataset(torch.utils.data.Dataset):
    """DPO pairs (dpo_data format) -> chosen and rejected token rows sharing a prompt and its images. Each response
    is cut by truncate_words(response, truncate) and its final <|eot_id|> dropped, as the paper's trainer does.
    pairs: [(pair, key)], the key ("file:line") naming the pair in batches ("ids") and messages."""

    def __init__(self, pairs, processor, image_root, truncate=90, template="llava", max_len=6144):
        self.pairs, self.proc, self.root = pairs, processor, image_root
        self.truncate, self.template, self.max_len = truncate, template, max_len

    def __len__(self):
        return len(self.pairs)

    def tokenize(self, question, response, image_sizes, n_images):
        q = question if "<image>" in question or not n_images else "<image>\n" * n_images + question
        ids, labels = self.proc.tokenize([{"from": "human", "value": q},
                                          {"from": "gpt", "value": truncate_words(response, self.truncate)}],
                                         image_sizes, template=self.template)
        ids, labels = ids[:-1], labels[:-1]               # drop the final <|eot_id|>: truncated answers don't end
        return torch.tensor(ids), torch.tensor(labels[1:] + [-100])

    def __getitem__(self, i):
        pair, where = self.pairs[i]
        try:
            paths = [image_path(self.root, p) for p in row_images(pair)]
            images = [self.proc.load_image(p) for p in paths]
            pixel_values, image_sizes = self.proc.preprocess_images(images)
            cfg = self.proc.config
            crops = [pixel_values[k, :num_crops(tuple(hw), cfg.image_grid_pinpoints, cfg.vision.image_size)]
                     for k, hw in enumerate(image_sizes.tolist())]
            c_ids, c_tgt = self.tokenize(pair["question"], pair["chosen"], image_sizes, len(paths))
            r_ids, r_tgt = self.tokenize(pair["question"], pair["rejected"], image_sizes, len(paths))
        except (FormatError, OSError, ValueError) as e:
            return Skip.of(e, where)
        if max(len(c_ids), len(r_ids)) > self.max_len:
            return Skip(f"longer than --max-len {self.max_len}", where)
        if (c_tgt == -100).all() or (r_tgt == -100).all():
            return Skip("an empty response", where)
        return {"id": where, "chosen": (c_ids, c_tgt), "rejected": (r_ids, r_tgt),
                "pixel_values": torch.cat(crops) if crops else None, "image_sizes": image_sizes, "where": where}


def collate_pairs(samples, pack=False, pad_id=0):
    """B pairs -> one batch of 2B rows: the B chosen rows, then the B rejected rows. Images appear once, in pair
    order, for the model's image_repeat=2."""
    real = [s for s in samples if not isinstance(s, Skip)]
    batch = {"skipped": [(s.reason, s.where) for s in samples if isinstance(s, Skip)], "n": len(real),
             "ids": [s["id"] for s in real]}
    if not real:
        return batch
    rows = [s["chosen"] for s in real] + [s["rejected"] for s in real]
    rows = [{"input_ids": ids, "targets": tgt, "pixel_values": None, "image_sizes": None, "truncated": None}
            for ids, tgt in rows]
    batch.update({k: v for k, v in collate(rows, pack, pad_id).items() if k not in ("skipped", "n", "truncated")})
    crops = [s["pixel_values"] for s in real if s["pixel_values"] is not None]
    batch["pixel_values"] = torch.cat(crops) if crops else None
    batch["image_sizes"] = torch.cat([s["image_sizes"] for s in real]) if crops else None
    batch["chosen_supervised"] = int(sum((s["chosen"][1] != -100).sum() for s in real))
    return batch


def per_sequence(lp, batch):
    """Per-position log-probs (B, T) or packed (1, N) -> the sum over each row's (sample's) positions."""
    if "cu_seqlens" not in batch:
        return lp.sum(-1)
    cu = batch["cu_seqlens"].to(lp.device).long()
    segment = torch.repeat_interleave(torch.arange(len(cu) - 1, device=lp.device), cu[1:] - cu[:-1],
                                      output_size=lp.shape[-1])                      # (no sync: the size is known)
    return lp.new_zeros(len(cu) - 1).index_add(0, segment, lp[0])       # not a cumsum: no cancellation
