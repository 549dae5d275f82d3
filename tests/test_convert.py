"""python -m model.convert: an original LLaVA-NeXT checkpoint (no <image> in its vocabulary) -> llava-hf."""

import json
import os
import subprocess
import sys

from safetensors.torch import load_file, save_file

from helpers import ROOT, assert_close, make_hf_model
from model import LlavaNext
from helpers import batch_for, hf_logits, original_config, our_logits, to_original


def test_convert_original_checkpoint(tmp_path):
    from transformers import LlavaNextForConditionalGeneration
    hf = make_hf_model("llama")
    hub = tmp_path / "hub"
    hf.save_pretrained(str(hub))
    ours = LlavaNext.from_pretrained(str(hub)).eval()
    ours.save_pretrained(str(hub))
    # the original format keeps the text vocabulary only: drop the last row (the image token's, id 255)
    state = load_file(str(hub / "model.safetensors"))
    for k in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        state[k] = state[k][:255].contiguous()
    src = tmp_path / "orig"
    src.mkdir()
    save_file({to_original(k): v for k, v in state.items()}, str(src / "model.safetensors"))
    cfg = original_config("llama")
    cfg["vocab_size"] = 255
    del cfg["image_token_index"]                    # as in real original configs: the id is the vocabulary size
    (src / "config.json").write_text(json.dumps(cfg))

    original = LlavaNext.from_pretrained(str(src)).eval()
    assert original.config.image_token_index == 255
    batch = batch_for(original)
    expected = our_logits(original, batch)

    dst = tmp_path / "converted"
    out = subprocess.run([sys.executable, "-m", "model.convert", str(src), str(dst)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "verify: reloaded output, max |logit difference| on a probe prompt = 0" in out.stdout
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "llava_next" and config["text_config"]["vocab_size"] == 320
    back = LlavaNextForConditionalGeneration.from_pretrained(str(dst)).eval()
    got = hf_logits(back, batch)
    assert_close(got[..., :255], expected, 1e-4, "converted logits (original vocabulary)")
    assert os.path.exists(dst / "preprocessor_config.json")
    assert_close(our_logits(LlavaNext.from_pretrained(str(dst)), batch), got, 1e-4, "our load of the output")
