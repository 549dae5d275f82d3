"""The demo's report (OUT/results.md and the plots): the paper's Table 2 and DPO section in its layout with our
numbers, the paper's own numbers beside them (for direction, not size), and each finding tested over the seeds."""

import json
import os
import re

from demo.plots import bar_plot, line_plot

# The paper's numbers (arXiv 2410.16198), direct / CoT: Table 2 (the SFT arms on LLaVA-NeXT-8B) and Table 3 (DPO),
# as (ChartQA, the average over its 8 benchmarks); its appendix's LLaVA-NeXT-8B baseline (Table C.1; the average
# of the same 8 computed here) and its RFT table (RFT on ChartQA pairs: ChartQA only).
PAPER = {"base": {"direct": (68.6, 65.6), "cot": (52.8, 49.1)},
         "arm1": {"direct": (70.2, 65.5), "cot": (71.2, 62.7)}, "arm2": {"direct": (73.7, 71.1), "cot": (71.8, 65.6)},
         "arm3": {"direct": (71.8, 69.7), "cot": (82.2, 73.2)}, "arm4": {"direct": (76.1, 72.8), "cot": (83.0, 74.4)},
         "dpo_outcome": {"direct": (76.4, 73.0), "cot": (84.2, 75.3)},
         "rft_outcome": {"direct": (75.0, None), "cot": (83.9, None)}}
MODELS = [("base", "base model"), ("arm1", "(1) format"), ("arm2", "(2) format + direct"),
          ("arm3", "(3) format + CoT"), ("arm4", "(4) format + direct + CoT"), ("dpo_outcome", "DPO from (4)"),
          ("rft_outcome", "RFT from (4) (control)"), ("dpo_steps", "DPO, step-graded pairs"),
          ("rft_steps", "RFT, step-graded chosen")]
LABEL = dict(MODELS)
GROUPS = [("target", "larger than X (target)"), ("held-out", "smaller than X (held out)"), ("other", "other families")]
METHODS = [("cot majority", "majority vote"), ("cot best-of-n", "best-of-n, DPO reward"),
           ("cot weighted", "reward-weighted vote"), ("cot likelihood", "best-of-n, SFT likelihood (control)")]
SHORT = {"base": "base", "arm1": "(1)", "arm2": "(2)", "arm3": "(3)", "arm4": "(4)", "dpo_outcome": "DPO",
         "rft_outcome": "RFT", "dpo_steps": "DPO steps", "rft_steps": "RFT steps", "majority vote": "majority",
         "best-of-n, DPO reward": "best-of-n, DPO", "reward-weighted vote": "weighted, DPO",
         "best-of-n, SFT likelihood (control)": "best-of-n, SFT"}


