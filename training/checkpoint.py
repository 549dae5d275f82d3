"""Models on devices and training state on disk: sharded loading, FSDP2 / DDP wrapping, atomic sharded checkpoints.

A checkpoint, OUT/checkpoint-000200/:
  state/                 torch.distributed.checkpoint (DCP): the fp32 weights and the optimizer state, each process
                         writing its own shard; resharded on load, so --resume works onto any number of processes
  trainer_state.json     step, process count, flags, the learning rate of each parameter group
  rng.pt                 the RNG states (a plain tensor file: torch.load(..., weights_only=True))
  config.json, generation_config.json, tokenizer and processor files: always, so the directory rebuilds the model
  model*.safetensors     the Hugging Face weights (the interchange format), in the final checkpoint and every
                         --save-hf-every steps; written one tensor at a time, so no process holds the whole model
OUT/latest names the newest complete checkpoint (what --resume continues from); OUT/final links to the final one.
A checkpoint is written into a temporary directory and renamed into place: a kill at any moment leaves the previous
one loadable. Model code holds no distributed code: sharding and wrapping live here.
"""

import json
import os
import random
import shutil
import warnings
from contextlib import nullcontext

import torch

from common.cli import UserError, progress
from common.manifest import claim
from model import LlavaNext
from model.weights import load_state_dict

# ------------------------------------------------------------------------------------------------ models


def shard(model, param_dtype=None):
    """FSDP2 as torchtitan lays it out: each CLIP layer that runs and each decoder block is a unit, then the root
    (embeddings, norms, projector, head). A sharded module is all-gathered by every rank together, so it must run on
    every rank in every forward (the model runs the tower on a blank crop when a batch has no image); the CLIP
    layers past the selected feature layer never run, so they are not sharded at all (ignored_params: replicated,
    frozen, saved as loaded). param_dtype: the compute dtype of the gathered weights (None: as stored); gradients
    are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    tower = model.vision_tower
    deepest = max(tower.hidden_index(i) for i in model.config.feature_layers)
    for block in list(tower.encoder.layers[:deepest]) + list(model.language_model.layers):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp, ignored_params=set(tower.unused_parameters(model.config.feature_layers)))


def load_weights(model, path, dtype, device):
    """Copy a Hugging Face directory's weights into a model's (possibly sharded) parameters, tensor by tensor. A
    sharded parameter (FSDP2: rows split along dim 0 as torch.chunk splits them) receives only this rank's rows,
    read from the memory-mapped file as one contiguous range: peak memory is the shard plus one slice."""
    from torch.distributed.tensor import DTensor, Shard
    params = dict(model.named_parameters())
    expected, rows = {}, {}
    for name, p in params.items():
        expected[name] = tuple(p.shape)
        if isinstance(p, DTensor):
            if tuple(p.placements) != (Shard(0),):
                raise RuntimeError(f"{name}: expected FSDP's Shard(0) placement, got {p.placements}")
            n, world, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
            per = -(-n // world)
            start = min(n, rank * per)
            rows[name] = (start, min(n, start + per))
            if p.to_local().shape[0] != rows[name][1] - start:
                raise RuntimeError(f"{name}: local shard has {p.to_local().shape[0]} rows, expected {rows[name]}")

    @torch.no_grad()
    def sink(name, t):
        p = params[name]
        (p.to_local() if isinstance(p, DTensor) else p.data).copy_(t)

    load_state_dict(path, expected, dtype, device, optional=model.optional_weights(), rows=rows, sink=sink)


def load_for_training(path, args, d, compute, configure=None, weights=True, frozen=False):
    """(model, wrapped) for a Hugging Face directory. Trained weights are fp32 masters; a frozen model (the DPO
    reference) is held in the compute dtype. One process, or DDP: the whole model on this device. FSDP2 (--fsdp
    under torchrun): built on the meta device, sharded, then each rank materialises only its own shards.
    configure(model) sets requires_grad and checkpointing before sharding; weights=False leaves the values to a
    checkpoint's state (resume). A frozen model is never DDP-wrapped (it has no gradients to reduce)."""
    fsdp = d.distributed and args.fsdp
    dtype = compute if frozen else torch.float32
    model = LlavaNext.empty(path, dtype)
    if frozen:
        model.requires_grad_(False)
    if configure is not None:
        configure(model)
    if fsdp:
        shard(model, None if frozen or compute == torch.float32 else compute)
    model.to_empty(device=d.device)
    if weights:
        load_weights(model, path, dtype, d.device)
    if frozen:
        return model.eval(), model
    if d.distributed and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        return model, DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return model, model


