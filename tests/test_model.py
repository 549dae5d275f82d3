"""The model against transformers: logits parity, checkpoint round trips in every key layout, clear errors."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import (LLAMA3_8B, PINPOINTS, assert_close, batch_for, hf_config_dict, hf_logits, make_hf_model,
                     original_config, our_logits, to_original)
from model import LlavaNext, LlavaNextConfig
from model.anyres import grid_shape
from model.weights import LAYOUTS, TO_HUB, rename

KINDS = ["llama", "mistral"]









@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    """(transformers model, its save_pretrained directory, our model loaded from it)."""
    hf = make_hf_model(request.param)
    path = str(tmp_path_factory.mktemp(f"hf_{request.param}"))
    hf.save_pretrained(path)
    return hf, path, LlavaNext.from_pretrained(path).eval()


def test_batch_has_three_grid_shapes(pair):
    _, _, ours = pair
    sizes = batch_for(ours)["image_sizes"].tolist()
    assert len({grid_shape(s, PINPOINTS, 42) for s in sizes}) == 3


def test_logits_equal_transformers(pair):
    """Text-only + 1-image + 2-image samples, right-padded with a mask: every position within 1e-4."""
    hf, _, ours = pair
    batch = batch_for(ours)
    assert_close(our_logits(ours, batch), hf_logits(hf, batch), 1e-4, "logits")


def test_hidden_states_feed_the_head(pair):
    _, _, ours = pair
    batch = batch_for(ours, seed=1)
    with torch.no_grad():
        h = ours(batch["input_ids"], batch["pixel_values"], batch["image_sizes"], batch["attention_mask"],
                 return_hidden=True)
    assert_close(h @ ours.output_weight.T, our_logits(ours, batch), 1e-5, "hidden @ W")


def test_left_padding_equals_alone(pair):
    """Positions follow the mask: a left-padded sample gives the logits it gives alone."""
    _, _, ours = pair
    batch = batch_for(ours)
    ids, mask = batch["input_ids"][:1], batch["attention_mask"][:1]
    n = int(mask.sum())
    alone = ours(ids[:, :n])
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids[:, :n]], 1)
    pmask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, n, dtype=torch.long)], 1)
    with torch.no_grad():
        assert_close(ours(padded, attention_mask=pmask)[:, 5:], alone, 1e-4, "left-padded")


def test_our_save_loads_in_transformers(pair, tmp_path):
    from transformers import LlavaNextForConditionalGeneration
    hf, _, ours = pair
    ours.save_pretrained(str(tmp_path))
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert any(k.startswith("vision_tower.vision_model.") for k in keys), "not the llava-hf Hub layout"
    assert any(k.startswith("language_model.model.layers.") for k in keys)
    back = LlavaNextForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    batch = batch_for(ours, seed=2)
    assert_close(hf_logits(back, batch), hf_logits(hf, batch), 1e-4, "transformers(our save)")


def test_sharded_save_round_trip(pair, tmp_path):
    from transformers import LlavaNextForConditionalGeneration
    hf, _, ours = pair
    ours.save_pretrained(str(tmp_path), max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    batch = batch_for(ours, seed=3)
    reloaded = LlavaNext.from_pretrained(str(tmp_path)).eval()
    assert_close(our_logits(reloaded, batch), our_logits(ours, batch), 0, "our sharded reload")
    back = LlavaNextForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    assert_close(hf_logits(back, batch), hf_logits(hf, batch), 1e-4, "transformers(sharded)")


def write_layout(src_dir, dst, key_fn, config=None):
    state = load_file(os.path.join(src_dir, "model.safetensors"))
    os.makedirs(dst, exist_ok=True)
    save_file({key_fn(k): v for k, v in state.items()}, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config or json.load(open(os.path.join(src_dir, "config.json"))), f)






@pytest.mark.parametrize("layout", ["llava-hf", "transformers-in-memory", "original"])
def test_every_key_layout_loads(pair, tmp_path, layout):
    hf, path, ours = pair
    hub = str(tmp_path / "hub")
    ours.save_pretrained(hub)                     # llava-hf Hub layout: vision_tower.vision_model..., language_model.model...
    if layout == "llava-hf":
        src = hub
    elif layout == "transformers-in-memory":
        src = str(tmp_path / "mem")
        os.makedirs(src)
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()
                   if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)},
                  os.path.join(src, "model.safetensors"))
        with open(os.path.join(src, "config.json"), "w") as f:
            json.dump(json.load(open(os.path.join(path, "config.json"))), f)
    else:
        src = str(tmp_path / "orig")
        kind = "mistral" if ours.config.text.model_type == "mistral" else "llama"
        write_layout(hub, src, to_original, original_config(kind))
    batch = batch_for(ours, seed=4)
    loaded = LlavaNext.from_pretrained(src).eval()
    assert_close(our_logits(loaded, batch), hf_logits(hf, batch), 1e-4, f"{layout} layout")


def test_layout_tables_invert_the_hub_names():
    """Each layout's renames take its names to ours; TO_HUB takes ours to the Hub's."""
    ours = ["vision_tower.encoder.layers.3.mlp.fc1.weight", "multi_modal_projector.linear_2.bias", "image_newline",
            "language_model.layers.0.self_attn.q_proj.weight", "language_model.norm.weight", "lm_head.weight"]
    hub = [rename(k, TO_HUB) for k in ours]
    assert hub[0] == "vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight"
    assert hub[-1] == "language_model.lm_head.weight"
    assert [rename(k, LAYOUTS["llava-hf"]) for k in hub] == ours
    assert [rename(to_original(k), LAYOUTS["original"]) for k in hub] == ours


# ------------------------------------------------------------------------------------------------ vision tower

@pytest.mark.parametrize("layers,strategy", [([-2], "default"), ([1], "full"), ([0, -1], "default"), ([3], "full")])
def test_vision_feature_layers_and_strategies(pair, layers, strategy):
    """Feature layer indexing (negative, positive, list) and select strategy against CLIP's hidden_states."""
    hf, _, ours = pair
    px = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        states = hf.model.vision_tower(px, output_hidden_states=True).hidden_states
        ref = torch.cat([states[i] for i in layers], -1)
        ref = ref[:, 1:] if strategy == "default" else ref
        got = ours.vision_tower(px, layers, strategy)
    assert_close(got, ref, 1e-5, "vision features")


