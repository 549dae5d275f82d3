"""The processor against transformers: anyres pixels, image-token counts, chat templates, labels."""

import json

import pytest
import torch

from helpers import llama3_tokenizer_json, random_image
from model import ImageProcessor, LlavaNextConfig, Processor, SYSTEM_PROMPT
from helpers import LLAMA3_8B

# tiny, square (small and exact-size), very wide, very tall, and sizes with their image-token counts worked out from
# LLaVA-NeXT's formula, 576 base features + h' * (w' + 1) for the unpadded h' x w' grid with a newline per row (e.g.
# 480 x 640: 2 x 2 crops, 36 x 48 after unpadding, 576 + 36 * 49 = 2340); 899 x 1024 is the radar chart of transformers'
# LLaVA-NeXT integration test, 2634 tokens there
SIZES = [(5, 7), (100, 100), (336, 336), (40, 900), (900, 40), (899, 1024), (480, 640), (1000, 300), (300, 1000)]
WORKED = {(899, 1024): 2634, (480, 640): 2340, (100, 100): 1176, (1000, 300): 2232, (300, 1000): 2182}

# Meta-Llama-3-8B-Instruct's chat template (the format LLaVA-NeXT's conv_llava_llama_3 renders)
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# llava-hf/llama3-llava-next-8b-hf chat_template.json
HF_TEMPLATE = ("{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'}}"
               "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}"
               "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
               "{{ '\n' + content['text'] + '<|eot_id|>' }}{% endfor %}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CONVERSATION = [
    {"from": "human", "value": "What is the highest bar? Answer the question using a single word or phrase.<image>"},
    {"from": "gpt", "value": "The highest bar is C at 42.\n\n### Answer: C"},
    {"from": "human", "value": "  And the lowest one, by how much?  "},
    {"from": "gpt", "value": "**A**, lower by 1,000 (that is 10%).\n\n### Answer: A"},
]




@pytest.fixture(scope="module")
def model_dir(llama3_tokenizer_dir, tmp_path_factory):
    """A llama3-llava-next-8b directory without weights: its config, the real tokenizer + <image>/<pad>, processor."""
    d = tmp_path_factory.mktemp("llama3_llava")
    (d / "config.json").write_text(json.dumps(LLAMA3_8B))
    (d / "tokenizer.json").write_text(llama3_tokenizer_json(llama3_tokenizer_dir, ["<image>", "<pad>"]))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<pad>",
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192}))
    Processor(LlavaNextConfig.from_dict(LLAMA3_8B), ImageProcessor(LLAMA3_8B["image_grid_pinpoints"])) \
        .save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def proc(model_dir):
    return Processor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_tok(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_image_proc():
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    return LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                      image_grid_pinpoints=LLAMA3_8B["image_grid_pinpoints"])


@pytest.mark.parametrize("size", [(5, 7), (100, 100), (336, 336), (40, 900), (900, 40), (480, 640)])
def test_pixels_equal_transformers(proc, hf_image_proc, size):
    img = random_image(*size, seed=size[0])
    ref = hf_image_proc([img], return_tensors="pt")
    pixel_values, image_sizes = proc.preprocess_images([img])
    assert torch.equal(image_sizes, ref["image_sizes"])
    assert pixel_values.shape == ref["pixel_values"].shape
    assert (pixel_values - ref["pixel_values"]).abs().max().item() <= 1e-5


