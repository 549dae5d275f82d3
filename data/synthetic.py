"""The embedded default task: procedurally drawn charts with questions, gold answers and an offline teacher.

    python -m data.synthetic --out DIR --n N --seed S [--level tiny|easy|medium|hard] [--families ...]
                             [--holdout count_below] [--n-test M]

writes DIR/train.jsonl, DIR/test.jsonl (same question families, new charts), DIR/test_holdout.jsonl (the held-out
family, never in train: it measures generalisation) and DIR/images/. Records are QA records (data/formats.py) with
dataset "synthetic" and a "meta" field holding the chart's data, so every gold answer (and every step of a
rationale) can be recomputed. Deterministic: record i of a split depends on (seed, split, i) only.

Difficulty levels ("tiny" is sized, by experiment, for a 2M-parameter model trained in minutes on a CPU):
  tiny    64x64, 4 bars on a 16 px grid (one bar per CLIP patch column), values 0-9 by height and colour, A-D
  easy    bar charts of 3-5 named bars, values 0-20 printed above the bars, varied sizes
  medium  bar, grouped bar, line and pie charts, 3-6 items, values 0-100 printed, varied sizes and colours
  hard    as medium with 3-8 items, values up to 1000 with decimals, printed on only half the charts
Question families: caption (every value), lookup, max_label, min_label, compare, and multi-step ones whose single
step is easy but whose one-shot answer is hard: count_above, count_below, sum, diff, average, ratio, chain.
"""

import json
import math
import os
import random
import re

from PIL import Image, ImageDraw, ImageFont

from common.cli import ArgumentParser, cli, number
from data.prompts import ANSWER_MARKER, LETTERS

LEVELS = {
    "tiny": dict(kinds=("bar",), items=(4, 4), vmax=9, decimals=0, printed=0.0, mc=0.0, size=None),
    "easy": dict(kinds=("bar",), items=(3, 5), vmax=20, decimals=0, printed=1.0, mc=0.3, size=((160, 320), (120, 240))),
    "medium": dict(kinds=("bar", "grouped", "line", "pie"), items=(3, 6), vmax=100, decimals=0, printed=1.0, mc=0.3,
                   size=((240, 480), (180, 360))),
    "hard": dict(kinds=("bar", "grouped", "line", "pie"), items=(3, 8), vmax=1000, decimals=1, printed=0.5, mc=0.3,
                 size=((280, 640), (200, 480))),
}
FAMILIES = ["caption", "lookup", "max_label", "min_label", "compare", "count_above", "count_below", "sum", "diff",
            "average", "ratio", "chain"]
MULTI_STEP = {"count_above", "count_below", "sum", "diff", "average", "ratio", "chain"}
WORDS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "orange", "peach", "pear", "plum", "kiwi",
         "oak", "pine", "maple", "birch", "cedar", "elm", "tin", "iron", "gold", "zinc", "lead", "copper"]
SERIES = ["2019", "2020", "2021", "2022", "north", "south"]
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def fmt(v):
    """Numbers as the task writes them: integers bare, others to at most 2 decimals."""
    v = round(float(v), 2)
    if not math.isfinite(v):
        return "inf"                                      # a teacher's misread divisor of 0
    return str(int(v)) if v == int(v) else f"{v:.2f}".rstrip("0").rstrip(".")


# ------------------------------------------------------------------------------------------------ charts