def grad_sync(wrapped, sync):
    """DDP: skip the all-reduce on all but the last micro-batch (it must cover the forward too). FSDP2 reduce-scatters
    every micro-batch into the sharded gradients instead: no unsharded gradient is ever held for a whole step."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    return wrapped.no_sync() if isinstance(wrapped, DDP) and not sync else nullcontext()


# ------------------------------------------------------------------------------------------------ checkpoint dirs

def checkpoints(out):
    """Complete-looking checkpoint directories under out, oldest first."""
    if not os.path.isdir(out):
        return []
    names = [n for n in os.listdir(out) if n.startswith("checkpoint-") and n[11:].isdigit()]
    return [os.path.join(out, n) for n in sorted(names, key=lambda n: int(n[11:]))]


def latest(out):
    """The checkpoint OUT/latest names, checked complete; None when there is none. Never the highest-numbered
    directory: that may be a stale one from an earlier run into the same folder."""
    pointer = os.path.join(out, "latest")
    if not os.path.exists(pointer):
        if checkpoints(out):
            raise UserError(f"{out} holds checkpoint directories but no 'latest' file naming the one to resume "
                            "from; write its name into OUT/latest, or start in a new --out")
        return None
    path = os.path.join(out, open(pointer).read().strip())
    missing = incomplete(path)
    if missing:
        raise UserError(f"{pointer} names {path}, which lacks {', '.join(missing)} (not a checkpoint of this "
                        "version, or damaged); point OUT/latest at another checkpoint or start anew")
    return path


def incomplete(path):
    """The files a checkpoint directory lacks (empty for a complete one)."""
    return [f for f in ("trainer_state.json", "rng.pt", "config.json", os.path.join("state", ".metadata"))
            if not os.path.exists(os.path.join(path, f))]


RUN_FILES = ("latest", "final", "metrics.jsonl", "lengths.json", "loss.png", "rewards.png", "reference_logps.pt",
             "token_rewards.html", "token_rewards.json")


def check_shared(out, d):
    """Every process must see the same --out: rank 0 writes a probe there and every rank reads it back. On several
    nodes an --out that is not on a shared file system (each node its own disk) would leave each node's shards where
    the others cannot load them; it is refused here, before anything else is written, on every rank at once."""
    if not d.distributed:
        return
    probe = os.path.join(out, ".shared-probe")
    token = f"{os.uname().nodename}:{os.getpid()}:{random.random()}"
    if d.main:
        os.makedirs(out, exist_ok=True)
        with open(probe, "w") as f:
            f.write(token)
    token = d.gather_objects(token)[0]                      # rank 0's
    try:
        with open(probe) as f:
            seen = f.read() == token
    except OSError:
        seen = False
    blind = d.gather_objects(None if seen else (d.rank, os.uname().nodename))
    d.barrier()
    if d.main:
        os.remove(probe)
    blind = [b for b in blind if b is not None]
    if blind:
        who = ", ".join(f"rank {r} on {host}" for r, host in blind[:4]) + (" ..." if len(blind) > 4 else "")
        raise UserError(f"--out {out} is not the same directory on every node ({who} cannot see what rank 0 wrote "
                        "there): --out must be on a shared file system that every node mounts at the same path")


def claim_run(args, d, fields):
    """Take --out for a training run (OUT/manifest.json records what the run depends on). Returns the checkpoint to
    resume from, or None. The same run continues only with --resume; another run's outputs are refused unless
    --overwrite, which deletes what training runs wrote there (checkpoints, logs), nothing else. Every check (the
    shared file system, the manifest, the checkpoint to resume) runs on every rank before rank 0 writes."""
    check_shared(args.out, d)
    names = os.listdir(args.out) if os.path.isdir(args.out) else []
    created = [os.path.join(args.out, n) for n in names if n in RUN_FILES or n.startswith(
        ("checkpoint-", ".tmp-checkpoint-", ".trash-checkpoint-"))]
    manifest = os.path.join(args.out, "manifest.json")
    has_run = claim(manifest, fields, created, args.overwrite, act=False)       # every rank checks ...
    if has_run and not args.resume:
        raise UserError(f"{args.out} already holds this run's outputs: --resume continues it, --overwrite starts it "
                        "over, or choose a new --out")
    resume = latest(args.out) if args.resume and has_run else None
    d.barrier()
    if d.main:                                                                   # ... one acts
        os.makedirs(args.out, exist_ok=True)
        claim(manifest, fields, created, args.overwrite)
    d.barrier()
    if args.resume and resume is None and d.main:
        print(f"--resume: no checkpoint in {args.out} yet, starting from --model")
    return resume


def _discard(path):
    """Delete a checkpoint directory so that a kill midway never leaves a half-deleted checkpoint-N: one rename takes
    it out of the checkpoint-* namespace first, then the files go (leftovers are swept by the next save)."""
    trash = os.path.join(os.path.dirname(path), ".trash-" + os.path.basename(path))
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash)


def write_checkpoint(out, step, write_files, d, keep=3):
    """Write a checkpoint atomically: every rank's write_files(tmp_dir) fills a temporary directory, then rank 0
    renames it to checkpoint-{step} (one rename: a kill leaves either the old set or the new one, never half of
    one), drops all but the newest `keep`, and points `latest` at it."""
    tmp = os.path.join(out, f".tmp-checkpoint-{step:06d}")
    final = os.path.join(out, f"checkpoint-{step:06d}")
    if d.main:
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(out):                          # what a kill left behind: half-written, half-deleted
            if name.startswith((".tmp-checkpoint-", ".trash-checkpoint-")):
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        os.makedirs(tmp)
    d.barrier()
    write_files(tmp)
    d.barrier()
    if d.main:
        for name in os.listdir(tmp):                      # the bytes are on disk before the rename makes them live
            if os.path.isfile(os.path.join(tmp, name)):   # (DCP syncs its own shard files)
                with open(os.path.join(tmp, name), "rb") as f:
                    os.fsync(f.fileno())
        if os.path.exists(final):
            _discard(final)
        os.rename(tmp, final)
        with open(os.path.join(out, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final) + "\n")
        os.replace(os.path.join(out, "latest.tmp"), os.path.join(out, "latest"))
        for old in checkpoints(out)[:-keep] if keep > 0 else []:
            _discard(old)
    d.barrier()
    return final


# ------------------------------------------------------------------------------------------------ save / resume

def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def full_tensors(model):
    """{name: fetch()} making each full tensor in turn (an all-gather for a sharded one), for save_pretrained: every
    rank calls every fetch in the same order; only rank 0 writes."""
    from torch.distributed.tensor import DTensor
    out = {}
    for name, t in model.state_dict().items():
        fetch = (lambda t=t: t.full_tensor()) if isinstance(t, DTensor) else (lambda t=t: t)
        fetch.meta = (tuple(t.shape), t.dtype)
        out[name] = fetch
    return out


def save(args, d, model, wrapped, optimizer, processor, step, save_dtype, final=False):
    """A checkpoint of step `step`: the sharded state always, the Hugging Face weights when final or on the
    --save-hf-every schedule. Returns its path."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    hf = final or (args.save_hf_every and step % args.save_hf_every == 0)
    model_sd, optim_sd = get_state_dict(wrapped, optimizer)

    def write(tmp):
        with warnings.catch_warnings():           # one process: DCP warns that it saves without a process group
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, "state"),
                     no_dist=not d.distributed)
        if hf:
            model.save_pretrained(tmp, dtype=save_dtype, state_dict=full_tensors(model), write=d.main)
        if not d.main:
            return
        if not hf:
            model.save_config(tmp, save_dtype)
        processor.save_pretrained(tmp)
        torch.save(rng_state(), os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "world": d.world, "hf_weights": bool(hf), "args": vars(args),
                       "param_groups": [{"name": g.get("name"), "base_lr": g["base_lr"]}
                                        for g in optimizer.param_groups]}, f, indent=1)

    path = write_checkpoint(args.out, step, write, d, args.keep_checkpoints)
    progress["then"] = f"rerun with --resume to continue from {os.path.basename(path)}"      # (before it is said)
    if d.main:
        print(f"saved {path}" + (" (with Hugging Face weights)" if hf else ""), flush=True)
    return path


def load_state(path, wrapped, optimizer):
    """Restore weights, optimizer state and RNG from a checkpoint written by save(), on any number of processes.
    Returns its trainer_state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(wrapped, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(path, "state"),
                 no_dist=not torch.distributed.is_initialized())
    set_state_dict(wrapped, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    set_rng_state(torch.load(os.path.join(path, "rng.pt"), weights_only=True))
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def link_final(out, path):
    """OUT/final -> the final checkpoint (a relative symlink, replaced atomically)."""
    link = os.path.join(out, "final")
    tmp = link + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.basename(path), tmp)
    os.replace(tmp, link)
    return link