def test_unused_vision_layers_are_not_run(pair):
    """Layers past the selected one cannot change the output: poisoning them changes nothing."""
    _, path, _ = pair
    model = LlavaNext.from_pretrained(path).eval()
    batch = batch_for(model)
    before = our_logits(model, batch)
    deepest = max(model.vision_tower.hidden_index(i) for i in model.config.feature_layers)
    with torch.no_grad():
        for p in model.vision_tower.encoder.layers[deepest:].parameters():
            p.fill_(float("nan"))
        model.vision_tower.post_layernorm.weight.fill_(float("nan"))
    assert torch.equal(our_logits(model, batch), before)
    assert all(not p.requires_grad for p in model.vision_tower.post_layernorm.parameters())


# ------------------------------------------------------------------------------------------------ config

def test_config_fills_class_defaults_and_round_trips():
    from transformers import LlavaNextConfig as HFConfig
    cfg = LlavaNextConfig.from_dict(LLAMA3_8B)
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.head_dim) == (4096, 32, 32, 128)
    assert (t.num_key_value_heads, t.vocab_size, t.rope_theta, t.rope_scaling) == (8, 128320, 500000.0, None)
    assert (v.hidden_act, v.layer_norm_eps, v.grid) == ("quick_gelu", 1e-5, 24)
    assert cfg.multimodal_projector_bias and not cfg.tie_word_embeddings and cfg.image_seq_length == 576
    out = cfg.to_dict()
    assert out["text_config"]["_name_or_path"] == "meta-llama/Meta-Llama-3-8B-Instruct"   # extras kept
    hf = HFConfig(**{k: v for k, v in out.items() if k not in ("model_type", "architectures")})
    assert hf.text_config.hidden_size == 4096 and hf.text_config.num_key_value_heads == 8
    assert hf.vision_config.image_size == 336 and hf.image_token_index == 128256
    assert LlavaNextConfig.from_dict(out).to_dict() == out


def test_original_config_implies_clip_l_336():
    """lmms-lab/llama3-llava-next-8b style config -> the same model as the llava-hf config."""
    orig = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": 128256,
            "max_position_embeddings": 8192, "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
            "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
            "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 1024,
            "image_grid_pinpoints": LLAMA3_8B["image_grid_pinpoints"], "mm_use_im_start_end": False}
    cfg = LlavaNextConfig.from_dict(orig)
    ref = LlavaNextConfig.from_dict(LLAMA3_8B)
    drop_extra = lambda v: {k: x for k, x in v.to_dict().items() if k not in v.extra}   # noqa: E731
    assert drop_extra(cfg.vision) == drop_extra(ref.vision)
    assert cfg.image_token_index == 128256 and cfg.feature_layers == [-2]
    assert cfg.text.hidden_size == ref.text.hidden_size and cfg.text.rope_theta == ref.text.rope_theta


