"""Every `path.py:function` (or `path.py:Class.method`) the docs name is a definition in that file, so a reader can go
from each step of the paper to its code in one click."""

import ast
import glob
import os
import re

from helpers import ROOT

REF = re.compile(r"`([\w/]+\.py):([A-Za-z_][\w.]*)`")


def definitions(path):
    """Dotted names of the functions and classes (and their methods) defined in a Python file."""
    names = set()

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(prefix + child.name)
                walk(child, prefix + child.name + ".")
    walk(ast.parse(open(path).read()), "")
    return names


def test_every_code_reference_in_the_docs_resolves():
    docs = glob.glob(os.path.join(ROOT, "docs", "*.md")) + [os.path.join(ROOT, "README.md")]
    refs = [(os.path.relpath(doc, ROOT), f, name) for doc in docs for f, name in REF.findall(open(doc).read())]
    assert len(refs) >= 30, "the walkthrough should reference the code"
    missing = []
    for doc, f, name in refs:
        path = os.path.join(ROOT, f)
        if not os.path.exists(path) or name not in definitions(path):
            missing.append(f"{doc}: {f}:{name}")
    assert not missing, "references to code that does not exist:\n" + "\n".join(missing)


def test_the_walkthrough_covers_every_stage_of_the_paper():
    text = open(os.path.join(ROOT, "docs", "WALKTHROUGH.md")).read()
    for stage in ("Distillation", "SFT", "Sampling", "DPO", "Evaluation", "verifier", "token-level reward",
                  "One question through the demo"):
        assert stage.lower() in text.lower(), stage


def test_every_line_the_walkthrough_quotes_is_in_the_code():
    """The quoted snippets stay true: each line of a ```python block is a line of the code (spacing and trailing
    comments aside)."""
    def norm(line):
        return " ".join(re.sub(r"(?<=\S)\s{2,}#.*$", "", line).split())
    code = set()
    for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True):
        if f"{os.sep}.venv{os.sep}" not in path:
            code.update(norm(line) for line in open(path, encoding="utf-8"))
    text = open(os.path.join(ROOT, "docs", "WALKTHROUGH.md")).read()
    quoted = [line for block in re.findall(r"```python\n(.*?)```", text, re.S) for line in block.splitlines()
              if line.strip()]
    assert len(quoted) >= 10
    missing = [line for line in quoted if norm(line) not in code]
    assert not missing, "quoted lines that are not in the code:\n" + "\n".join(missing)
