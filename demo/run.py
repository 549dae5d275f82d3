"""The embedded default end to end: the paper's SFT table and its DPO section in miniature, on a CPU.

    python -m demo.run                        # `make demo`: the main line, one seed (arms 2 and 4, DPO, RFT, verifier)
    python -m demo.run --full --seeds 0 1     # `make demo-full`: every arm, both kinds of pairs, two seeds
    python -m demo.run --quick                # a few steps of every stage (the CI test)

From the shipped tiny base model (demo/base_model, built by `make base`: the stand-in for a pretrained LLaVA-NeXT), on
the synthetic chart task (64x64 charts, 4 bars):
  data     10,100 training charts: 70% "how many bars are larger than X?" (the target family: one comparison per
           bar), 10% each caption / lookup / largest bar; "how many bars are smaller than X?" held out of training;
           1,000 test and 1,000 held-out charts; 1,000 fresh target charts to sample DPO pairs from
  distill  the synthetic teacher writes a CoT rationale per chart (10% misread, dropped by the answer check); the
           direct rows come from the annotations. The first 100 charts are the format-aligned set: a CoT row and a
           direct row each (the paper's 450 rows that teach both answer formats); the rest give the main rows
  SFT      the paper's Table 2 arms at the same batch and lr: (1) format rows only, one epoch of them; (2) = (1) +
           every direct row, (3) = (1) + every CoT row, (4) = (1) + every direct row + every CoT row (the paper's
           LLaVA-Reasoner-SFT), all three for the same steps, one epoch of (4)'s rows (the paper trains each mixture
           one epoch; demo/results/NOTES.md says why the demo does not); vision tower frozen
  sample   12 CoT samples per fresh question from (4) at T = 1, graded by the final answer (and, --full, also by
           every step: data.synthetic.steps_correct); accuracy window [0.25, 0.85]; up to 3 pairs per question
  DPO      from (4) on those pairs, one epoch; beside it the RFT control: SFT on the same chosen answers, same steps
  eval     every model in direct and CoT mode on the target, held-out and other families (greedy)
  verifier 16 CoT samples per target test question from (4); the answer picked from the first n = 1, 2, 4, 8, 16 by
           majority vote, best-of-n under the DPO implicit reward, reward-weighted voting and (4)'s own likelihood
Every job is the real script with its real flags, printed so it can be repeated. Jobs run on two cores as soon as
their inputs exist, one process with one thread each (sampling and the verifier: torchrun, 2 processes). A rerun
reuses every job whose command and inputs are unchanged (OUT/seed<S>/.done/); one whose marker is missing or stale
starts over (--overwrite). The report lands in OUT/: results.md (the tables in the paper's layout, the findings
tested over the seeds), accuracy.png, verifier.png, sft_seed<S>.png, dpo_seed<S>.png, token_rewards_seed<S>.html.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from demo.report import report  # noqa: E402

TARGET, HELD_OUT = "count_above", "count_below"
FAMILIES = [TARGET] * 7 + ["caption", "lookup", "max_label"]
FULL = dict(train=10000, fmt=100, test=1000, pool=1000, batch=8, sft_lr=1e-3, samples=12, pairs=3, dpo_lr=5e-6,
            beta=0.1, dpo_batch=16, new_tokens=48, verifier_n=16, verifier_q=400, min_acc=0.25, log_every=100)
QUICK = dict(train=200, fmt=20, test=20, pool=16, batch=8, sft_lr=5e-3, samples=6, pairs=3, dpo_lr=5e-6, beta=0.1,
             dpo_batch=2, new_tokens=40, verifier_n=4, verifier_q=6, min_acc=0.1, log_every=10)
# the paper's Table 2 arms: the SFT files each one trains on (one epoch)
ARMS = {"arm1": ["fmt_cot", "fmt_direct"], "arm2": ["fmt_cot", "fmt_direct", "direct"],
        "arm3": ["fmt_cot", "fmt_direct", "cot"], "arm4": ["fmt_cot", "fmt_direct", "direct", "cot"]}


# ------------------------------------------------------------------------------------------------ jobs

class Job:
    """One command (or an in-process step, fn) and the jobs whose outputs it reads. cmd may be a function returning
    the command (or None: nothing to do) once those jobs have finished, e.g. steps counted from their outputs."""

    def __init__(self, name, cmd=None, deps=(), procs=1, fn=None, overwrite=True):
        self.name, self.cmd, self.deps, self.procs, self.fn = name, cmd, list(deps), procs, fn
        self.overwrite = overwrite                       # the script takes --overwrite (data.synthetic rewrites anyway)
        self.work = None                                 # the seed's directory: its markers and logs


# The CPU libraries' code paths, held to AVX2 on an x86 CPU that has AVX2 or more: ATen's vector kernels, oneDNN
# (the vision tower's convolution) and MKL's GEMMs otherwise pick the widest instructions the CPU has (AVX-512 where
# there is one), which round differently, and 2,478 SFT steps grow a last-bit difference into another model: other
# questions in the window, other pairs, another DPO. An AVX2 machine runs these paths anyway (the same bits, the
# same speed). A variable the user set is left as it is.
CPU_PINS = dict(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_CBWR="AVX2")


def job_env():
    """The jobs' environment: one thread per process (two processes fill two cores), CPU_PINS where they apply."""
    import torch
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        env = {**CPU_PINS, **env}
    return env


