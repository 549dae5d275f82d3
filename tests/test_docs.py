"""Every `path.py:function` (or `path.py:Class.method`) the docs name is a definition in that file, so a reader can go
from each step of the paper to its code in one click."""

import ast
import glob
import os
import re

from conftest import ROOT

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
