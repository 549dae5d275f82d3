"""The three JSONL formats the stages exchange, and their validation.

  QA record  {"id", "image", "question", "answers": [str], "choices": [str] | null, "dataset"} (+ any extra field,
             e.g. "meta" with the synthetic chart's data); input to distill.py, sample.py, evaluate.py
  SFT row    {"id", "image", "conversations": [{"from": "human", "value"}, {"from": "gpt", "value"}, ...]}, the
             released ShareGPT-4o-Reasoning / LLaVA format
  DPO pair   {"image", "question", "chosen", "rejected"} (+ any extra field: "id", the released rows' "idx", ...),
             the released dpo_data format, read as the authors' trainer reads it: ids are optional and may repeat
             (a question's pairs share one); a pair is known by its file and line
Bad input is an error naming the file, the line and the field. Output files are appended one record at a time and
flushed, so a killed run loses nothing it finished; repair_tail() drops a half-written last line on resume.
"""

import json
import os

from common.cli import UserError
from data.prompts import FAMILIES


class FormatError(UserError, ValueError):
    """Bad input data: one line naming the file, the line and the field (a UserError: no traceback)."""


def read_jsonl(path):
    """Yield (line number, object) for each non-empty line; a line that is not JSON is an error naming it."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                body = line.rstrip()
                if e.pos >= len(body) or e.msg.startswith("Unterminated string"):     # the text ran out first
                    raise FormatError(f"{path}:{n}: the line ends (column {len(body)}) before its JSON object does: "
                                      "cut off, e.g. by a killed run or a partial copy") from None
                raise FormatError(f"{path}:{n}: not valid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise FormatError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


def _need(obj, field, types, where, allow_none=False):
    if field not in obj:
        raise FormatError(f"{where}: missing field {field!r}")
    v = obj[field]
    if v is None and allow_none:
        return v
    if not isinstance(v, types):
        names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise FormatError(f"{where}: field {field!r} must be {names}{' or null' if allow_none else ''}, "
                          f"got {type(v).__name__}")
    return v


def validate_qa(obj, where):
    _need(obj, "id", (str, int), where)
    _need(obj, "question", str, where)
    _need(obj, "image", str, where, allow_none=True)
    answers = _need(obj, "answers", list, where)
    if not answers or not all(isinstance(a, (str, int, float)) for a in answers):
        raise FormatError(f"{where}: field 'answers' must be a non-empty list of strings")
    choices = _need(obj, "choices", list, where, allow_none=True) if "choices" in obj else None
    if choices is not None and not all(isinstance(c, (str, int, float)) for c in choices):
        raise FormatError(f"{where}: field 'choices' must be a list of strings or null")
    dataset = _need(obj, "dataset", str, where)
    if dataset not in FAMILIES:
        raise FormatError(f"{where}: field 'dataset' is {dataset!r}, not one of {sorted(FAMILIES)}")
    obj["id"] = str(obj["id"])
    obj.setdefault("choices", None)
    return obj


def validate_sft(obj, where):
    _need(obj, "id", (str, int), where)
    conv = _need(obj, "conversations", list, where)
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise FormatError(f"{where}: conversations[{i}] must be {{'from': ..., 'value': ...}}")
        if not isinstance(turn["value"], str):
            raise FormatError(f"{where}: conversations[{i}].value must be a string, got {type(turn['value']).__name__}")
    return obj


def validate_pair(obj, where):
    for field in ("question", "chosen", "rejected"):
        _need(obj, field, str, where)
    _need(obj, "image", str, where, allow_none=True)
    return obj


def load(paths, validate):
    """All records of one or more JSONL files, validated (every error names file:line); ids must be unique."""
    out, seen = [], {}
    for path in [paths] if isinstance(paths, str) else paths:
        for n, obj in read_jsonl(path):
            rec = validate(obj, f"{path}:{n}")
            key = str(rec["id"])
            if key in seen:
                raise FormatError(f"{path}:{n}: duplicate id {key!r} (first at {seen[key]})")
            seen[key] = f"{path}:{n}"
            out.append(rec)
    return out


def load_qa(paths):
    return load(paths, validate_qa)


def load_pairs(paths):
    """[(pair, key)] of DPO pair files, validated; key is "file:line", the pair's name in manifests, reference caches
    and messages (ids are optional in the released pairs, and shared by a question's pairs)."""
    out = []
    for path in [paths] if isinstance(paths, str) else paths:
        for n, obj in read_jsonl(path):
            out.append((validate_pair(obj, f"{path}:{n}"), f"{path}:{n}"))
    return out


def repair_tail(path):
    """Cut a half-written last line (a run killed mid-write) so appends start on a fresh line. Returns bytes cut."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return 0
        pos = size
        while pos > 0:                                    # find the last newline
            step = min(65536, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            k = chunk.rfind(b"\n")
            if k >= 0:
                cut = pos - step + k + 1
                break
            pos -= step
        else:
            cut = 0
        f.truncate(cut)
        return size - cut


def done_ids(path, key="id"):
    """The values of `key` in an output JSONL written by us (after repairing its tail)."""
    if not os.path.exists(path):
        return set()
    repair_tail(path)
    return {str(obj.get(key)) for _, obj in read_jsonl(path)}


class Appender:
    """Append JSON rows to a file, flushing after each group, so a kill loses no finished row."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        repair_tail(path)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, *rows):
        self.f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self.f.flush()

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
