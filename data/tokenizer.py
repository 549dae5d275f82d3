"""A word-level tokenizer for small task-specific models (the embedded default), built with `tokenizers`.

Words and punctuation marks are tokens; the Llama-3 chat special tokens, <image> and <pad> are added, so the
processor's chat templates work unchanged. Decoding joins tokens with spaces ("A is 6 ."), which the synthetic
task's own texts already are.
"""

from tokenizers import Tokenizer, models, pre_tokenizers

from model.processor import SYSTEM_PROMPT

SPECIAL = ["<pad>", "<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "<image>"]
_PRE = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("contiguous")])


def words(text):
    return [w for w, _ in _PRE.pre_tokenize_str(text)]


def build_word_tokenizer(texts, path=None, max_number=1000):
    """A tokenizer whose vocabulary is every word of `texts`, the chat template's words and the integers up to
    max_number; saved to `path`."""
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for text in list(texts) + [SYSTEM_PROMPT, "system user assistant"] + [str(i) for i in range(max_number + 1)]:
        for w in words(text):
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = _PRE
    tok.add_special_tokens(SPECIAL)
    if path:
        tok.save(path)
    return tok
