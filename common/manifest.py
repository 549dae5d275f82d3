"""Every stage's output folder holds one run's outputs: a manifest records what they depend on (the model's identity,
the data files, the flags that change results), and claim() refuses to mix another run's outputs in, or to touch
a file no run of the stage wrote."""

import json
import os
import shutil

from common.cli import UserError


def file_id(path):
    """A data file's identity: its absolute path, size and modification time."""
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, int(st.st_mtime)]


def model_id(path):
    """A model directory's identity: its resolved path (a symlink re-pointed at another checkpoint is another
    model) and the size and modification time of each weight and config file in it."""
    real = os.path.realpath(path)
    names = sorted(f for f in os.listdir(real) if f.endswith((".safetensors", ".json"))) if os.path.isdir(real) else []
    return [real] + [[f, *file_id(os.path.join(real, f))[1:]] for f in names]


def _short(value, width):
    text = json.dumps(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def first_difference(old, new, prefix=""):
    """The first field in which two manifests differ, as 'field: old -> new' (each value cut to fit one line)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            if old.get(k) != new.get(k):
                return first_difference(old.get(k), new.get(k), f"{prefix}{k}.")
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            if a != b:
                return first_difference(a, b, f"{prefix}{i}.")
    return f"{prefix.rstrip('.') or 'manifest'}: {_short(old, 50)} -> {_short(new, 50)}"


def claim(manifest, fields, created, overwrite, what="--out", act=True):
    """Take an output location for a run; returns True when it holds outputs of an earlier run of the same fields
    (to resume from).

    manifest: the manifest file beside (or inside) the outputs; fields: what the outputs depend on (the model's
    identity, the data files, the flags that change results); created: the paths there that a run of this stage
    writes. Another run's outputs (other fields) are refused with one line naming the first difference, unless
    overwrite: then the files this stage created are deleted first (overwrite also starts a same-fields run anew).
    Outputs without a manifest were not made by this stage: they are never touched, and the run is refused.
    act=False only checks (every rank checks, then one acts; a script checks everything before its first write)."""
    fields = json.loads(json.dumps(fields))
    existing = [p for p in created if os.path.lexists(p)]
    old = None
    if os.path.exists(manifest):
        try:
            with open(manifest) as f:
                old = json.load(f)
        except ValueError:
            raise UserError(f"{manifest} is not a manifest this project wrote (not JSON); move it away, or choose "
                            f"a new {what}") from None
    if old is None and existing:
        raise UserError(f"{existing[0]} exists and was not written by this stage (no {os.path.basename(manifest)} "
                        f"beside it); nothing was changed: choose a new {what}, or move it away")
    if old is not None and old != fields and not overwrite:
        raise UserError(f"{what} holds another run ({first_difference(old, fields)}); --overwrite replaces it")
    if overwrite and existing:
        if act:
            for p in existing:
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
        existing = []
    if act:
        os.makedirs(os.path.dirname(os.path.abspath(manifest)), exist_ok=True)
        with open(manifest + ".tmp", "w") as f:
            json.dump(fields, f, indent=1)
        os.replace(manifest + ".tmp", manifest)
    return bool(existing)


def check_model_dir(path, flag="--model"):
    """A one-line error, before any work, when a model directory is missing or is not one."""
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such directory")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise UserError(f"{flag} {path}: no config.json, not a Hugging Face model directory")


def check_files(paths, flag):
    """A one-line error naming the flag when an input file is missing or is a directory."""
    for p in [paths] if isinstance(paths, str) else paths or []:
        if os.path.isdir(p):
            raise UserError(f"{flag} {p} is a directory; give the file")
        if not os.path.exists(p):
            raise UserError(f"{flag} {p}: no such file")


def check_out_dir(path, flag="--out", create=False):
    """--out must be a directory we can write (or one that can be made): checked before anything is written; made
    only with create=True (after every other check)."""
    parent = path
    while parent and not os.path.exists(parent):         # the nearest existing ancestor
        parent = os.path.dirname(parent.rstrip(os.sep)) or ("." if not os.path.isabs(path) else os.sep)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file; give a directory")
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: {parent} is a file, so the directory cannot be made")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {path} is not writable")
    if create:
        os.makedirs(path, exist_ok=True)
