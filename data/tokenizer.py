"""A word-level tokenizer for small task-specific models (the embedded default), built with `tokenizers`.

Words and punctuation marks are tokens; the Llama-3 chat special tokens, <image> and <pad> are added, so the
processor's chat templates work unchanged. Decoding joins tokens with spaces ("A is 6 ."), which the synthetic
task's own texts already are. A word outside the vocabulary becomes <unk>: unknown_words() measures how often.
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


def unknown_words(tokenizer, texts, examples=5):
    """(unknown, words, the most frequent unknown words) of `texts` under a tokenizer with an unknown token (a
    word-level one: a word outside its vocabulary becomes <unk>); None for one without (byte-level BPE such as
    Llama-3's spells every text). Special tokens such as <image> are not counted as words."""
    unk = getattr(tokenizer.model, "unk_token", None)
    unk_id = tokenizer.token_to_id(unk) if unk else None
    if unk_id is None:
        return None
    specials = set(tokenizer.get_added_tokens_decoder()) - {unk_id}
    n = bad = 0
    seen = {}
    for text in texts:
        enc = tokenizer.encode(text, add_special_tokens=False)
        for tid, (a, b) in zip(enc.ids, enc.offsets):
            if tid in specials:
                continue
            n += 1
            if tid == unk_id:
                bad += 1
                seen[text[a:b]] = seen.get(text[a:b], 0) + 1
    return bad, n, sorted(seen, key=lambda w: -seen[w])[:examples]
