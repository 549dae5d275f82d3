"""Checkpoint files: safetensors reading and writing, and the key layouts users meet.

Our parameter names are transformers' in-memory names without the leading "model." (vision_tower.embeddings...,
multi_modal_projector..., image_newline, language_model.layers..., lm_head). Every layout is turned into them by
one explicit table of regex renames (first match wins), and save_pretrained writes the llava-hf Hub layout.
"""

import json
import mmap
import os
import re
import struct
from collections import defaultdict

import torch

from model.config import CheckpointError

# ----------------------------------------------------------------------------------------------------------------
# key layouts: name -> list of (pattern, replacement) applied with re.sub, first match wins

LAYOUTS = {
    # the llava-hf files on the Hub (transformers 4.4x save_pretrained)
    "llava-hf": [
        (r"^vision_tower\.vision_model\.", "vision_tower."),
        (r"^language_model\.model\.", "language_model."),
        (r"^language_model\.lm_head\.", "lm_head."),
    ],
    # transformers 5.x save_pretrained: the CLIP tower lost its vision_model level
    "transformers-5": [
        (r"^language_model\.model\.", "language_model."),
        (r"^language_model\.lm_head\.", "lm_head."),
    ],
    # transformers >= 4.52 in-memory names (LlavaNextForConditionalGeneration.state_dict())
    "transformers-in-memory": [
        (r"^model\.vision_tower\.(vision_model\.)?", "vision_tower."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        (r"^model\.image_newline$", "image_newline"),
        (r"^model\.language_model\.", "language_model."),
    ],
    # original LLaVA-NeXT (LlavaLlamaForCausalLM): Open-LLaVA-NeXT, lmms-lab, the LLaVA-Reasoner releases
    "original": [
        (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision_tower."),
        (r"^model\.mm_projector\.0\.", "multi_modal_projector.linear_1."),
        (r"^model\.mm_projector\.2\.", "multi_modal_projector.linear_2."),
        (r"^model\.image_newline$", "image_newline"),
        (r"^model\.", "language_model."),
    ],
}
# our names -> llava-hf Hub names, for saving
TO_HUB = [
    (r"^vision_tower\.", "vision_tower.vision_model."),
    (r"^language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]
# buffers some writers include that are recomputed, never loaded
IGNORED = re.compile(r"(\.position_ids|\.inv_freq|rotary_emb\..*)$")


def detect_layout(keys):
    keys = list(keys)
    if any(k.startswith("model.mm_projector.") or k.startswith("model.vision_tower.vision_tower.") for k in keys):
        return "original"
    if any(k.startswith("model.language_model.") or k.startswith("model.vision_tower.") for k in keys):
        return "transformers-in-memory"
    if any(k.startswith("vision_tower.vision_model.") for k in keys):
        return "llava-hf"
    if any(k.startswith("language_model.model.") or k.startswith("vision_tower.") for k in keys):
        return "transformers-5"
    if any(k.startswith("language_model.") or k.startswith("lm_head") for k in keys):
        return "ours"
    raise ValueError("unrecognised checkpoint key layout; first keys: " + ", ".join(keys[:5]))


def rename(key, rules):
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


# ----------------------------------------------------------------------------------------------------------------
# safetensors reading: parse the header ourselves, memory-map the data, copy one tensor at a time

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


LFS_POINTER = b"version https://git-lfs"


def read_header(path):
    """(header dict without __metadata__, data offset) of a safetensors file, with clear errors for bad files."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if f.read(len(LFS_POINTER)) == LFS_POINTER:
            raise CheckpointError(f"{path} is a git-lfs pointer file ({size} bytes), not the weights: the download "
                                  "fetched the pointer only; run `git lfs pull` in the model's clone, or download "
                                  "the file itself (e.g. with `hf download`)")
        f.seek(0)
        if size < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file (header says {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: its tensors need {8 + n + end} bytes, the file "
                              f"has {size} (an interrupted download or copy?)")
    return header, 8 + n


def checkpoint_files(path):
    """{tensor name: file} for a model directory (single file or sharded with an index) or one .safetensors file."""
    if os.path.isfile(path):
        return {k: path for k in read_header(path)[0]}
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        missing = sorted({f for f in weight_map.values() if not os.path.exists(os.path.join(path, f))})
        if missing:
            raise FileNotFoundError(f"{index} names shard files that are not there: {missing}")
        return {k: os.path.join(path, f) for k, f in weight_map.items()}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        bins = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
        hint = f" (found {bins}: convert them to safetensors; pickled weights are not loaded)" if bins else ""
        raise FileNotFoundError(f"{path}: no *.safetensors files{hint}")
    return {k: os.path.join(path, f) for f in files for k in read_header(os.path.join(path, f))[0]}


def read_tensors(path, names, convert):
    """{name: convert(name, tensor)} for the named tensors of a safetensors file.

    convert receives a zero-copy view over a private memory map and must return a copy (e.g. `.to(dtype, copy=True)`),
    or None when it consumed the tensor itself (the result is then not kept). The map's pages are dropped after each
    tensor, so reading never holds more than one tensor's worth of the file in memory besides what convert keeps:
    peak memory stays near one copy of the weights, or one shard of them when convert slices.
    """
    header, start = read_header(path)
    out = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mm:
        for name, info in header.items():
            if name not in names:
                continue
            a, b = info["data_offsets"]
            dtype = DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            numel = math_prod(info["shape"])
            if b - a != numel * dtype.itemsize:
                raise ValueError(f"{path}: tensor {name} has {b - a} bytes for shape {info['shape']} {info['dtype']}")
            if numel == 0:
                view = torch.empty(info["shape"], dtype=dtype)
            else:
                view = torch.frombuffer(mm, dtype=dtype, count=numel, offset=start + a).view(info["shape"])
            t = convert(name, view)
            if t is not None:
                out[name] = t
            del view, t
            if numel:
                lo = (start + a) // mmap.PAGESIZE * mmap.PAGESIZE
                mm.madvise(mmap.MADV_DONTNEED, lo, start + b - lo)
    return out


def math_prod(shape):
    n = 1
    for s in shape:
        n *= s
    return n


# ----------------------------------------------------------------------------------------------------------------
# strict matching


def _group(keys):
    """Compress layer indices for readable errors: a.{0..31}.b instead of 32 lines."""
    groups = defaultdict(list)
    for k in keys:
        m = re.search(r"\.(\d+)\.", k)
        if m:
            groups[k[:m.start()] + ".{}." + k[m.end():]].append(int(m.group(1)))
        else:
            groups[k].append(None)
    out = []
    for pattern, idx in sorted(groups.items()):
        idx = sorted(i for i in idx if i is not None)
        if not idx:
            out.append(pattern)
            continue
        runs, s = [], idx[0]
        for p, c in zip(idx, idx[1:] + [None]):
            if c != p + 1:
                runs.append(str(s) if s == p else f"{s}..{p}")
                s = c
        out.append(pattern.replace("{}", runs[0] if len(idx) == 1 else "{" + ",".join(runs) + "}"))
    return out


def check_keys(expected, found, source, names=None):
    """Raise one error naming every missing key, unexpected key and shape mismatch. expected/found: {name: shape};
    names maps a found key to the name the checkpoint file uses (shown for unexpected keys and mismatches)."""
    names = names or {}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or shapes):
        return
    lines = [f"checkpoint {source} does not match the model config:"]
    if missing:
        lines.append(f"  missing ({len(missing)}, as the model names them): " + "; ".join(_group(missing)))
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): " + "; ".join(_group(names.get(k, k) for k in unexpected)))
    for k in shapes:
        lines.append(f"  shape mismatch: {names.get(k, k)}: checkpoint {list(found[k])}, model {list(expected[k])}")
    raise CheckpointError("\n".join(lines))


def load_state_dict(path, expected, dtype, device, optional=(), rows=None, sink=None):
    """Read a checkpoint into {our name: tensor} with the given dtype/device, strictly against expected {name: shape}.

    optional: names that may be absent (the tied lm_head). Floating tensors are cast to dtype on the way in.
    rows: {our name: (start, stop)} reads only those rows (dim 0) of a tensor: a rank's FSDP shard is one contiguous
    byte range of the file, so only it is copied. sink(our name, tensor): each tensor is handed over as it is read and
    not kept (a sharded model copies it into its own parameter), so nothing but one tensor is ever held besides it.
    """
    files = checkpoint_files(path)
    names = [k for k in files if not IGNORED.search(k)]
    layout = detect_layout(names)
    rules = LAYOUTS.get(layout, [])
    ours = {rename(k, rules): k for k in names}
    if len(ours) != len(names):
        raise ValueError(f"{path}: several checkpoint keys map to the same parameter under layout {layout!r}")
    shapes = {}
    for file in sorted(set(files.values())):
        header, _ = read_header(file)
        for k, info in header.items():
            if k in names:
                shapes[rename(k, rules)] = info["shape"]
    found = {k: v for k, v in shapes.items() if not (k in optional and k not in expected)}
    check_keys({k: v for k, v in expected.items() if k in found or k not in optional}, found,
               f"{path} ({layout} layout)", ours)
    by_file = defaultdict(set)
    for ours_name, k in ours.items():
        if ours_name in expected:
            by_file[files[k]].add(k)
    rows = rows or {}

    def convert(key, t):
        name = rename(key, rules)
        if name in rows:
            t = t[rows[name][0]:rows[name][1]]
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)
        return t if sink is None else sink(name, t)

    state = {}
    for file, keys in by_file.items():
        for k, t in read_tensors(file, keys, convert).items():
            state[rename(k, rules)] = t
    return state, layout


# ----------------------------------------------------------------------------------------------------------------
# writing


def parse_size(s):
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", s.upper())
    if not m:
        raise ValueError(f"size {s!r}: expected e.g. '5GB', '500MB' or a byte count")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


SAFETENSORS_DTYPE = {v: k for k, v in DTYPES.items()}


def save_state_dict(state, path, max_shard_size="5GB", write=True):
    """Write {llava-hf name: tensor} as model.safetensors, or shards + model.safetensors.index.json above the limit.

    A value may also be a callable fetch() -> tensor, with its (shape, dtype) given as `fetch.meta`: the tensor is then
    made only when its bytes are due, one at a time (an FSDP run gathers each sharded parameter just before it is
    written, so no rank ever holds the whole model). Every fetch is called on every process (it may be a collective);
    only the process with write=True writes. The header is written first from the shapes, then the bytes stream out.
    """
    def meta(v):
        return v.meta if callable(v) else (tuple(v.shape), v.dtype)

    limit = parse_size(max_shard_size)
    shards, current, size = [], [], 0
    for k, v in state.items():
        shape, dtype = meta(v)
        n = math_prod(shape) * dtype.itemsize
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append(k)
        size += n
    shards.append(current)
    if write:
        for f in os.listdir(path):           # drop stale weights from an earlier save into the same folder
            if f.endswith(".safetensors") or f == "model.safetensors.index.json":
                os.remove(os.path.join(path, f))
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for name, keys in zip(names, shards):
        header, offset = {}, 0
        for k in keys:
            shape, dtype = meta(state[k])
            n = math_prod(shape) * dtype.itemsize
            header[k] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[k] = name
        total += offset
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)                  # the data starts 8-byte aligned
        f = open(os.path.join(path, name), "wb") if write else None
        try:
            if f:
                f.write(struct.pack("<Q", len(blob)) + blob)
            for k in keys:
                v = state[k]
                t = v() if callable(v) else v
                if tuple(t.shape) != tuple(header[k]["shape"]) or t.dtype != meta(v)[1]:
                    raise ValueError(f"{k}: got {tuple(t.shape)} {t.dtype}, announced {header[k]['shape']} "
                                     f"{meta(v)[1]}")
                if f:
                    f.write(memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
                del t
        finally:
            if f:
                f.close()
    if write and len(shards) > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