def make_chart(rng, level):
    cfg = LEVELS[level]
    kind = rng.choice(cfg["kinds"])
    n = rng.randint(*cfg["items"])
    if level == "tiny":
        labels = list("ABCD")
    else:
        labels = rng.sample(WORDS, n)
    series = rng.sample(SERIES[:4] if rng.random() < 0.5 else SERIES[4:], 2) if kind == "grouped" else None
    count = n * (2 if series else 1)
    if kind == "pie":                                     # percentages summing to 100, all distinct
        while True:
            cuts = sorted(rng.sample(range(1, 100), n - 1))
            values = [b - a for a, b in zip([0] + cuts, cuts + [100])]
            if len(set(values)) == n:
                break
    else:
        while True:                                       # distinct values: every max/min/compare has one answer
            if cfg["decimals"] and rng.random() < 0.5:
                values = [round(rng.uniform(0, cfg["vmax"]), cfg["decimals"]) for _ in range(count)]
            else:
                values = [rng.randint(0, cfg["vmax"]) for _ in range(count)]
            if len(set(values)) == count:
                break
    names = [f"{lab} in {s}" for s in series for lab in labels] if series else labels
    return dict(kind=kind, labels=labels, series=series, names=names, values=values,
                printed=rng.random() < cfg["printed"], noun={"bar": "bar", "grouped": "bar", "line": "point",
                                                                "pie": "slice"}[kind])


def draw_chart(chart, rng, level):
    if level == "tiny":
        return draw_tiny(chart, rng)
    cfg = LEVELS[level]
    W = rng.randrange(*cfg["size"][0], 8)
    H = rng.randrange(*cfg["size"][1], 8)
    bg = rng.choice([(255, 255, 255), (250, 250, 245), (245, 248, 252)])
    img = Image.new("RGB", (W, H), bg)
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=rng.randint(10, 14))
    colors = rng.sample(PALETTE, len(PALETTE))
    if chart["kind"] == "pie":
        draw_pie(d, chart, W, H, font, colors)
        return img
    left, right, top, bottom = 36, W - 10, 22 if chart["series"] else 12, H - 24
    vmax = max(chart["values"]) or 1
    top_val = vmax * 1.15
    d.line([(left, top), (left, bottom), (right, bottom)], fill=(60, 60, 60))
    for k in range(5):                                    # y axis ticks and light grid
        y = bottom - (bottom - top) * k / 4
        d.line([(left + 1, y), (right, y)], fill=(225, 225, 225))
        d.text((2, y - 6), fmt(round(top_val * k / 4, 1 if top_val < 20 else 0)), fill=(80, 80, 80), font=font)

    def ypos(v):
        return bottom - (bottom - top) * v / top_val

    n = len(chart["labels"])
    slot = (right - left) / n
    if chart["kind"] == "line":
        pts = [(left + slot * (i + 0.5), ypos(v)) for i, v in enumerate(chart["values"])]
        d.line(pts, fill=colors[0], width=2)
        for (x, y), v in zip(pts, chart["values"]):
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colors[0])
            if chart["printed"]:
                d.text((x - 8, y - 16), fmt(v), fill=(0, 0, 0), font=font)
    else:
        groups = len(chart["series"] or [None])
        width = slot * 0.7 / groups
        for g in range(groups):
            for i in range(n):
                v = chart["values"][g * n + i]
                x0 = left + slot * i + slot * 0.15 + g * width
                if ypos(v) < bottom - 1:                  # a zero bar is no bar
                    d.rectangle([x0, ypos(v), x0 + width - 1, bottom - 1], fill=colors[g])
                if chart["printed"]:
                    d.text((x0, ypos(v) - 13), fmt(v), fill=(0, 0, 0), font=font)
        if chart["series"]:                               # legend
            for g, s in enumerate(chart["series"]):
                d.rectangle([left + 70 * g, 4, left + 70 * g + 9, 13], fill=colors[g])
                d.text((left + 70 * g + 12, 2), s, fill=(0, 0, 0), font=font)
    for i, lab in enumerate(chart["labels"]):
        d.text((left + slot * i + 2, bottom + 4), lab, fill=(0, 0, 0), font=font)
    return img