def rows_of(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def format_failure(r):
    """CoT mode: no "### Answer:" marker; direct mode: a rationale instead of a short answer."""
    if r.get("error"):
        return False
    if r["mode"] == "cot":
        return not r.get("format_ok", True)
    return "###" in r.get("output", "") or re.search(r" \.(\s|$)", r.get("output", "")) is not None


def collect(work, target, held_out):
    """{model: {"scores": {(group, mode): {question id: score}}, "fails": {(group, mode): count}}}, the verifiers
    {variant: {(method, n): {id: score}, "samples": [score lists]}}, and the sampling / DPO / audit statistics."""
    models = {}
    for name, _ in MODELS:
        scores, fails = {}, {}
        for r in rows_of(f"{work}/eval/{name}/predictions.jsonl"):
            key = ({target: "target", held_out: "held-out"}.get(r.get("family"), "other"), r["mode"])
            scores.setdefault(key, {})[r["id"]] = r["score"]
            fails[key] = fails.get(key, 0) + format_failure(r)
        if scores:
            models[name] = {"scores": scores, "fails": fails}
    verifiers, stats = {}, {}
    for v in ("outcome", "steps"):
        picks = {}
        for r in rows_of(f"{work}/verify_{v}/predictions.jsonl"):
            for n, sc in (r.get("by_n") or {}).items():
                picks.setdefault((r["mode"], int(n)), {})[r["id"]] = sc
            if r.get("sample_scores"):
                picks.setdefault("samples", []).append(r["sample_scores"])
        if picks:
            verifiers[v] = picks
        qs = rows_of(f"{work}/pairs_{v}/pairs.questions.jsonl")
        if qs:
            kept = [q for q in qs if q.get("status") == "kept"]
            metrics = rows_of(f"{work}/dpo_{v}/metrics.jsonl")
            train = [m for m in metrics if "rewards/accuracy" in m]
            tail = train[-max(1, len(train) // 4):]
            audit = f"{work}/dpo_{v}/token_rewards.json"
            stats[v] = {"questions": len(qs), "kept": len(kept), "pairs": sum(q.get("pairs", 0) for q in qs),
                        "sample_acc": sum(q.get("accuracy", 0) for q in qs) / len(qs),
                        "right": sum(q.get("correct", 0) + (q.get("correct_with_wrong_steps", 0) if v == "steps"
                                                            else 0) for q in kept),
                        "right_wrong_steps": sum(q.get("correct_with_wrong_steps", 0) for q in kept),
                        "dpo_steps": train[-1]["step"] if train else 0,
                        "reward_acc": sum(m["rewards/accuracy"] for m in tail) / len(tail) if tail else None,
                        "margin": sum(m["rewards/margin"] for m in tail) / len(tail) if tail else None,
                        "audit": json.load(open(audit)) if os.path.exists(audit) else None}
    return models, verifiers, stats


def paired(pairs):
    """pairs: per seed (hi scores, lo scores) over question ids. The test is paired: the standard error is that of the
    mean per-question difference, which cancels the questions both sides get right or both get wrong."""
    per, every = [], []
    for hi, lo in pairs:
        ids = sorted(hi.keys() & lo.keys())
        d = [hi[i] - lo[i] for i in ids]
        if d:
            per.append((100 * sum(hi[i] for i in ids) / len(ids), 100 * sum(lo[i] for i in ids) / len(ids),
                        100 * mean(d), 200 * se(d), len(d)))
            every += d
    return per, (100 * mean(every), 200 * se(every), len(every)) if every else None


def mean(x):
    return sum(x) / len(x)


def se(d):
    m = mean(d)
    return (sum((v - m) ** 2 for v in d) / max(1, len(d) - 1) / len(d)) ** 0.5


def verdict(kind, pooled):
    """'>' holds when the difference is above two standard errors; '>=' unless it is below minus two."""
    diff, two_se, _ = pooled
    if kind == ">":
        ok = diff > two_se
        why = "above 2 s.e." if ok else "the opposite, beyond 2 s.e." if -diff > two_se else "within 2 s.e."
    else:
        ok = diff >= -two_se
        why = "not below by more than 2 s.e." if ok else "below by more than 2 s.e."
    return ("**holds**" if ok else "**does not hold**") + f" ({why})"


def findings(data, seeds):
    """[(claim, paper, kind, hi, lo)] checked on the target family; hi / lo: seed -> {id: score}."""
    def ev(model, mode):
        return lambda s: data[s][0].get(model, {}).get("scores", {}).get(("target", mode), {})

    def ver(v, method, n):
        return lambda s: data[s][1].get(v, {}).get((method, n), {})
    top = max([n for s in seeds for v in data[s][1].values() for k in v if k != "samples" for n in [k[1]]],
              default=16)
    claims = [
        ("(4) in direct mode >= (2) in direct mode: CoT data added to direct data does not hurt direct answers",
         "72.8 vs 71.1 (ChartQA 76.1 vs 73.7)", ">=", ev("arm4", "direct"), ev("arm2", "direct")),
        ("(4) in CoT mode > (2) in direct mode: CoT training beats direct-only training",
         "74.4 vs 71.1 (ChartQA 83.0 vs 73.7)", ">", ev("arm4", "cot"), ev("arm2", "direct")),
        ("(3): CoT > direct on the target family", "ChartQA 82.2 vs 71.8", ">", ev("arm3", "cot"),
         ev("arm3", "direct")),
        ("(4): CoT > direct on the target family", "ChartQA 83.0 vs 76.1", ">", ev("arm4", "cot"),
         ev("arm4", "direct")),
        ("DPO > (4) in CoT mode", "75.3 vs 74.4 (ChartQA 84.2 vs 83.0)", ">", ev("dpo_outcome", "cot"),
         ev("arm4", "cot")),
        (f"best-of-{top} under the DPO reward > majority vote of {top}", "Figure 6: above at every N, more as N grows",
         ">", ver("outcome", "cot best-of-n", top), ver("outcome", "cot majority", top)),
        (f"reward-weighted vote of {top} under the DPO reward > majority vote of {top}", "Figure 6: above", ">",
         ver("outcome", "cot weighted", top), ver("outcome", "cot majority", top)),
        ("beyond the paper: DPO > RFT on the same chosen answers, CoT mode", "ChartQA 84.2 vs 83.9 (RFT on ChartQA)",
         ">", ev("dpo_outcome", "cot"), ev("rft_outcome", "cot")),
        ("beyond the paper: DPO on step-graded pairs > (4) in CoT mode", "-", ">", ev("dpo_steps", "cot"),
         ev("arm4", "cot")),
        ("beyond the paper: DPO on step-graded pairs > DPO on outcome-graded pairs, CoT mode", "-", ">",
         ev("dpo_steps", "cot"), ev("dpo_outcome", "cot")),
        (f"beyond the paper: best-of-{top} under the step-graded DPO reward > majority vote of {top}", "-", ">",
         ver("steps", "cot best-of-n", top), ver("steps", "cot majority", top))]
    out = ["| finding (as the paper states it) | paper | " + " | ".join(f"seed {s}" for s in seeds) +
           " | all seeds: difference (2 s.e.) | verdict |", "|---" * (len(seeds) + 4) + "|"]
    for claim, paper, kind, hi, lo in claims:
        per, pooled = paired([(hi(s), lo(s)) for s in seeds])
        if pooled is None:
            continue                                   # not run (the main line has no arm 3, no step-graded pairs)
        cells = [f"{a:.1f} vs {b:.1f}" for a, b, _, _, _ in per]
        out.append(f"| {claim} | {paper} | " + " | ".join(cells) + f" | {pooled[0]:+.1f} ({pooled[1]:.1f}, "
                   f"{pooled[2]} questions) | {verdict(kind, pooled)} |")
    return out


def cell(per_seed):
    return f"{sum(per_seed) / len(per_seed):.1f}" if per_seed else "-"


def sft_table(data, seeds):
    head = ["| model | mode | " + " | ".join(g for _, g in GROUPS) + " | format failures (target / held out / "
            "other) | paper: ChartQA | paper: avg of 8 |", "|---" * 8 + "|"]
    out = []
    for name, label in MODELS:
        if not any(name in data[s][0] for s in seeds):
            continue
        for mode in ("direct", "cot"):
            acc = [cell([100 * mean(list(sc.values())) for s in seeds
                         for sc in [data[s][0].get(name, {}).get("scores", {}).get((g, mode))] if sc]) for g, _ in GROUPS]
            fails = " / ".join(str(sum(data[s][0].get(name, {}).get("fails", {}).get((g, mode), 0) for s in seeds))
                               for g, _ in GROUPS)
            paper = PAPER.get(name, {}).get(mode, (None, None))
            out.append(f"| {label} | {'CoT' if mode == 'cot' else mode} | " + " | ".join(acc) + f" | {fails} | " +
                       " | ".join("-" if p is None else f"{p:.1f}" for p in paper) + " |")
    return head + out


def verifier_table(data, seeds, v):
    picks = [data[s][1][v] for s in seeds if v in data[s][1]]
    if not picks:
        return [], {}
    ns = sorted({k[1] for p in picks for k in p if k != "samples"})
    out = ["| method | " + " | ".join(f"n = {n}" for n in ns) + " |", "|---" * (len(ns) + 1) + "|"]
    curves = {}
    for method, label in METHODS:
        acc = [mean([100 * mean(list(p[(method, n)].values())) for p in picks if p.get((method, n))]) for n in ns]
        curves[label] = list(zip(ns, acc))
        out.append(f"| {label} | " + " | ".join(f"{a:.1f}" for a in acc) + " |")
    one = [mean([100 * mean([mean(sc[:n]) for sc in p["samples"]]) for p in picks]) for n in ns]
    some = [mean([100 * mean([max(sc[:n]) for sc in p["samples"]]) for p in picks]) for n in ns]
    out.append("| one sample (mean accuracy) | " + " | ".join(f"{a:.1f}" for a in one) + " |")
    out.append("| some sample right (what any picker can reach) | " + " | ".join(f"{a:.1f}" for a in some) + " |")
    return out, curves


def report(works, out_dir, target, held_out, seconds=None, setup=""):
    seeds = list(works)
    data = {s: collect(w, target, held_out) for s, w in works.items()}
    n = next((m["scores"] for s in seeds for m in data[s][0].values()), {})
    md = ["# Demo results: the paper's SFT table and DPO section in miniature", "",
          f"Seeds {', '.join(map(str, seeds))}; accuracy %, greedy, the mean over the seeds. Questions per seed: " +
          ", ".join(f"{g} {len(n.get((k, 'direct'), {}))}" for k, g in GROUPS) + ". The paper's numbers (ChartQA, "
          "and the average of its 8 benchmarks) are beside ours for the direction of each effect, not its size. "
          "Format failures are counted over all seeds. " + setup,
          "", "## SFT arms (the paper's Table 2) and DPO (its Table 3)", ""] + sft_table(data, seeds)
    md += ["", "## Findings", "",
           "Each finding is tested on the target family, paired over the same questions (two standard errors of the "
           "mean per-question difference, pooled over the seeds): a `>` finding holds when the difference is above "
           "two standard errors; a `>=` finding holds unless it is below minus two.", ""] + findings(data, seeds)
    curves_all = {}
    for v, title in (("outcome", "DPO as a verifier (the paper's Figure 6), outcome-graded pairs"),
                     ("steps", "DPO as a verifier, step-graded pairs")):
        table, curves = verifier_table(data, seeds, v)
        if table:
            md += ["", f"## {title}", "", "Accuracy (%) on the target family of the answer picked from the first n of "
                   f"{max(p[0] for p in next(iter(curves.values())))} CoT samples of (4) at T = 1 (the same samples for "
                   "every method).", ""] + table
            curves_all[v] = curves
    md += ["", "## Pairs, DPO training, token rewards", "",
           "| seed | grading | questions in the window / sampled | mean sample accuracy (as graded) | pairs | right answers with a "
           "wrong step | DPO steps | reward accuracy, margin (last quarter) | rejected chains whose most negative "
           "token is at or right after the first error (chance) |", "|---" * 9 + "|"]
    for s in seeds:
        for v, st in data[s][2].items():
            a = st["audit"] or {}
            share = f"{a['min_at_first_error']} of {a['rejected_checked']} ({100 * a['share']:.0f}%; " \
                    f"{100 * a['chance']:.0f}%)" if a.get("rejected_checked") else "-"
            train = f"{st['reward_acc']:.2f}, {st['margin']:.3f}" if st["reward_acc"] is not None else "-"
            md.append(f"| {s} | {v}-graded | {st['kept']} / {st['questions']} | {100 * st['sample_acc']:.1f} | "
                      f"{st['pairs']} | {st['right_wrong_steps']} of {st['right']} | {st['dpo_steps']} | {train} | "
                      f"{share} |")
    timings = {}
    for s, w in works.items():
        path = os.path.join(w, "timings.json")
        old = json.load(open(path)) if os.path.exists(path) else {}
        old.update({k.split("/", 1)[1]: round(v) for k, v in (seconds or {}).items()
                    if k.startswith(os.path.basename(w) + "/")})
        with open(path, "w") as f:
            json.dump(old, f, indent=1)
        timings[s] = old
    if any(timings.values()):
        md += ["", "Job seconds (each job one core; in the main line sampling and the verifier take two): " + "; ".join(
            f"seed {s}: " + ", ".join(f"{k} {v}" for k, v in t.items()) for s, t in timings.items() if t)]
    text = "\n".join(md) + "\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    plots(data, seeds, curves_all, works, out_dir)
    return text


def plots(data, seeds, curves, works, out_dir):
    groups = {}
    for name, label in MODELS:
        for mode in ("direct", "cot"):
            acc = [mean(list(sc.values())) for s in seeds
                   for sc in [data[s][0].get(name, {}).get("scores", {}).get(("target", mode))] if sc]
            if acc:
                groups.setdefault(SHORT[name], {})["CoT" if mode == "cot" else "direct"] = mean(acc)
    bar_plot(groups, os.path.join(out_dir, "accuracy.png"), title="accuracy on 'larger than X' (target) by model "
             "and mode, mean over seeds: arms (1)-(4) of the paper's Table 2, then DPO and RFT from (4)", W=900)
    for v, series in curves.items():
        ns = sorted({n for pts in series.values() for n, _ in pts})
        log = {SHORT[label]: [(ns.index(n), a / 100) for n, a in pts] for label, pts in series.items()}
        line_plot(log, os.path.join(out_dir, "verifier.png" if v == "outcome" else f"verifier_{v}.png"),
                  title=f"DPO as a verifier ({v}-graded pairs): accuracy on the target family vs n samples",
                  xlabel="n", xticks=[(i, str(n)) for i, n in enumerate(ns)], ylim=(0.5, 1.0), dots=True, W=760)
    for s in seeds:
        sft, dpo = {}, {}
        for name, label in MODELS[1:5]:
            rows = [r for r in rows_of(f"{works[s]}/{name}/metrics.jsonl") if "loss" in r]
            if rows:
                sft[f"{SHORT[name]} {label.split(' ', 1)[1]}"] = [(r["step"], r["loss"]) for r in rows]
        for key, label in (("loss", "DPO loss"), ("rewards/accuracy", "reward accuracy")):
            rows = [r for r in rows_of(f"{works[s]}/dpo_outcome/metrics.jsonl") if key in r]
            if rows:
                dpo[label] = [(r["step"], r[key]) for r in rows]
        if sft:
            line_plot(sft, os.path.join(out_dir, f"sft_seed{s}.png"), title=f"SFT training loss (seed {s})", W=900)
        if dpo:
            line_plot(dpo, os.path.join(out_dir, f"dpo_seed{s}.png"), title=f"DPO from (4): loss and reward accuracy "
                      f"(seed {s})")
