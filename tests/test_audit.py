"""training/audit.py: where a rejected chain's first error lies in its tokens (the token-reward page's window)."""

from model import Processor
from training import audit


def test_error_window_is_the_first_wrong_step_and_the_token_after_it(trained):
    proc = Processor.from_pretrained(trained["sft"])
    meta = {"family": "count_above", "params": {"x": 4}, "chart": {"names": list("ABCD"), "values": [6, 3, 8, 1]}}
    text = "A is 6 > 4 yes 1 . B is 5 > 4 yes 2 . C is 8 > 4 yes 3 . D is 1 > 4 no 3 .\n\n### Answer: 3"
    toks = proc.tokenizer.encode(text, add_special_tokens=False).ids
    words = [proc.decode([t]) for t in toks]
    window = audit.error_window(meta, toks, proc)
    assert [words[j] for j in window] == "B is 5 > 4 yes 2 . C".split(), [words[j] for j in window]
    right = text.replace("B is 5 > 4 yes 2", "B is 3 > 4 no 1").replace("yes 3", "yes 2").replace("no 3", "no 2")
    toks = proc.tokenizer.encode(right, add_special_tokens=False).ids         # steps right, the answer wrong
    assert [proc.decode([t]) for t in (toks[j] for j in audit.error_window(meta, toks, proc))] == \
        ["###", "Answer", ":", "3"]