def draw_pie(d, chart, W, H, font, colors):
    r = min(W, H) * 0.32
    cx, cy = W * 0.5, H * 0.5
    start = -90.0
    for i, (lab, v) in enumerate(zip(chart["labels"], chart["values"])):
        end = start + 360 * v / 100
        d.pieslice([cx - r, cy - r, cx + r, cy + r], start, end, fill=colors[i % len(colors)])
        mid = math.radians((start + end) / 2)
        text = f"{lab} {fmt(v)}%" if chart["printed"] else lab
        tx, ty = cx + (r + 6) * math.cos(mid), cy + (r + 6) * math.sin(mid)
        if math.cos(mid) < 0:                              # labels on the left end at the slice
            tx -= d.textlength(text, font=font)
        d.text((max(2, tx), ty - 6), text, fill=(0, 0, 0), font=font)
        start = end


def draw_tiny(chart, rng):
    """64x64: bar i fills columns 16i+3 .. 16i+12 (inside CLIP's 16 px patch column i), 5 px per unit, in the colour
    of its value (one of 10): a value a 2-layer vision tower reads in minutes (in our CPU experiments heights alone
    were hard to read; with colour the demo's base model reads all four values of a test chart exactly 100% of the
    time, against 63% from heights alone in an earlier build)."""
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for y in range(54, 8, -5):
        d.line([(0, y), (63, y)], fill=(232, 232, 232))
    font = ImageFont.load_default(size=9)
    for i, (lab, v) in enumerate(zip(chart["labels"], chart["values"])):
        if v:
            d.rectangle([16 * i + 3, 54 - 5 * v, 16 * i + 12, 53], fill=PALETTE[int(v)])
        d.text((16 * i + 5, 54), lab, fill=(0, 0, 0), font=font)
    return img


# ------------------------------------------------------------------------------------------------ questions

def ask(family, chart, rng):
    """(question, params) for a family on a chart."""
    names, noun = chart["names"], chart["noun"]
    vals = chart["values"]
    if family == "caption":
        return f"List the value of every {noun}.", {}
    if family == "lookup":
        return f"What is the value of {(p := rng.choice(names))}?", {"a": p}
    if family in ("max_label", "min_label"):
        word = "largest" if family == "max_label" else "smallest"
        return f"Which {noun} has the {word} value?", {}
    if family == "compare":
        a, b = rng.sample(names, 2)
        return f"Is {a} larger than {b}?", {"a": a, "b": b}
    if family in ("count_above", "count_below"):
        lo, hi = min(vals), max(vals)
        x = rng.randint(int(lo), int(hi)) if hi > lo else int(lo)
        word = "larger" if family == "count_above" else "smaller"
        return f"How many {noun}s are {word} than {fmt(x)}?", {"x": x}
    if family == "sum":
        k = rng.randint(3, len(names)) if len(names) > 3 else len(names)
        chosen = set(rng.sample(names, k))
        picked = [nm for nm in names if nm in chosen]            # in chart order
        if k == len(names):
            return f"What is the sum of all {noun} values?", {"items": picked}
        return f"What is the sum of {', '.join(picked[:-1])} and {picked[-1]}?", {"items": picked}
    if family == "diff":
        return "What is the difference between the largest and the smallest value?", {}
    if family == "average":
        return f"What is the average of all {noun} values?", {}
    if family == "ratio":
        a, b = rng.sample([nm for nm, v in zip(names, vals) if v != 0], 2)
        return f"What is the ratio of {a} to {b}?", {"a": a, "b": b}
    if family == "chain":
        a, b, c = rng.sample(names, 3)
        return f"Is {a} larger than {b}, and {b} larger than {c}?", {"a": a, "b": b, "c": c}
    raise ValueError(f"unknown question family {family!r}; known: {FAMILIES}")


