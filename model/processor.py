"""Processor: anyres image preprocessing, the tokenizer, the Llama-3 chat templates, and training labels.

Images: PIL + numpy, equal to transformers' LlavaNextImageProcessor (PIL backend). Text: `tokenizers` on the
checkpoint's tokenizer.json. Two chat templates:
  "llava"  what LLaVA-NeXT training used (conv_llava_llama_3): a system prompt, Meta's Llama-3 turn format with
           trimmed contents, and a single <image> moved to the front of its turn. The paper's SFT uses it.
  "hf"     the llava-hf chat_template.json: no system prompt, images first, then "\\n" + text in each turn.
Each <image> is expanded to exactly the number of features the model makes for that image.
"""

import json
import os
import shutil

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from model.anyres import num_image_tokens, resized_size, select_best_resolution
from model.config import LlavaNextConfig

# conv_llava_llama_3.system in LLaVA-NeXT's llava/conversation.py
SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
                 "the user provides, and assist the user with a variety of tasks using natural language.")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# files a model directory carries for its tokenizer and processor; save_pretrained copies them through
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json",
                   "chat_template.jinja", "processor_config.json", "generation_config.json")


def load_image(path):
    """Open an image file as a PIL image, with an error that names the file when it is not one."""
    try:
        img = Image.open(path)
        img.load()
        return img
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def to_rgb(img):
    """RGB, compositing any transparency onto white (transformers' convert_to_rgb)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    return img.convert("RGB")


def normalize_messages(messages):
    """[(role, text)] from ShareGPT ({"from", "value"}) or chat ({"role", "content"}) messages."""
    out = []
    for i, m in enumerate(messages):
        role = m.get("from", m.get("role"))
        text = m.get("value", m.get("content"))
        if role not in ROLES or not isinstance(text, str):
            raise ValueError(f"message {i}: expected {{'from': human|gpt|system, 'value': str}} or "
                             f"{{'role': user|assistant|system, 'content': str}}, got {m!r:.200}")
        out.append((ROLES[role], text))
    return out


class ImageProcessor:
    """Anyres preprocessing: best grid resolution, aspect-preserving resize, centred black padding, crops, plus
    the whole image squashed to one crop first; each crop rescaled to [0, 1] and normalised with CLIP's stats."""

    def __init__(self, pinpoints, crop_size=336, shortest_edge=None, mean=CLIP_MEAN, std=CLIP_STD,
                 rescale_factor=1 / 255, resample=Image.Resampling.BICUBIC):
        self.pinpoints = [list(p) for p in pinpoints]
        self.crop = crop_size
        self.shortest_edge = shortest_edge or crop_size
        self.mean = np.array(mean, dtype=np.float32)
        self.std = np.array(std, dtype=np.float32)
        self.rescale_factor = rescale_factor
        self.resample = Image.Resampling(resample)

    @classmethod
    def from_dict(cls, d, pinpoints):
        size = d.get("size", {})
        crop = d.get("crop_size", {})
        crop_size = crop.get("height", size.get("shortest_edge", 336)) if isinstance(crop, dict) else crop
        shortest = size.get("shortest_edge", min(size.get("height", crop_size), size.get("width", crop_size)))
        return cls(d.get("image_grid_pinpoints", pinpoints), crop_size, shortest, d.get("image_mean", CLIP_MEAN),
                   d.get("image_std", CLIP_STD), d.get("rescale_factor", 1 / 255), d.get("resample", 3))

    def to_dict(self):
        return {"image_processor_type": "LlavaNextImageProcessor", "processor_class": "LlavaNextProcessor",
                "do_resize": True, "size": {"shortest_edge": self.shortest_edge}, "do_center_crop": True,
                "crop_size": {"height": self.crop, "width": self.crop}, "do_rescale": True,
                "rescale_factor": self.rescale_factor, "do_normalize": True, "image_mean": self.mean.tolist(),
                "image_std": self.std.tolist(), "do_convert_rgb": True, "do_pad": True,
                "resample": int(self.resample), "image_grid_pinpoints": self.pinpoints}

    def _finish(self, img):
        """One crop (PIL): shortest edge to size, centre crop, rescale, normalise -> (3, S, S) float32."""
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        img = img.resize((new_short, new_long) if w <= h else (new_long, new_short), self.resample)
        x = np.asarray(img)
        top, left = (x.shape[0] - self.crop) // 2, (x.shape[1] - self.crop) // 2
        x = x[top:top + self.crop, left:left + self.crop]
        x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = (x - self.mean) / self.std
        return x.transpose(2, 0, 1)

    def crops(self, img):
        """All crops of one image, (P, 3, S, S): base first, then the grid row-major."""
        img = to_rgb(img)
        W, H = img.size
        th, tw = select_best_resolution((H, W), self.pinpoints)
        nh, nw = resized_size((H, W), (th, tw))
        resized = np.asarray(img.resize((nw, nh), self.resample))
        top, left = (th - nh) // 2, (tw - nw) // 2
        padded = np.zeros((th, tw, 3), dtype=np.uint8)          # black padding, before normalisation
        padded[top:top + nh, left:left + nw] = resized
        grid = [padded[i:i + self.crop, j:j + self.crop] for i in range(0, th, self.crop)
                for j in range(0, tw, self.crop)]
        # the base crop squashes the whole image to one crop, ignoring its aspect ratio
        base = img.resize((self.shortest_edge, self.shortest_edge), self.resample)
        return np.stack([self._finish(base)] + [self._finish(Image.fromarray(c)) for c in grid])

    def __call__(self, images):
        """-> pixel_values float32 (n, P_max, 3, S, S) zero-padded along P, image_sizes int64 (n, 2) as (H, W)."""
        if not images:
            return torch.zeros(0, 0, 3, self.crop, self.crop), torch.zeros(0, 2, dtype=torch.long)
        crops = [self.crops(img) for img in images]
        P = max(len(c) for c in crops)
        pixel_values = np.zeros((len(crops), P, 3, self.crop, self.crop), dtype=np.float32)
        for i, c in enumerate(crops):
            pixel_values[i, :len(c)] = c
        sizes = [(img.size[1], img.size[0]) for img in images]
        return torch.from_numpy(pixel_values), torch.tensor(sizes, dtype=torch.long)


