"""The repository stands alone: no file cites documents outside it, and the optional plotting extra stays optional."""

import os
import re
import sys

from helpers import ROOT

TEXT = (".py", ".md", ".txt", ".ini", ".sh", ".cfg", ".toml", ".json", ".jinja")
OUTSIDE = re.compile(r"\.\./shared|\b(?:DESIGN|STYLE)\.md\b|\breference/[\w-]+\.md\b")


def project_files():
    """Every text file of the working tree, outside the virtualenv, run outputs and caches."""
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "out", "__pycache__", "base_model")]
        for f in files:
            if f.endswith(TEXT) or f == "Makefile":
                yield os.path.join(top, f)


def test_no_file_cites_documents_outside_the_repository():
    """Code, help texts, docstrings, README and Makefile name no document that a clone lacks: neither the design
    notes kept beside the repository nor any *.md file that is not in it."""
    here = os.path.abspath(__file__)
    names = {os.path.basename(p) for p in project_files()}
    bad = []
    for path in project_files():
        if os.path.abspath(path) == here:
            continue
        for n, line in enumerate(open(path, encoding="utf-8", errors="replace"), 1):
            where = f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()[:100]}"
            if OUTSIDE.search(line):
                bad.append(where)
            for doc in re.findall(r"[\w./-]*\w\.md\b", line):
                if os.path.basename(doc) not in names:
                    bad.append(where)
    assert not bad, "citations of files outside the repository:\n" + "\n".join(bad)


def test_matplotlib_is_an_optional_extra_that_make_demo_installs(tmp_path, monkeypatch, capsys):
    """matplotlib draws the loss curves only: it is pinned in requirements-plot.txt (not in the run-time
    requirements), `make demo` installs it, and without it the curve is skipped with a note."""
    extra = open(os.path.join(ROOT, "requirements-plot.txt")).read()
    assert re.search(r"^matplotlib==[\d.]+$", extra, re.M)
    assert "matplotlib" not in open(os.path.join(ROOT, "requirements.txt")).read()
    make = open(os.path.join(ROOT, "Makefile")).read()
    demo = re.search(r"^demo:(.*)$", make, re.M).group(1)
    stamp = next(t for t in demo.split() if "plot" in t)
    assert re.search(rf"^{re.escape(stamp)}:.*\n(?:\t.*\n)*\t.*requirements-plot\.txt", make, re.M)
    from common.dist import Dist
    from common.metrics import Metrics
    monkeypatch.setitem(sys.modules, "matplotlib", None)           # as if not installed
    m = Metrics(str(tmp_path / "metrics.jsonl"), Dist())
    m.log({"step": 1, "loss": 1.0})
    m.close()
    assert m.plot(str(tmp_path / "loss.png")) is None and not (tmp_path / "loss.png").exists()
    assert "requirements-plot.txt" in capsys.readouterr().err