def solve(family, chart, params, values):
    """(steps, answer) computed from `values` (the chart's, or misread ones for a teacher error)."""
    names = chart["names"]
    val = dict(zip(names, values))
    read = [f"{nm} is {fmt(v)} ." for nm, v in zip(names, values)]
    if family == "caption":
        # the short answer reads each bar as the rationales do ("A is 6"), so one skill serves both
        return read, ", ".join(f"{nm} is {fmt(v)}" for nm, v in zip(names, values))
    if family == "lookup":
        return [f"{params['a']} is {fmt(val[params['a']])} ."], fmt(val[params["a"]])
    if family in ("max_label", "min_label"):
        pick = max if family == "max_label" else min
        best = pick(names, key=lambda nm: val[nm])
        word = "largest" if family == "max_label" else "smallest"
        return read + [f"The {word} is {best} with {fmt(val[best])} ."], best
    if family == "compare":
        a, b = params["a"], params["b"]
        yes = "yes" if val[a] > val[b] else "no"
        return [f"{a} is {fmt(val[a])} .", f"{b} is {fmt(val[b])} .", f"{fmt(val[a])} > {fmt(val[b])} {yes} ."], yes
    if family in ("count_above", "count_below"):
        x, op = params["x"], ">" if family == "count_above" else "<"
        steps, c = [], 0
        for nm in names:                                  # the threshold and a running count in every step
            hit = val[nm] > x if op == ">" else val[nm] < x
            c += hit
            steps.append(f"{nm} is {fmt(val[nm])} {op} {fmt(x)} {'yes' if hit else 'no'} {c} .")
        return steps, str(c)
    if family in ("sum", "average"):
        items = params.get("items", names)
        steps = [f"{nm} is {fmt(val[nm])} ." for nm in items]
        total = val[items[0]]
        for nm in items[1:]:
            steps.append(f"{fmt(total)} + {fmt(val[nm])} = {fmt(total + val[nm])} .")
            total += val[nm]
        if family == "sum":
            return steps, fmt(total)
        avg = total / len(items)
        return steps + [f"{fmt(total)} / {len(items)} = {fmt(avg)} ."], fmt(avg)
    if family == "diff":
        hi, lo = max(values), min(values)
        return read + [f"The largest is {fmt(hi)} . The smallest is {fmt(lo)} .", f"{fmt(hi)} - {fmt(lo)} = "
                       f"{fmt(hi - lo)} ."], fmt(hi - lo)
    if family == "ratio":
        a, b = params["a"], params["b"]
        r = val[a] / val[b] if val[b] else float("inf")
        return [f"{a} is {fmt(val[a])} .", f"{b} is {fmt(val[b])} .", f"{fmt(val[a])} / {fmt(val[b])} = {fmt(r)} ."], \
            fmt(r)
    if family == "chain":
        a, b, c = params["a"], params["b"], params["c"]
        one, two = val[a] > val[b], val[b] > val[c]
        yn = {True: "yes", False: "no"}
        return [f"{a} is {fmt(val[a])} .", f"{b} is {fmt(val[b])} .", f"{c} is {fmt(val[c])} .",
                f"{fmt(val[a])} > {fmt(val[b])} {yn[one]} .", f"{fmt(val[b])} > {fmt(val[c])} {yn[two]} .",
                f"{yn[one]} and {yn[two]} = {yn[one and two]} ."], yn[one and two]
    raise ValueError(family)


def make_record(seed, split, i, level, families, image_dir):
    rng = random.Random(f"{seed}/{split}/{i}")
    family = families[i % len(families)]                  # families in turn: every split balanced
    while True:
        chart = make_chart(rng, level)
        if family == "ratio" and sum(v != 0 for v in chart["values"]) < 2:
            continue
        if family == "chain" and len(chart["names"]) < 3:
            continue
        break
    question, params = ask(family, chart, rng)
    _, answer = solve(family, chart, params, chart["values"])
    choices = None
    if family in ("max_label", "min_label", "lookup", "sum") and rng.random() < LEVELS[level]["mc"]:
        if family in ("max_label", "min_label"):
            opts = rng.sample(chart["names"], min(4, len(chart["names"])))
            if answer not in opts:
                opts[rng.randrange(len(opts))] = answer
        else:                                             # numeric distractors near the answer
            g = float(answer)
            step = max(1, round(abs(g) * 0.1))
            near = [fmt(g + k * step) for k in range(-6, 7) if k and g + k * step >= 0]
            opts = rng.sample(near, 3) + [answer]
            rng.shuffle(opts)
        choices = opts
        answer = LETTERS[opts.index(answer)]
    rid = f"synthetic-{split}-{i:06d}"
    rel = f"images/{split}/{rid}.png"
    img = draw_chart(chart, rng, level)
    img.save(os.path.join(image_dir, split, f"{rid}.png"))
    chart = {k: chart[k] for k in ("kind", "labels", "series", "names", "values", "printed")}
    return {"id": rid, "image": rel, "question": question, "answers": [answer], "choices": choices,
            "dataset": "synthetic", "meta": {"family": family, "params": params, "chart": chart, "level": level}}


