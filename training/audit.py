"""The token-level reward page of a DPO run (train_dpo.py --audit-pairs N): where the implicit reward
beta * (log pi - log pi_ref) falls in each response, and, for the synthetic task's pairs, whether a rejected chain's
most negative token sits at its first error (the paper's observation: the reward concentrates there)."""

import html
import json
import os
import re

import torch

from data.tasks import first_error_span
from training.loop import autocast, pair_logps


def error_window(meta, toks, processor):
    """The token indexes of a rejected chain's first error, and the one token right after it: the first wrong step
    of its rationale (data.tasks.first_error_span), or its answer when every step checks. None when neither is
    found. toks: the response's token ids as DPO trained on them; each token's characters come from decoding the
    prefixes, so the window is found in the very text the tokens spell."""
    text = processor.decode(toks, skip_special_tokens=False)
    span = first_error_span(meta, text)
    if span is None:
        marker = re.search(r"#+\s*answer\s*:", text, re.IGNORECASE)
        if marker is None:
            return None
        span = (marker.start(), len(text))
    ends = [len(processor.decode(toks[:j + 1], skip_special_tokens=False)) for j in range(len(toks))]
    starts = [e - len(processor.decode(toks[j:j + 1], skip_special_tokens=False)) for j, e in enumerate(ends)]
    inside = [j for j in range(len(toks)) if starts[j] < span[1] and ends[j] > span[0]]
    after = next((j for j in range(len(toks)) if starts[j] >= span[1]), None)
    window = inside + ([after] if after is not None and after not in inside else [])
    return window or None


def audit(policy, reference, dataset, collate, args, d, compute, processor, shown=12):
    """OUT/token_rewards.html: the implicit reward beta * (log pi - log ref) of every response token of the first
    --audit-pairs pairs (the first `shown` of them drawn, green above 0, red below). The paper finds a wrong chain's
    reward concentrating on its first error; for pairs carrying the synthetic chart's data (sample.py writes it) the
    page counts the rejected chains whose most negative token lies at or right after their first error
    (error_window), against the share a token drawn at random would hit. OUT/token_rewards.json keeps the counts."""
    policy.eval()
    pages, hits, chance, checked = [], 0, 0.0, 0
    n = min(args.audit_pairs, len(dataset))
    for b in range(0, n, 16):
        mb = collate([dataset[i] for i in range(b, min(n, b + 16))])
        if mb["n"] == 0:
            continue
        with torch.no_grad(), autocast(d, compute):
            to, lp_pol = pair_logps(policy, mb, d)
            _, lp_ref = pair_logps(reference, mb, d)
        rewards, tgt = (args.beta * (lp_pol - lp_ref)).float().cpu(), to["targets"].cpu()
        metas = {key: p.get("meta") for p, key in dataset.pairs[b:b + 16]}
        for k, pid in enumerate(mb["ids"]):
            sides = []
            for row, side in ((k, "chosen"), (mb["n"] + k, "rejected")):
                if "cu_seqlens" in to:
                    lo, hi = to["cu_seqlens"][row].item(), to["cu_seqlens"][row + 1].item()
                    t, r = tgt[0, lo:hi], rewards[0, lo:hi]
                else:
                    t, r = tgt[row], rewards[row]
                keep = t != -100
                sides.append((side, t[keep].tolist(), r[keep].tolist()))
            _, toks, rs = sides[1]
            window = error_window(metas[pid], toks, processor) if metas.get(pid) and toks else None
            if window is not None:
                checked += 1
                hits += min(range(len(rs)), key=rs.__getitem__) in window
                chance += len(window) / len(toks)
            if len(pages) < shown:
                pages.append((pid, sides, window))
    summary = {"pairs": n, "rejected_checked": checked, "min_at_first_error": hits,
               "share": hits / checked if checked else None, "chance": chance / checked if checked else None}
    if d.main:
        scale = max((abs(x) for _, sides, _ in pages for _, _, rs in sides for x in rs), default=1.0) or 1.0
        out = ["<html><head><meta charset='utf-8'><title>token rewards</title><style>body{font-family:sans-serif;"
               "max-width:60em} .t{white-space:pre-wrap;border-radius:3px} .e{border-bottom:2px solid black}"
               "</style></head><body>",
               f"<h2>Implicit reward per token, beta * (log pi - log ref), beta = {args.beta}</h2>"]
        if checked:
            out.append(f"<p>Of {checked} rejected chains with the chart's data (of the first {n} pairs), "
                       f"<b>{hits} ({100 * hits / checked:.0f}%)</b> have their most negative token at or right after "
                       f"their first error (the first wrong step, or the answer when every step checks; underlined "
                       f"below); a token drawn at random would land there {100 * chance / checked:.0f}% of the "
                       f"time.</p>")
        for pid, sides, window in pages:
            out.append(f"<h3>{html.escape(pid)}</h3>")
            for side, toks, rs in sides:
                spans = []
                for j, (t, r) in enumerate(zip(toks, rs)):
                    a = min(1.0, abs(r) / scale)
                    color = f"rgba(0,160,0,{a:.2f})" if r > 0 else f"rgba(220,0,0,{a:.2f})"
                    mark = " e" if side == "rejected" and window and j in window else ""
                    spans.append(f"<span class='t{mark}' style='background:{color}' title='{r:+.4f}'>"
                                 f"{html.escape(processor.decode([t], skip_special_tokens=False))}</span>")
                out.append(f"<p><b>{side}</b> (sum {sum(rs):+.3f}): " + " ".join(spans) + "</p>")
        out.append("</body></html>")
        with open(os.path.join(args.out, "token_rewards.html"), "w") as f:
            f.write("\n".join(out))
        with open(os.path.join(args.out, "token_rewards.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(f"wrote {os.path.join(args.out, 'token_rewards.html')}" + (
            f"; most negative token at the first error in {hits} of {checked} rejected chains "
            f"({100 * hits / checked:.0f}%, chance {100 * chance / checked:.0f}%)" if checked else ""))
    policy.train()
    return summary
