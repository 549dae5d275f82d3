"""What a cluster does to a job, and what the trainers do about it.

  SIGTERM    what SLURM, Kubernetes and torchrun send before they kill a job. The handler only raises a flag; the loop
             finishes the optimizer step it is in, every rank learns of any rank's flag with the step's metrics (one
             collective it makes anyway), and then all of them write a checkpoint together, print how to resume, and
             exit 143 (128 + SIGTERM, what the scheduler expects of a job it terminated).
  NaN / inf  a loss or gradient norm that is not finite is caught after the backward and before the optimizer step:
             that step is not applied, nothing is saved (a checkpoint of broken weights would only be resumed into the
             same wall), and the run stops with one line naming the step and the last good checkpoint.
torchrun forwards SIGTERM to its workers and kills them after its shutdown timeout (30 s by default; newer releases
take --shutdown-timeout): the step plus a checkpoint must fit in it.
"""

import math
import os
import shlex
import signal
import sys

from common.cli import Stop, progress

PREEMPTED = 128 + signal.SIGTERM                 # 143
DIVERGED = 1


class Guard:
    """Installed once per run (in the main thread, before the loop); see the module docstring."""

    def __init__(self, total, save_every=0, resume=None):
        self.total, self.save_every = total, save_every
        self.signalled = False
        self.last_checkpoint = resume           # the newest checkpoint written or resumed from (None: none yet)
        self.saved_step = None                  # the step of a checkpoint written by this run
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        progress["then"] = (f"rerun with --resume to continue from {os.path.basename(resume)}" if resume else
                            "no checkpoint written yet (--save-every): a rerun with --resume starts over")

    def _on_sigterm(self, signum, frame):
        if not self.signalled and int(os.environ.get("RANK", 0)) == 0:
            print("\nSIGTERM: finishing this step, then a checkpoint", file=sys.stderr, flush=True)
        self.signalled = True

    def close(self):
        """Give SIGTERM back to the handler it had (a main() run inside another program leaves no trace)."""
        signal.signal(signal.SIGTERM, self._previous)

    def flag(self):
        """1.0 when this process was sent SIGTERM (summed over the ranks with the step's metrics)."""
        return float(self.signalled)

    def saved(self, path, step):
        self.last_checkpoint, self.saved_step = path, step

    def check_finite(self, step, loss, gnorm):
        """Stop before the optimizer step when the step's loss or gradient norm is not finite."""
        if math.isfinite(loss) and math.isfinite(gnorm):
            return
        where = self.last_checkpoint or "none (no checkpoint yet; a rerun starts again from --model)"
        self.close()
        raise Stop(f"stopped at step {step} of {self.total}: loss {loss:.4g}, gradient norm {gnorm:.4g} (not "
                   f"finite); the step was not applied and nothing was saved; last good checkpoint: {where} "
                   "(--resume continues from it; a lower --lr, or --clip, may get past this step)", DIVERGED)

    def after_step(self, step, stop, save):
        """After an optimizer step: the checkpoint the --save-every schedule asks for, and when any rank was sent
        SIGTERM (stop), a checkpoint of this step and the stop (the final step saves as usual). save() writes the
        checkpoint of `step` and returns its path."""
        if step >= self.total:
            return
        if self.save_every and step % self.save_every == 0:
            self.saved(save(), step)
        if stop:
            self.preempted(step, save)

    def preempted(self, step, save):
        """Stop after `step` with the command that resumes, saving it first unless this step is saved already."""
        if self.saved_step != step:
            self.saved(save(), step)
        # the same command with --resume (never --overwrite: that would delete the checkpoint it resumes from)
        argv = [a for a in sys.argv[1:] if a != "--overwrite"] + ([] if "--resume" in sys.argv else ["--resume"])
        launcher = "torchrun ... " if "RANK" in os.environ else "python "
        progress["then"] = None
        command = launcher + shlex.join([os.path.basename(sys.argv[0])] + argv)
        self.close()
        raise Stop(f"preempted (SIGTERM) after step {step} of {self.total}: saved {self.last_checkpoint}; resume "
                   f"with: {command}", PREEMPTED)