class Processor:
    def __init__(self, config: LlavaNextConfig, image_processor: ImageProcessor, tokenizer=None, path=None,
                 system_prompt=SYSTEM_PROMPT):
        self.config = config
        # the "llava" template's system prompt; a model directory may set its own in processor_config.json
        # ("system_prompt", our key; "" for none, as the tiny demo model does)
        self.system_prompt = system_prompt
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.path = path
        self.image_token_id = config.image_token_index
        if image_processor.crop != config.vision.image_size:
            raise ValueError(f"image processor crop size {image_processor.crop} differs from the vision tower's "
                             f"image_size {config.vision.image_size}")
        self._tok_image_id = None
        if tokenizer is not None:
            self._tok_image_id = tokenizer.token_to_id(IMAGE)
            if self._tok_image_id is None:
                # original LLaVA tokenizers have no <image> token; add one for splitting (ids are remapped below)
                from tokenizers import AddedToken
                tokenizer.add_special_tokens([AddedToken(IMAGE, special=True, normalized=False)])
                self._tok_image_id = tokenizer.token_to_id(IMAGE)

    @classmethod
    def from_pretrained(cls, path):
        config = LlavaNextConfig.from_json(os.path.join(path, "config.json"))
        pp = os.path.join(path, "preprocessor_config.json")
        if os.path.exists(pp):
            with open(pp) as f:
                image_processor = ImageProcessor.from_dict(json.load(f), config.image_grid_pinpoints)
        else:
            image_processor = ImageProcessor(config.image_grid_pinpoints, config.vision.image_size)
        tokenizer = None
        tok_path = os.path.join(path, "tokenizer.json")
        if os.path.exists(tok_path):
            from tokenizers import Tokenizer
            tokenizer = Tokenizer.from_file(tok_path)
        system = SYSTEM_PROMPT
        pc = os.path.join(path, "processor_config.json")
        if os.path.exists(pc):
            with open(pc) as f:
                system = json.load(f).get("system_prompt", SYSTEM_PROMPT)
        return cls(config, image_processor, tokenizer, path, system)

    def save_pretrained(self, path):
        """Write preprocessor_config.json and the tokenizer files (copied through from the source directory)."""
        os.makedirs(path, exist_ok=True)
        for name in PROCESSOR_FILES:
            src = os.path.join(self.path, name) if self.path else None
            if src and os.path.exists(src) and os.path.abspath(src) != os.path.abspath(os.path.join(path, name)):
                shutil.copyfile(src, os.path.join(path, name))
        if self.tokenizer is not None and not os.path.exists(os.path.join(path, "tokenizer.json")):
            self.tokenizer.save(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump(self.image_processor.to_dict(), f, indent=2)
        if self.system_prompt != SYSTEM_PROMPT:
            pc = os.path.join(path, "processor_config.json")
            cfg = json.load(open(pc)) if os.path.exists(pc) else {}
            with open(pc, "w") as f:
                json.dump({**cfg, "system_prompt": self.system_prompt}, f, indent=2)

    # ------------------------------------------------------------------------------------------------ images
    def preprocess_images(self, images):
        """list of PIL images -> (pixel_values (n, P, 3, S, S), image_sizes (n, 2)), as LlavaNextImageProcessor."""
        return self.image_processor(images)

    def num_image_tokens(self, height, width):
        cfg = self.config
        return num_image_tokens((height, width), cfg.image_grid_pinpoints, cfg.vision.image_size, cfg.vision.grid,
                                cfg.vision_feature_select_strategy)

    load_image = staticmethod(load_image)

    # ------------------------------------------------------------------------------------------------ text
    def _tok(self):
        if self.tokenizer is None:
            raise RuntimeError(f"{self.path}: no tokenizer.json, so this processor cannot handle text")
        return self.tokenizer

    def token_id(self, token):
        i = self._tok().token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the tokenizer")
        return i

    def render(self, messages, template="llava", add_generation_prompt=False, system=None):
        """Chat messages -> list of (text, supervised) segments; the assistant contents and their <|eot_id|> are the
        supervised ones. "".join of the texts is the prompt string."""
        msgs = normalize_messages(messages)
        system = self.system_prompt if system is None else system
        segs = [("<|begin_of_text|>", False)]
        if template == "llava":
            if system and not any(r == "system" for r, _ in msgs):
                msgs = [("system", system)] + msgs
            for role, text in msgs:
                if text.count(IMAGE) == 1 and not text.startswith(IMAGE):
                    # LLaVA's preprocess_multimodal moves a lone <image> to the front of its turn
                    text = IMAGE + "\n" + text.replace(IMAGE, "").strip()
                segs.append((f"<|start_header_id|>{role}<|end_header_id|>\n\n", False))
                segs.append((text.strip() + "<|eot_id|>", role == "assistant"))
        elif template == "hf":
            for role, text in msgs:
                n_img, text = text.count(IMAGE), text.replace(IMAGE, "").strip()
                segs.append((f"<|start_header_id|>{role}<|end_header_id|>\n\n" + IMAGE * n_img, False))
                if text:
                    if role == "assistant":
                        segs += [("\n", False), (text + "<|eot_id|>", True)]
                    else:
                        segs.append(("\n" + text + "<|eot_id|>", False))
        else:
            raise ValueError(f"unknown chat template {template!r}; known: 'llava', 'hf'")
        if add_generation_prompt:
            segs.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
        return segs

    def apply_chat_template(self, messages, template="llava", add_generation_prompt=False, system=None):
        return "".join(t for t, _ in self.render(messages, template, add_generation_prompt, system))

    def encode(self, text, image_sizes=(), supervised_spans=()):
        """Tokenize a prompt string (special tokens written out, no BOS added) and expand each <image> to its
        feature count. Returns (input_ids, labels): labels copy the ids of tokens that start inside one of the
        supervised character spans, -100 elsewhere (prompt, image tokens)."""
        enc = self._tok().encode(text, add_special_tokens=False)
        sizes = [tuple(s) for s in torch.as_tensor(image_sizes).reshape(-1, 2).tolist()]
        n_tags = sum(1 for i in enc.ids if i == self._tok_image_id)
        if n_tags != len(sizes):
            raise ValueError(f"the text has {n_tags} {IMAGE} tags but {len(sizes)} images were given")
        ids, labels, k = [], [], 0
        for tid, (start, _) in zip(enc.ids, enc.offsets):
            if tid == self._tok_image_id:
                n = self.num_image_tokens(*sizes[k])
                k += 1
                ids += [self.image_token_id] * n
                labels += [-100] * n
                continue
            ids.append(tid)
            labels.append(tid if any(a <= start < b for a, b in supervised_spans) else -100)
        return ids, labels

    def tokenize(self, messages, image_sizes=(), template="llava", add_generation_prompt=False, system=None):
        """Conversation -> (input_ids, labels) lists: the training sample, or the prompt with a generation prompt."""
        segs = self.render(messages, template, add_generation_prompt, system)
        spans, pos = [], 0
        for text, supervised in segs:
            if supervised:
                spans.append((pos, pos + len(text)))
            pos += len(text)
        return self.encode("".join(t for t, _ in segs), image_sizes, spans)

    def decode(self, ids, skip_special_tokens=True):
        ids = [int(i) for i in ids if int(i) != self.image_token_id and int(i) >= 0]
        return self._tok().decode(ids, skip_special_tokens=skip_special_tokens)
