"""Model configuration: dataclasses read from and written back to a Hugging Face `config.json`.

Two on-disk formats are understood:
  * llava-hf (`"model_type": "llava_next"`, with `vision_config` and `text_config` sub-dicts), what transformers
    reads and writes;
  * the original LLaVA-NeXT format (`"model_type": "llava_llama"` or `"llava_mistral"`): a flat Llama config plus
    `mm_*` fields, the vision tower named by `mm_vision_tower` (Open-LLaVA-NeXT, the paper's released checkpoints).
Fields the JSON omits take the defaults of the matching transformers class (LlavaNextConfig, CLIPVisionConfig,
LlamaConfig / MistralConfig), and every key we do not model is kept in `extra` and written back, so a load/save
round trip loses nothing.
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field

from common.cli import UserError


class CheckpointError(UserError, ValueError):
    """A model directory that cannot be loaded as it is (a bad config.json, a damaged or missing weight file, keys
    that do not match the config): one line saying what is wrong and where, no traceback."""


DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _split_known(cls, d):
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in d.items() if k in names}
    extra = {k: v for k, v in d.items() if k not in names}
    return known, extra


@dataclass
class VisionConfig:
    """CLIP vision transformer (transformers' CLIPVisionConfig defaults)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    model_type: str = "clip_vision_model"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.model_type != "clip_vision_model":
            raise ValueError(f"vision_config.model_type {self.model_type!r} is not supported; only 'clip_vision_model' "
                             "(the CLIP tower every LLaVA-NeXT checkpoint uses)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.grid = self.image_size // self.patch_size      # patches per side of one crop (24 for CLIP-L/336)

    @classmethod
    def from_dict(cls, d):
        known, extra = _split_known(cls, d)
        return cls(**known, extra=extra)

    def to_dict(self):
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **d}


# per text model_type, the class defaults of transformers' LlamaConfig / MistralConfig that differ from ours
_TEXT_DEFAULTS = {
    "llama": {},
    "mistral": {"intermediate_size": 14336, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
                "sliding_window": 4096},
}


@dataclass
class TextConfig:
    """Llama (or Mistral, which is the same network) decoder (transformers' LlamaConfig defaults)."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.model_type not in _TEXT_DEFAULTS:
            raise ValueError(f"text_config.model_type {self.model_type!r} is not supported; "
                             f"known: {sorted(_TEXT_DEFAULTS)}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: null and 'llama3'")
        if self.hidden_act != "silu":
            raise ValueError(f"text hidden_act {self.hidden_act!r} is not supported; Llama and Mistral use 'silu'")

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        model_type = d.get("model_type", "llama")
        d = {**_TEXT_DEFAULTS.get(model_type, {}), **d}
        # transformers 5 writes RoPE as `rope_parameters` = {"rope_type", "rope_theta", ...}; 4.x as rope_theta +
        # rope_scaling. We read both and write the 4.x form, which both versions read.
        rp = d.pop("rope_parameters", None)
        if rp:
            d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            if rp.get("rope_type", rp.get("type", "default")) != "default" and d.get("rope_scaling") is None:
                d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        known, extra = _split_known(cls, d)
        return cls(**known, extra=extra)

    def to_dict(self):
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **d}


@dataclass
class LlavaNextConfig:
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
        patch_size=14, projection_dim=768))
    text: TextConfig = field(default_factory=TextConfig)
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: str = "default"
    vision_feature_layer: int | list = -2
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False
    image_grid_pinpoints: list = field(default_factory=lambda: [list(p) for p in DEFAULT_PINPOINTS])
    image_seq_length: int = 576
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {self.vision_feature_select_strategy!r} is not one of "
                             "'default' (drop CLS) or 'full'")
        n = self.vision.num_hidden_layers
        for layer in self.feature_layers:
            if not -(n + 1) <= layer <= n:
                raise ValueError(f"vision_feature_layer {layer} is out of range for a {n}-layer vision tower "
                                 f"(valid: {-(n + 1)}..{n})")
        for hw in self.image_grid_pinpoints:
            if len(hw) != 2 or hw[0] % self.vision.image_size or hw[1] % self.vision.image_size:
                raise ValueError(f"image_grid_pinpoints entry {hw} is not a (height, width) pair of multiples of the "
                                 f"vision image_size {self.vision.image_size}")

    @property
    def feature_layers(self):
        """vision_feature_layer as a list (the list form concatenates those layers' hidden states)."""
        fl = self.vision_feature_layer
        return list(fl) if isinstance(fl, (list, tuple)) else [fl]

    # ---- llava-hf config.json
    @classmethod
    def from_dict(cls, d):
        model_type = d.get("model_type")
        if model_type in ("llava_llama", "llava_mistral"):
            return cls.from_original_dict(d)
        if model_type != "llava_next":
            raise ValueError(f"unknown model_type {model_type!r}: expected 'llava_next' (llava-hf layout) or "
                             "'llava_llama' / 'llava_mistral' (original LLaVA-NeXT layout)")
        d = {k: v for k, v in d.items() if k not in ("model_type", "architectures")}   # to_dict writes both
        vision = d.pop("vision_config", None)
        # a missing vision_config means transformers' LlavaNextConfig default: CLIP-L/336
        vision = VisionConfig.from_dict(vision) if vision is not None else cls().vision
        text = TextConfig.from_dict(d.pop("text_config", None) or {})
        known, extra = _split_known(cls, d)
        if "image_token_id" in extra and "image_token_index" not in known:   # newer transformers spelling
            known["image_token_index"] = extra.pop("image_token_id")
        return cls(vision=vision, text=text, **known, extra=extra)

    def to_dict(self, dtype=None):
        d = {k: v for k, v in self.extra.items() if k not in ("torch_dtype", "dtype", "transformers_version")}
        d.update(architectures=["LlavaNextForConditionalGeneration"], model_type="llava_next",
                 image_token_index=self.image_token_index, projector_hidden_act=self.projector_hidden_act,
                 vision_feature_select_strategy=self.vision_feature_select_strategy,
                 vision_feature_layer=self.vision_feature_layer,
                 multimodal_projector_bias=self.multimodal_projector_bias,
                 tie_word_embeddings=self.tie_word_embeddings, image_grid_pinpoints=self.image_grid_pinpoints,
                 image_seq_length=self.image_seq_length, vision_config=self.vision.to_dict(),
                 text_config=self.text.to_dict())
        if dtype is not None:
            d["torch_dtype"] = str(dtype).removeprefix("torch.")
        return d

    # ---- original LLaVA-NeXT config.json (llava_llama / llava_mistral)
    @classmethod
    def from_original_dict(cls, d):
        d = dict(d)
        required = {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
                    "mm_projector_type": "mlp2x_gelu"}
        for key, want in required.items():
            if d.get(key) != want:
                raise ValueError(f"original LLaVA-NeXT config: {key}={d.get(key)!r} is not supported (want {want!r}); "
                                 "this port implements llava-v1.6: anyres + spatial_unpad + mlp2x_gelu")
        if d.get("mm_use_im_start_end"):
            raise ValueError("original LLaVA-NeXT config: mm_use_im_start_end=true is not supported")
        if "vision_config" in d:        # our extension: an explicit CLIP config (used for tiny test checkpoints)
            vision = VisionConfig.from_dict(d.pop("vision_config"))
        else:
            tower = d.get("mm_vision_tower") or ""
            name = os.path.basename(tower.rstrip("/"))
            if name not in KNOWN_VISION_TOWERS:
                raise ValueError(f"original LLaVA-NeXT config: unknown mm_vision_tower {tower!r}; known: "
                                 f"{sorted(KNOWN_VISION_TOWERS)} (or give an explicit 'vision_config' dict)")
            vision = VisionConfig(**KNOWN_VISION_TOWERS[name])
        select = {"patch": "default", "cls_patch": "full"}
        feature = d.get("mm_vision_select_feature", "patch")
        if feature not in select:
            raise ValueError(f"original LLaVA-NeXT config: mm_vision_select_feature {feature!r} is not one of "
                             f"{sorted(select)}")
        text_type = "mistral" if d["model_type"] == "llava_mistral" else "llama"
        mm_keys = {k: d.pop(k) for k in list(d) if k.startswith("mm_") or k in (
            "image_aspect_ratio", "image_grid_pinpoints", "image_token_index", "tokenizer_padding_side",
            "tokenizer_model_max_length", "image_crop_resolution", "image_split_resolution", "use_mm_proj",
            "freeze_mm_mlp_adapter", "tune_mm_mlp_adapter", "architectures", "model_type")}
        tie = d.pop("tie_word_embeddings", False)
        text = TextConfig.from_dict({**d, "model_type": text_type})
        return cls(vision=vision, text=text,
                   # the original code splices features at a -200 placeholder, so it has no image token in its
                   # vocabulary; we use the id the llava-hf conversion gives it (first id past the vocabulary)
                   image_token_index=mm_keys.get("image_token_index") or text.vocab_size,
                   vision_feature_select_strategy=select[feature],
                   vision_feature_layer=mm_keys.get("mm_vision_select_layer", -2),
                   tie_word_embeddings=tie,
                   image_grid_pinpoints=mm_keys.get("image_grid_pinpoints") or [list(p) for p in DEFAULT_PINPOINTS],
                   image_seq_length=vision.grid ** 2)

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: {e}") from None

    def save_json(self, path, dtype=None):
        with open(path, "w") as f:
            json.dump(self.to_dict(dtype), f, indent=2)
            f.write("\n")


# CLIP towers named by `mm_vision_tower` in original LLaVA-NeXT configs (their Hub config.json files)
KNOWN_VISION_TOWERS = {
    "clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
    "clip-vit-large-patch14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768),
}