def test_batch_of_mixed_modes_pads_crops(proc, hf_image_proc):
    """RGBA (composited on white), grayscale and RGB images of different grids in one batch."""
    images = [random_image(30, 200, mode="RGBA"), random_image(500, 520, mode="L"), random_image(700, 90, seed=3)]
    ref = hf_image_proc(images, return_tensors="pt")
    pixel_values, image_sizes = proc.preprocess_images(images)
    assert torch.equal(image_sizes, ref["image_sizes"])
    assert pixel_values.shape == ref["pixel_values"].shape and pixel_values.shape[1] == 5
    assert (pixel_values - ref["pixel_values"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("size", SIZES)
def test_image_token_count_equals_transformers_processor(proc, model_dir, hf_tok, hf_image_proc, size):
    from transformers import LlavaNextProcessor
    hf = LlavaNextProcessor(image_processor=hf_image_proc, tokenizer=hf_tok, patch_size=14,
                            vision_feature_select_strategy="default", num_additional_image_tokens=1)
    out = hf(text="<image>\nWhat is shown?", images=[random_image(*size)], return_tensors="pt")
    inserted = int((out["input_ids"] == 128256).sum())
    assert proc.num_image_tokens(*size) == inserted
    if size in WORKED:
        assert inserted == WORKED[size]


def test_llava_template_ids_equal_transformers(proc, hf_tok):
    """Multi-turn with the system prompt, as LLaVA-NeXT training renders it (Meta's template, trimmed turns)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    messages += [{"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]}
                 for m in CONVERSATION]
    # LLaVA moves the lone <image> to the front of its turn before templating
    messages[1]["content"] = "<image>\n" + messages[1]["content"].replace("<image>", "").strip()
    for gen in (False, True):
        msgs = messages if not gen else messages[:-1]
        ref = hf_tok.apply_chat_template(msgs, chat_template=LLAMA3_TEMPLATE, tokenize=True,
                                         add_generation_prompt=gen, return_dict=False)
        n = proc.num_image_tokens(480, 640)
        ref = [t for r in ref for t in ([128256] * n if r == 128256 else [r])]
        ids, _ = proc.tokenize(CONVERSATION if not gen else CONVERSATION[:-1], [(480, 640)],
                               add_generation_prompt=gen)
        assert ids == ref


def test_hf_template_ids_equal_transformers(proc, hf_tok):
    messages = []
    for m in CONVERSATION:
        content = [{"type": "image"}] * m["value"].count("<image>")
        content.append({"type": "text", "text": m["value"].replace("<image>", "").strip()})
        messages.append({"role": "user" if m["from"] == "human" else "assistant", "content": content})
    text = hf_tok.apply_chat_template(messages[:3], chat_template=HF_TEMPLATE, tokenize=False,
                                      add_generation_prompt=True)
    ref = hf_tok(text)["input_ids"]                     # the tokenizer adds <|begin_of_text|>, as the processor does
    assert ref[0] == 128000
    n = proc.num_image_tokens(899, 1024)
    ref = [t for r in ref for t in ([128256] * n if r == 128256 else [r])]
    ids, _ = proc.tokenize(CONVERSATION[:3], [(899, 1024)], template="hf", add_generation_prompt=True)
    assert ids == ref


@pytest.mark.parametrize("template", ["llava", "hf"])
def test_labels_supervise_exactly_the_answers(proc, template):
    ids, labels = proc.tokenize(CONVERSATION, [(300, 1000)], template=template)
    assert len(ids) == len(labels)
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == -100:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == i
            cur.append(i)
    if cur:
        runs.append(cur)
    answers = [m["value"] for m in CONVERSATION if m["from"] == "gpt"]
    assert [proc.decode(r, skip_special_tokens=False) for r in runs] == [a + "<|eot_id|>" for a in answers]
    image_positions = [k for k, i in enumerate(ids) if i == 128256]
    assert len(image_positions) == proc.num_image_tokens(300, 1000)
    assert all(labels[k] == -100 for k in image_positions)
    assert ids[0] == 128000 and ids.count(128000) == 1


def test_image_tag_count_must_match(proc):
    with pytest.raises(ValueError, match="1 <image> tags but 2 images"):
        proc.tokenize(CONVERSATION, [(10, 10), (20, 20)])


def test_not_an_image_is_named(tmp_path):
    bad = tmp_path / "chart.png"
    bad.write_text("this is not a png")
    with pytest.raises(ValueError, match=r"chart\.png: not a readable image"):
        Processor.load_image(str(bad))
    with pytest.raises(FileNotFoundError, match="image not found"):
        Processor.load_image(str(tmp_path / "missing.png"))


def test_original_tokenizer_without_image_token(llama3_tokenizer_dir, tmp_path):
    """An original LLaVA-NeXT directory: the tokenizer has no <image>; ids come from the config's image index."""
    (tmp_path / "tokenizer.json").write_text(llama3_tokenizer_json(llama3_tokenizer_dir))
    orig = {"model_type": "llava_llama", "vocab_size": 128256, "hidden_size": 4096, "image_aspect_ratio": "anyres",
            "mm_patch_merge_type": "spatial_unpad", "mm_projector_type": "mlp2x_gelu",
            "mm_vision_tower": "openai/clip-vit-large-patch14-336", "image_grid_pinpoints": LLAMA3_8B[
                "image_grid_pinpoints"]}
    (tmp_path / "config.json").write_text(json.dumps(orig))
    proc = Processor.from_pretrained(str(tmp_path))
    ids, _ = proc.tokenize(CONVERSATION[:1], [(100, 100)], add_generation_prompt=True)
    assert ids.count(128256) == 1176