# ------------------------------------------------------------------------------------------------ the teacher

def teacher(record, rng, error_rate=0.0):
    """A rationale computed from the chart's data, step by step, ending in "### Answer: X".

    With probability error_rate one value the question uses is misread (off by 5-15% of the largest value) and
    everything after follows from the misreading, as a real teacher's slip would: the final answer is then usually
    wrong, and the answer filter has work."""
    meta = record["meta"]
    chart, family, params = meta["chart"], meta["family"], meta["params"]
    values = list(chart["values"])
    if error_rate and rng.random() < error_rate:
        used = [params[k] for k in ("a", "b", "c") if k in params] + params.get("items", [])
        k = chart["names"].index(rng.choice(used)) if used else rng.randrange(len(values))
        unit = max(1, round(max(values) * 0.05))          # a slip of 1-3 units of 5% of the axis
        values[k] = max(0, values[k] + rng.choice([-1, 1]) * rng.randint(1, 3) * unit)
    steps, answer = solve(family, chart, params, values)
    if record.get("choices"):
        choices = record["choices"]
        letter = LETTERS[choices.index(answer)] if answer in choices else "A"
        answer = f"{letter}. {choices[LETTERS.index(letter)]}"
    return " ".join(steps) + f"\n\n{ANSWER_MARKER} {answer}"


_NUM = r"-?\d+(?:\.\d+)?"                               # a sampled chain may hold "." or "1.2.3" where a number goes
_READ = re.compile(rf"^(\w[\w ]*?) is ({_NUM}) ")
_ARITH = re.compile(rf"({_NUM}) ([-+/]) ({_NUM}) = ({_NUM}|inf) \.")
_COMPARE = re.compile(rf"({_NUM}) ([<>]) ({_NUM}) (yes|no)(?: ({_NUM}))?")
_MARKER = re.compile(r"#+\s*answer\s*:", re.IGNORECASE)      # decoded word-level text reads "### Answer : 2"
_STEP_END = re.compile(r" \.(?=\s|$)")


def chain_steps(text):
    """[(start, end)]: the character spans of a rationale's steps, the pieces before the answer marker that end in
    " ." ("A is 6 > 4 yes 1 ."), each with its closing period; a last piece without one is a step too."""
    m = _MARKER.search(text)
    body_end = m.start() if m else len(text)
    spans, start = [], 0
    for sep in _STEP_END.finditer(text, 0, body_end):
        spans.append((start, sep.end()))
        start = sep.end()
    if text[start:body_end].strip():
        spans.append((start, body_end))
    return [(a + len(text[a:b]) - len(text[a:b].lstrip()), b) for a, b in spans]