def test_rope_parameters_form_of_transformers_5():
    d = hf_config_dict("llama")
    d["text_config"] = dict(d["text_config"])
    rs = d["text_config"].pop("rope_scaling")
    del d["text_config"]["rope_theta"]
    d["text_config"]["rope_parameters"] = {**rs, "rope_theta": 1234.0}
    cfg = LlavaNextConfig.from_dict(d)
    assert cfg.text.rope_theta == 1234.0 and cfg.text.rope_scaling["rope_type"] == "llama3"


# ------------------------------------------------------------------------------------------------ bad input

@pytest.fixture
def saved(pair, tmp_path):
    _, _, ours = pair
    ours.save_pretrained(str(tmp_path))
    return tmp_path


def test_missing_tensor_is_named(saved):
    state = load_file(str(saved / "model.safetensors"))
    del state["language_model.model.layers.1.mlp.up_proj.weight"]
    del state["multi_modal_projector.linear_1.bias"]
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        LlavaNext.from_pretrained(str(saved))
    msg = str(e.value)
    assert "missing (2" in msg and "language_model.layers.1.mlp.up_proj.weight" in msg
    assert "multi_modal_projector.linear_1.bias" in msg


def test_unexpected_and_wrong_shape_are_named(saved):
    state = load_file(str(saved / "model.safetensors"))
    state["language_model.model.layers.7.mlp.up_proj.weight"] = torch.zeros(2, 2)
    state["image_newline"] = torch.zeros(3)
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        LlavaNext.from_pretrained(str(saved))
    msg = str(e.value)
    assert "unexpected (1)" in msg and "language_model.model.layers.7.mlp.up_proj.weight" in msg
    assert "shape mismatch: image_newline: checkpoint [3]" in msg


def test_truncated_file_is_named(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated safetensors file"):
        LlavaNext.from_pretrained(str(saved))


def test_unknown_model_type_is_named(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "qwen2_vl"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: unknown model_type 'qwen2_vl'"):
        LlavaNext.from_pretrained(str(saved))


def test_image_token_count_mismatch_is_explained(pair):
    _, _, ours = pair
    batch = batch_for(ours)
    ids = batch["input_ids"].clone()
    ids[1, 3] = 1                                    # drop one image token
    with pytest.raises(ValueError, match="image tokens .* but the images give"):
        ours(ids, batch["pixel_values"], batch["image_sizes"], batch["attention_mask"])


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict("llama")))
    torch.save({"x": torch.zeros(1)}, str(tmp_path / "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match="pickled weights are not loaded"):
        LlavaNext.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_conversion_on_load(pair, dtype):
    hf, path, _ = pair
    model = LlavaNext.from_pretrained(path, dtype=dtype).eval()
    assert {p.dtype for p in model.parameters()} == {dtype}
    batch = batch_for(model)
    got = our_logits(model, batch).float()
    ref = hf_logits(hf, batch)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.05, f"{dtype} logits drift {rel:.3g} from fp32"


def test_a_malformed_config_and_a_git_lfs_pointer_are_one_line_errors(tmp_path):
    """Two common broken downloads: a config.json that is not JSON, and a git-lfs pointer file saved in place of the
    weights. Each is one line (a UserError, no traceback) naming the file; the pointer's names git-lfs."""
    from common.cli import UserError
    from model.weights import load_state_dict
    (tmp_path / "config.json").write_text('{"model_type": "llava_next",\n "text_config": {')
    with pytest.raises(UserError) as e:
        LlavaNext.empty(str(tmp_path))
    assert "config.json: not valid JSON" in str(e.value) and "line 2" in str(e.value) and "\n" not in str(e.value)
    pointer = tmp_path / "model.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f"
                       "32b1258daaa5e2ca24d17e2393\nsize 16060522392\n")
    with pytest.raises(UserError) as e:
        load_state_dict(str(tmp_path), {}, torch.float32, "cpu")
    assert "git-lfs pointer" in str(e.value) and "git lfs pull" in str(e.value) and "\n" not in str(e.value)
