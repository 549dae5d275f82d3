"""What only some tasks can tell, behind one face for the stages: the built-in synthetic chart task's records carry
their chart's data (record["meta"]), so a rationale's every step can be checked against it, and an offline teacher
can write rationales from it. The stages ask here, never the task's module itself; a record of any other dataset is
simply not checkable.
"""

from data import synthetic


def checkable(rec):
    """A record whose rationale steps can be checked: the synthetic task's, with its chart's data."""
    return rec.get("dataset") == "synthetic" and "chart" in (rec.get("meta") or {})


def steps_correct(rec, text):
    """True when every step of the rationale checks against the record's chart (see data/synthetic.py)."""
    return synthetic.steps_correct(rec, text)


def first_error_span(meta, text):
    """The (start, end) characters of a rationale's first wrong step against the chart in `meta`, or None."""
    return synthetic.first_wrong_step({"meta": meta}, text)


def offline_teacher(rec, rng, error_rate=0.0):
    """A rationale ending in "### Answer: X", written from the record's chart data (distill.py --teacher synthetic):
    no network. With probability error_rate it misreads a value, as a real teacher's slip would."""
    return synthetic.teacher(rec, rng, error_rate)
