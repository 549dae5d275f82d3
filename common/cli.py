"""The command line every script shares: argparse with each flag's default and range in --help, and cli(), which runs
a script's main() so that a user's mistake is one line (exit 2), Ctrl-C says where the run stopped (130), a run
that stops on purpose says why in one line (its own code: 143 after SIGTERM, 1 after a non-finite loss), and a crash
under torchrun prints its traceback and leaves at once, so the launcher ends the other ranks instead of letting them
wait out the collective timeout."""

import argparse
import os
import re
import sys
import threading
import traceback

# set by common.dist.Dist when this process joins a process group (under torchrun): cli() then leaves at once
JOINED = False


class UserError(Exception):
    """A failure the user can fix (a wrong path, a bad row, an output that would mix runs): one line, no traceback."""


class Stop(Exception):
    """A run that ends on purpose before its end (preempted, diverged): `message` on one line (rank 0), exit `code`."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


# where a run is, for the Ctrl-C message: e.g. {"at": "step 120 of 2000", "then": "rerun with --resume to continue"}
progress = {"at": None, "then": None}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and each flag's default (and range, when it has one) after its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        extra = []
        rng = getattr(action.type, "range_text", None)
        if rng:
            extra.append(rng)
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        if shown and "%(default)" not in text:
            extra.append("default: %(default)s")
        return f"{text} ({'; '.join(extra)})" if extra else text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults and ranges in --help, a --debug flag, and errors on one line (exit 2)."""

    def __init__(self, description, epilog=None):
        super().__init__(description=description, epilog=epilog, formatter_class=HelpFormatter)
        # "-1e-3" is a (negative) number, not an option: a range error names it, instead of "expected one argument"
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
        self.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")

    def error(self, message):
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def number(kind, lo=None, hi=None, above=None):
    """An argparse type: kind (int or float) in [lo, hi], or > above. The range shows in --help and in errors."""
    parts = [f"> {above}"] if above is not None else [f">= {lo}"] if lo is not None else []
    if hi is not None:
        parts.append(f"<= {hi}")
    text = "range: " + " and ".join(parts) if parts else ""

    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if kind is int else 'a number'}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi) or (above is not None and v <= above):
            raise argparse.ArgumentTypeError(f"{s} is out of range ({text[7:]})")
        return v
    parse.range_text = text
    parse.__name__ = kind.__name__
    return parse


def add_dist_timeout(ap):
    """--dist-timeout: how long a collective waits for a slow rank (torchrun runs only)."""
    ap.add_argument("--dist-timeout", type=number(float, above=0), default=60,
                    help="minutes a collective waits for a slow rank (torchrun: a long save, a cold file system)")


def _rank0():
    return int(os.environ.get("RANK", 0)) == 0


def _close_bars():
    """Close the progress bars first, so that a closing message is the output's last line."""
    from tqdm import tqdm                   # (here: tqdm's registry of open bars is only needed on the way out)
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def _abort_process_group(seconds=10):
    """Tear the process group down without waiting on peers that may be stuck in a collective: the destroy runs in a
    daemon thread and is given `seconds`; the process leaves either way."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return
    worker = threading.Thread(target=dist.destroy_process_group, daemon=True)
    worker.start()
    worker.join(seconds)


def cli(main):
    """Run a script's main() and exit with its code; see the module docstring for what each failure prints."""
    debug = "--debug" in sys.argv
    crashed = False
    try:
        code = main()
    except KeyboardInterrupt:
        if debug:
            raise
        _close_bars()
        if _rank0():
            where = f" at {progress['at']}" if progress["at"] else ""
            then = f"; {progress['then']}" if progress["then"] else ""
            print(f"\ninterrupted{where}{then}", file=sys.stderr, flush=True)
        code = 130
    except Stop as e:
        _close_bars()
        if _rank0():
            print(str(e), file=sys.stderr, flush=True)
        code = e.code
    except (UserError, OSError) as e:                 # data.formats.FormatError is a UserError
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except SystemExit as e:                          # raise SystemExit("error: ...") is a one-line error too
        if not isinstance(e.code, str):
            raise
        print(e.code, file=sys.stderr, flush=True)
        code = 2
    except Exception:
        if not JOINED:
            raise                                    # one process: Python's own traceback and exit 1
        # under torchrun: this rank's traceback, then out at once (its peers may be waiting in a collective:
        # the launcher ends them when it sees this exit, instead of after --dist-timeout)
        rank = os.environ.get("RANK", "?")
        print(f"[rank {rank}] crashed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        crashed, code = True, 1
    if JOINED:
        # A torchrun worker leaves without interpreter teardown. torch keeps the process group alive past
        # destroy_process_group (torch._dynamo, which DDP imports after the group exists, and FSDP2's DTensor caches
        # hold it), so its gloo/NCCL threads still run while Python finalizes and C++ statics are destroyed; a peer
        # closing its sockets then can abort this rank (SIGABRT, "terminate called without an active exception")
        # after a run that had finished. Every output is written and closed by now (main() has returned): only the
        # std streams need flushing.
        if crashed:
            _abort_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