def run_jobs(jobs, slots=2):
    """Run jobs on `slots` cores, in list order as soon as their inputs exist. Each job's key is its command and the
    keys of the jobs it reads; a job whose marker (WORK/.done/NAME) holds the same key finished before and is reused.
    A job left with nothing to do (cmd returned None) is skipped, and so is every job that reads from it."""
    env = job_env()
    keys, cmds, pending, running, free, seconds = {}, {}, list(jobs), [], slots, {}
    while pending or running:
        for job in list(pending):
            work, me = job.work, (job.work, job.name)
            if any((work, d) not in keys for d in job.deps):
                continue
            tag = f"{os.path.basename(work)}/{job.name}"
            if any(keys[work, d] is None for d in job.deps):
                print(f"[{tag}] skipped: {', '.join(d for d in job.deps if keys[work, d] is None)} was")
                keys[me] = None
                pending.remove(job)
                continue
            if me not in cmds:                          # resolved once: what it reads is final
                cmds[me] = job.cmd() if callable(job.cmd) else job.cmd
            cmd = cmds[me]
            if cmd is None and job.fn is None:
                print(f"[{tag}] skipped: nothing to train on")
                keys[me] = None
                pending.remove(job)
                continue
            key = hashlib.sha1(json.dumps([job.name, cmd, [keys[work, d] for d in job.deps]]).encode()).hexdigest()
            for sub in (".done", "logs"):
                os.makedirs(os.path.join(work, sub), exist_ok=True)
            marker = os.path.join(work, ".done", job.name)
            if os.path.exists(marker) and open(marker).read() == key:
                print(f"[{tag}] done before, reused")
                keys[me] = key
                pending.remove(job)
                continue
            if job.fn is not None:                      # a quick step in this process
                job.fn()
                open(marker, "w").write(key)
                keys[me] = key
                pending.remove(job)
                continue
            if job.procs > free:                        # it keeps its place; the jobs after it wait their turn
                break
            pending.remove(job)
            cmd = cmd + ["--overwrite"] * job.overwrite  # a missing or stale marker: start this job over
            if job.procs > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                       str(job.procs)] + cmd[1:]
            print(f"[{tag}] $ {' '.join(cmd)}", flush=True)
            log = os.path.join(work, "logs", f"{job.name}.log")
            # each process writes to its own log file: a pipe nobody reads would stall it when full
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
            running.append((job, proc, log, key, time.time(), tag))
            free -= job.procs
        if not running:
            if pending:
                raise SystemExit(f"error: jobs {[j.name for j in pending]} wait for jobs that never run")
            break
        time.sleep(0.2)
        for item in [r for r in running if r[1].poll() is not None]:
            job, proc, log, key, t, tag = item
            running.remove(item)
            free += job.procs
            out = open(log, errors="replace").read()
            if proc.returncode:
                for other in running:
                    other[1].terminate()
                print(out[-4000:])
                raise SystemExit(f"[{tag}] failed (log: {log})")
            for line in [ln for ln in out.splitlines() if ln.startswith(
                    ("done", "questions:", "samples with", "kept", "wrote", "| synthetic count_above"))][-3:]:
                print(f"    [{tag}] {line[:150]}")
            seconds[tag] = time.time() - t
            print(f"[{tag}] {seconds[tag]:.0f}s", flush=True)
            open(os.path.join(job.work, ".done", job.name), "w").write(key)
            keys[job.work, job.name] = key
    return seconds


def split_records(data, n_fmt):
    """data/train.jsonl -> format.jsonl (its first n_fmt records: the format-aligned set, every family in turn) and
    main.jsonl (the rest); test.jsonl's target family -> test_target.jsonl (the verifier's questions)."""
    def write(path, recs):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    train = [json.loads(line) for line in open(f"{data}/train.jsonl")]
    write(f"{data}/format.jsonl", train[:n_fmt])
    write(f"{data}/main.jsonl", train[n_fmt:])
    test = [json.loads(line) for line in open(f"{data}/test.jsonl")]
    write(f"{data}/test_target.jsonl", [r for r in test if r["meta"]["family"] == TARGET])
    print(f"[split] {n_fmt} format-aligned charts, {len(train) - n_fmt} main charts, "
          f"{sum(r['meta']['family'] == TARGET for r in test)} target test questions")


