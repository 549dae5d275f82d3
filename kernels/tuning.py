"""Launch-time choices for the Triton kernels: which path runs, which config, and grids sized from real occupancy.

prefer()           LLAVA_KERNELS=auto on CUDA: the first call of every shape class (op, head dim, causal, dtype,
                   packed, a length bucket, training or not) runs the Triton path and the torch path on the real
                   tensors, forward and backward, and keeps Triton only where it compiled, ran and was at least as
                   fast; a Triton launch that fails later demotes its class to torch (demote()). Cached like pick's.
pick()             each op has a short list of configs (tile sizes, warps, stages, strategy). On CUDA the first
                   large call of every key (op, head dim, causal, dtype, packed, length bucket) times each config
                   once on the real tensors and keeps the fastest: in-process, and in
                   ~/.cache/llava-reasoner/kernel-tune.json (LLAVA_KERNELS_TUNE_CACHE) per GPU, torch and Triton
                   version and kernel source, so a later process (or every DDP rank) reuses it. Small calls, the CPU
                   interpreter and LLAVA_KERNELS_TUNE=0 take the first config of the list without timing.
resident_blocks()  how many blocks of a compiled kernel one SM holds at once (registers, shared memory, threads),
                   times the SM count: what a grid must fill in whole waves.
"""

import contextlib
import json
import os
import sys
import time

import torch

_chosen = {}                    # in-process winners: key -> config
_forced = {}                    # op name -> config, while force() is active
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "llava-reasoner", "kernel-tune.json")


def _source_hash():
    """Of the kernel sources: an edited kernel is timed afresh, not served a winner picked for the old code."""
    import hashlib
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha1()
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:10]


def _disk_key(key, device):
    import triton
    return "|".join(map(str, (torch.cuda.get_device_name(device), f"torch {torch.__version__}",
                              f"triton {triton.__version__}", f"kernels {_source_hash()}") + key))


def bucket(n):
    """A length class: the power of two at or above n, from 1,024 up (all shorter calls are one class)."""
    return 1 << max(10, (max(int(n), 1) - 1).bit_length())