def first_wrong_step(record, text):
    """The (start, end) character span of the first step of a rationale that does not check against the chart, or
    None when every step checks. A step is wrong when a value it reads differs from the chart's, when its arithmetic
    or its comparison is false, or, in the counting families (count_above / count_below), when it compares with
    another threshold or in the other direction, compares no bar or a bar out of order, or carries a running count
    that does not follow from the chain's own yes / no. A counting chain that stops before its last bar is wrong at
    its end (the span (n, n) where its body ends). Sampled text of any shape is read without raising: what does not
    parse as a step is not checked."""
    meta = record["meta"]
    chart, family, params = meta["chart"], meta.get("family"), meta.get("params") or {}
    val = {nm: v for nm, v in zip(chart["names"], chart["values"])}
    counting = family in ("count_above", "count_below")
    op = ">" if family == "count_above" else "<"
    spans, seen, count = chain_steps(text), 0, 0
    for a, b in spans:
        step = text[a:b]
        read = _READ.match(step)
        if read:
            name = read.group(1).strip()
            if name in val and abs(float(read.group(2)) - round(float(val[name]), 2)) > 1e-6:
                return a, b
        for x, o, y, c in _ARITH.findall(step):
            x, y = float(x), float(y)
            want = x + y if o == "+" else x - y if o == "-" else (x / y if y else float("inf"))
            if c == "inf" or abs(round(want, 2) - float(c)) > 1e-6:
                return a, b
        compares = _COMPARE.findall(step)
        if counting and not compares:                     # every step of a counting chain compares one bar
            return a, b
        for x, o, y, yn, running in compares:
            if (float(x) > float(y) if o == ">" else float(x) < float(y)) != (yn == "yes"):
                return a, b
            if counting:
                name = read.group(1).strip() if read else None
                if o != op or abs(float(y) - float(params.get("x", y))) > 1e-6 or \
                        seen >= len(chart["names"]) or name != chart["names"][seen]:
                    return a, b
                seen += 1
                count += yn == "yes"
                if running and abs(float(running) - count) > 1e-6:
                    return a, b
    if counting and spans and seen < len(chart["names"]):
        end = spans[-1][1]
        return end, end
    return None


def steps_correct(record, text):
    """True when every step of a rationale checks against the chart (first_wrong_step finds none): outcome-correct
    samples can still hold wrong steps: in our CPU experiments 7-62% of the in-window "correct" samples did, the
    more the weaker the SFT model (the paper's own caveat: wrong chains sometimes reach the right answer)."""
    return first_wrong_step(record, text) is None


# ------------------------------------------------------------------------------------------------ command line

def generate(out, n, seed, level="easy", families=None, holdout="count_below", n_test=None):
    families = families or FAMILIES
    unknown = set(families + ([holdout] if holdout else [])) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown question families {sorted(unknown)}; known: {FAMILIES}")
    train_families = [f for f in families if f != holdout]
    n_test = n_test if n_test is not None else max(100, n // 10)
    splits = {"train": (n, train_families), "test": (n_test, train_families)}
    if holdout:
        splits["test_holdout"] = (n_test, [holdout])
    image_dir = os.path.join(out, "images")
    for split, (count, fams) in splits.items():
        os.makedirs(os.path.join(image_dir, split), exist_ok=True)
        with open(os.path.join(out, f"{split}.jsonl"), "w") as f:
            for i in range(count):
                f.write(json.dumps(make_record(seed, split, i, level, fams, image_dir)) + "\n")
    return {split: count for split, (count, _) in splits.items()}


def main():
    ap = ArgumentParser(__doc__)
    ap.add_argument("--out", required=True, help="output directory (records + images)")
    ap.add_argument("--n", type=number(int, lo=1), required=True, help="number of training records")
    ap.add_argument("--seed", type=int, default=0, help="everything follows from it")
    ap.add_argument("--level", default="easy", choices=list(LEVELS), help="chart difficulty")
    ap.add_argument("--families", nargs="+", default=None, help=f"question families (default: all of {FAMILIES})")
    ap.add_argument("--holdout", default="count_below", help="family kept out of train (test_holdout.jsonl); "
                                                             "'' for none")
    ap.add_argument("--n-test", type=number(int, lo=1), default=None,
                    help="records per test split (default max(100, n/10))")
    args = ap.parse_args()
    counts = generate(args.out, args.n, args.seed, args.level, args.families, args.holdout or None, args.n_test)
    print(f"wrote {args.out}: " + ", ".join(f"{k}.jsonl {v}" for k, v in counts.items()))


if __name__ == "__main__":
    cli(main)