def lines(path):
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def seed_jobs(seed, work, base, s, full):
    """The jobs of one seed, in the order they should take free cores (the longest chain first)."""
    py = sys.executable
    data, pool, sft = f"{work}/data", f"{work}/pool", f"{work}/sft"
    arms = list(ARMS) if full else ["arm2", "arm4"]
    variants = ["outcome", "steps"] if full else ["outcome"]
    # the main line waits on sampling and the verifier: torchrun, both cores; the full run keeps both cores busy with
    # other jobs (the next seed's) instead
    procs = 1 if full else 2
    jobs = [Job("data", [py, "-m", "data.synthetic", "--out", data, "--n", str(s["train"] + s["fmt"]), "--seed",
                         str(seed), "--level", "tiny", "--families", *FAMILIES, "--holdout", HELD_OUT, "--n-test",
                         str(s["test"])], overwrite=False),
            Job("pool", [py, "-m", "data.synthetic", "--out", pool, "--n", str(s["pool"]), "--seed", str(seed + 1000),
                         "--level", "tiny", "--families", TARGET, "--holdout", "", "--n-test", "1"], overwrite=False),
            Job("split", deps=["data"], fn=lambda: split_records(data, s["fmt"]))]
    for name, recs, flags in (("cot", "main", ["--teacher", "synthetic", "--error-rate", "0.1", "--seed", str(seed)]),
                              ("direct", "main", ["--direct-only"]),
                              ("fmt_cot", "format", ["--teacher", "synthetic", "--error-rate", "0.1", "--seed",
                                                     str(seed)]),
                              ("fmt_direct", "format", ["--direct-only"])):
        jobs.append(Job(f"distill_{name}", [py, "distill.py", "--data", f"{data}/{recs}.jsonl", "--image-root", data,
                                            "--out", f"{sft}/{name}.jsonl", *flags], deps=["split"]))

    def sft_cmd(arm):
        files = [f"{sft}/{f}.jsonl" for f in ARMS[arm]]
        # arms 2-4 train the same number of steps: one epoch of arm 4's rows (its direct rows once, arm 2's twice);
        # arm 1, the format-aligned set alone, one epoch of its rows, as the paper's
        steps = max(1, sum(map(lines, files if arm == "arm1" else [f"{sft}/{f}.jsonl" for f in ARMS["arm4"]]))
                    // s["batch"])
        return [py, "train_sft.py", "--model", base, "--out", f"{work}/{arm}", "--data", *files, "--image-root", data,
                "--max-steps", str(steps), "--batch-size", str(s["batch"]), "--lr", str(s["sft_lr"]),
                "--freeze-vision", "--workers", "0", "--seed", str(seed), "--log-every", str(s["log_every"])]
    distilled = [f"distill_{n}" for n in ("cot", "direct", "fmt_cot", "fmt_direct")]
    # arm 4 trains twice as long as the others: it goes first, the other arms share the second core
    jobs += [Job(f"sft_{arm}", lambda arm=arm: sft_cmd(arm), deps=distilled) for arm in ["arm4"] + [
        a for a in arms if a != "arm4"]]
    sft4 = f"{work}/arm4/final"
    for v in variants:
        jobs.append(Job(f"sample_{v}", [py, "sample.py", "--model", sft4, "--data", f"{pool}/train.jsonl",
                                        "--image-root", pool, "--num-samples", str(s["samples"]), "--temperature",
                                        "1.0", "--max-new-tokens", str(s["new_tokens"]), "--batch-size", "16",
                                        "--pairs-per-question", str(s["pairs"]), "--min-acc", str(s["min_acc"]),
                                        "--grade", v, "--out", f"{work}/pairs_{v}/pairs.jsonl", "--seed", str(seed)],
                        deps=["sft_arm4", "pool"], procs=procs))

    def evaluate(model, name, deps):
        return Job(f"eval_{name}", [py, "evaluate.py", "--model", model, "--data", f"{data}/test.jsonl",
                                    f"{data}/test_holdout.jsonl", "--image-root", data, "--mode", "both", "--out",
                                    f"{work}/eval/{name}", "--batch-size", "64", "--max-new-tokens",
                                    str(s["new_tokens"]), "--max-new-tokens-direct", "24", "--workers", "0"], deps=deps)
    jobs += [evaluate(f"{work}/{arm}/final", arm, ["sft_" + arm, "split"]) for arm in arms if arm != "arm4"]
    for v in variants:
        pairs = f"{work}/pairs_{v}/pairs.jsonl"

        def steps(pairs=pairs):                          # one epoch of DPO; RFT takes as many steps
            n = lines(pairs)                             # (None: fewer pairs than a batch, nothing to train on)
            return n // s["dpo_batch"] if n >= s["dpo_batch"] else None
        jobs.append(Job(f"dpo_{v}", lambda pairs=pairs, v=v, steps=steps: steps() and [
            py, "train_dpo.py", "--model", sft4, "--pairs", pairs, "--image-root", pool, "--out", f"{work}/dpo_{v}",
            "--beta", str(s["beta"]), "--lr", str(s["dpo_lr"]), "--batch-size", str(s["dpo_batch"]),
            "--global-batch", str(s["dpo_batch"]), "--max-steps", str(steps()), "--warmup-ratio", "0.1", "--workers",
            "0", "--seed", str(seed), "--audit-pairs", "300", "--log-every", "10"], deps=[f"sample_{v}"]))
        jobs.append(Job(f"rft_{v}", lambda pairs=pairs, v=v, steps=steps: steps() and [
            py, "train_sft.py", "--model", sft4, "--out", f"{work}/rft_{v}", "--data", pairs[:-len(".jsonl")] +
            ".rft.jsonl", "--image-root", pool, "--freeze-vision", "--max-steps", str(steps()), "--batch-size",
            str(s["dpo_batch"]), "--lr", str(s["dpo_lr"]), "--warmup-ratio", "0.1", "--workers", "0", "--seed",
            str(seed), "--log-every", "10"], deps=[f"sample_{v}"]))
    jobs.append(evaluate(sft4, "arm4", ["sft_arm4", "split"]))
    for v in variants:
        jobs.append(Job(f"verify_{v}", [py, "evaluate.py", "--model", sft4, "--data", f"{data}/test_target.jsonl",
                                        "--image-root", data, "--out", f"{work}/verify_{v}", "--rerank",
                                        str(s["verifier_n"]), "--reward-model", f"{work}/dpo_{v}/final",
                                        "--reference", sft4, "--beta", str(s["beta"]), "--temperature", "1.0",
                                        "--seed", str(seed), "--limit", str(s["verifier_q"]), "--batch-size", "16",
                                        "--max-new-tokens", str(s["new_tokens"]), "--workers", "0"],
                        deps=[f"dpo_{v}", "split"], procs=procs))
        jobs += [evaluate(f"{work}/{kind}_{v}/final", f"{kind}_{v}", [f"{kind}_{v}", "split"])
                 for kind in ("dpo", "rft")]
    if full:
        jobs.append(evaluate(base, "base", ["split"]))
    for job in jobs:
        job.work = work
    return jobs


# ------------------------------------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output directory (default runs/demo, --full: runs/demo-full)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 (--full: 0 1)")
    ap.add_argument("--full", action="store_true",
                    help="every arm of the paper's Table 2, outcome- and step-graded pairs (default: arms 2, 4)")
    ap.add_argument("--base", default=os.path.join(ROOT, "demo", "base_model"), help="the shipped base model")
    ap.add_argument("--quick", action="store_true", help="a few steps of every stage (the CI test)")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the report (results.md, plots, pages) from the runs already in --out; run nothing")
    args = ap.parse_args()
    out = args.out or os.path.join(ROOT, "runs", "demo-full" if args.full else "demo")
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.full else [0])
    if not os.path.exists(os.path.join(args.base, "config.json")):
        raise SystemExit(f"error: no base model in {args.base}: run `make base` first")
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    sizes, full = (QUICK, True) if args.quick else (FULL, args.full)     # --quick: every job, a few steps each
    works = {seed: os.path.join(out, f"seed{seed}") for seed in seeds}
    # one queue for all seeds: a seed's jobs take the cores first, the next seed's fill the gaps
    seconds = {} if args.report_only else run_jobs(
        [job for seed in seeds for job in seed_jobs(seed, works[seed], args.base, sizes, full)])
    for seed, work in works.items():
        pages = (("outcome", f"token_rewards_seed{seed}.html"), ("steps", f"token_rewards_steps_seed{seed}.html"))
        for v, name in pages:
            if os.path.exists(f"{work}/dpo_{v}/token_rewards.html"):
                shutil.copy(f"{work}/dpo_{v}/token_rewards.html", os.path.join(out, name))
    setup = (f"Recipe: arms 2-4 train the same steps (one epoch of arm 4's rows, batch {sizes['batch']}, lr "
             f"{sizes['sft_lr']}), arm 1 one epoch of its {sizes['fmt']} charts' rows; DPO from arm 4: beta "
             f"{sizes['beta']}, lr {sizes['dpo_lr']}, one epoch of {sizes['dpo_batch']} pairs a step; RFT the same "
             f"steps and lr on the chosen answers; the verifier: {sizes['verifier_n']} samples for each of the first "
             f"{sizes['verifier_q']} target test questions.")
    md = report(works, out, TARGET, HELD_OUT, seconds, setup)
    print(md)
    print(f"demo done in {(time.time() - t0) / 60:.1f} minutes; report in {out}/results.md")


if __name__ == "__main__":
    main()