def _load_disk():
    try:
        with open(os.environ.get("LLAVA_KERNELS_TUNE_CACHE", CACHE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _save_disk(entry, value):
    path = os.environ.get("LLAVA_KERNELS_TUNE_CACHE", CACHE)
    try:
        data = _load_disk()
        data[entry] = value
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)                   # atomic: concurrent ranks never see half a file
    except OSError:
        pass                                    # a read-only home only costs a re-tune next time


def tuning_enabled(x, large):
    return x.is_cuda and large and os.environ.get("LLAVA_KERNELS_TUNE", "1") != "0"


def _time_ms(fn, reps=3):
    """Median of `reps` timed runs after one untimed one (which also compiles); CUDA events on CUDA, the wall clock
    elsewhere (the tests)."""
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return sorted(times)[len(times) // 2]


_paths = {}                     # in-process path choices: shape class -> "triton" | "torch"


def _say(msg):
    if os.environ.get("RANK", "0") == "0":
        print(f"[kernels] {msg}", file=sys.stderr, flush=True)


def prefer(key, triton_run, torch_run, device=None, timer=None):
    """"triton" or "torch" for the shape class `key`: from this process's choices, the disk cache, or by running
    triton_run() and torch_run() (each the op on the real tensors, forward and backward; they must leave nothing
    behind) and timing them. Triton wins only if it ran and was at least as fast; a Triton that raised is announced
    loudly and its class goes to torch."""
    if key in _paths:
        return _paths[key]
    entry = _disk_key(("path",) + key, device) if _on_cuda(device) else None
    cached = _load_disk().get(entry) if entry else None
    if cached in ("triton", "torch"):
        _paths[key] = cached
        return cached
    timer = timer or _time_ms
    try:
        t_triton = timer(triton_run)
    except Exception as e:                      # noqa: BLE001 - a failed compile or launch of any kind
        demote(key, e, device)
        return "torch"
    t_torch = timer(torch_run)
    choice = "triton" if t_triton <= t_torch else "torch"
    _paths[key] = choice
    _say(f"{_name(key)}: triton {t_triton:.3f} ms, torch {t_torch:.3f} ms -> {choice}")
    if entry:
        _save_disk(entry, choice)
    return choice


def demote(key, error, device=None):
    """Send a shape class to the torch path from now on, after its Triton launch failed (one loud line)."""
    _paths[key] = "torch"
    _say(f"WARNING: {_name(key)}: the Triton kernel failed on this GPU ({type(error).__name__}: "
         f"{str(error).splitlines()[0][:160] if str(error) else ''}); using the torch path for this shape class")
    if _on_cuda(device):
        _save_disk(_disk_key(("path",) + key, device), "torch")


def _on_cuda(device):
    return device is not None and torch.device(device).type == "cuda"


def guarded(key, device, triton_run, torch_run):
    """triton_run(), or, when key is a shape class (auto mode) and the Triton launch fails, torch_run() with the class
    demoted: how the kernels' backward passes fall back instead of ending the run."""
    if key is None:
        return triton_run()
    try:
        return triton_run()
    except Exception as e:                      # noqa: BLE001 - a failed compile or launch of any kind
        demote(key, e, device)
        return torch_run()


def _name(key):
    return " ".join(str(k) for k in key)


def paths():
    """{shape class: "triton" | "torch"} chosen so far in this process (bench/gpu_check.py prints them)."""
    return dict(_paths)


def pick(key, configs, run, tune):
    """The config to use for `key`. With tune=True and no cached winner, run(config) is timed for every config
    (it must leave no state behind that the next run depends on); the caller then runs the winner for real."""
    if key[0] in _forced:
        return _forced[key[0]]
    if not tune or len(configs) == 1:
        return configs[0]
    if key in _chosen:
        return _chosen[key]
    device = torch.cuda.current_device()
    entry = _disk_key(key, device)
    cached = _load_disk().get(entry)
    if cached is not None and tuple(cached) in configs:
        _chosen[key] = tuple(cached)
        return _chosen[key]
    times = []
    for cfg in configs:
        try:
            times.append(_time_ms(lambda: run(cfg)))
        except Exception as e:                  # out of shared memory / registers on this GPU: never the winner
            print(f"[kernels] tune {key}: config {cfg} failed ({type(e).__name__}: {str(e)[:120]})",
                  file=sys.stderr)
            times.append(float("inf"))
    best = configs[min(range(len(configs)), key=times.__getitem__)]
    _chosen[key] = best
    print(f"[kernels] tuned {key}: " + ", ".join(f"{c} {t:.3f} ms" for c, t in zip(configs, times))
          + f" -> {best}", file=sys.stderr)
    _save_disk(entry, list(best))
    return best


@contextlib.contextmanager
def force(op, config):
    """Run op (a key's first element, e.g. "attn_fwd") with `config` inside the block: checks every config."""
    _forced[op] = config
    try:
        yield
    finally:
        del _forced[op]


def chosen():
    """{key: config} picked so far in this process."""
    return dict(_chosen)


def disk_cache():
    """{"device|triton version|key": config} kept on disk by every process so far (bench/gpu_check.py prints it)."""
    return _load_disk()


def resident_blocks(compiled, device):
    """Blocks of `compiled` (a Triton CompiledKernel) resident on the whole GPU at once."""
    props = torch.cuda.get_device_properties(device)
    compiled._init_handles()                     # loads the cubin; fills n_regs
    warps = compiled.metadata.num_warps
    regs_per_warp = -(-max(compiled.n_regs, 1) * 32 // 256) * 256      # allocated per warp in units of 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * warps)
    smem = compiled.metadata.shared
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    by_smem = smem_sm // (smem + 1024) if smem else 32                 # the driver reserves 1 KB per block
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)
    return max(1, min(by_regs, by_smem, by_threads, 32)) * props.multi_processor_count


def whole_waves(units, max_split, slots):
    """The split s in 1..max_split that runs `units` pieces of work, each cut in s programs, in the least time on
    `slots` resident blocks: time ~ ceil(units * s / slots) / s. The first s within 5% of the ideal wins."""
    best, best_eff = 1, 0.0
    for s in range(1, max(1, max_split) + 1):
        n = units * s
        eff = n / (-(-n // slots) * slots)
        if eff > best_eff + 1e-9:
            best, best_eff = s, eff
        if eff >= 0.95:
            break
    return best
