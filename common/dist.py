"""This process's place under torchrun: rank, world, device, the process group. Without torchrun's RANK variable a
script runs as one process and every collective here is a no-op."""

import datetime
import os

import torch
import torch.distributed as dist

from common import cli


class Dist:
    """rank / world / device of this process; the small collectives the scripts use."""

    def __init__(self, timeout_minutes=60):
        self.distributed = "RANK" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.distributed:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            # a generous timeout: a collective waits this long for a slow rank (a long save, a cold file system)
            dist.init_process_group(backend, device_id=self.device if self.device.type == "cuda" else None,
                                    timeout=datetime.timedelta(minutes=timeout_minutes))
            cli.JOINED = True                 # cli() then leaves without interpreter teardown
        self.main = self.rank == 0

    def all_sum(self, x):
        """Sum a float, a list of floats or a tensor over ranks (a no-op for one process); float64 on this device."""
        t = torch.as_tensor(x, dtype=torch.float64, device=self.device).clone()
        if self.distributed:
            dist.all_reduce(t)
        return t

    def all_max(self, x):
        t = torch.as_tensor(x, dtype=torch.float64, device=self.device).clone()
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def gather_objects(self, obj):
        """[obj of rank 0, obj of rank 1, ...] (every rank gets the list)."""
        if not self.distributed:
            return [obj]
        parts = [None] * self.world
        dist.all_gather_object(parts, obj)
        return parts

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def close(self):
        if self.distributed:
            dist.barrier()                         # no rank closes its connections while another still talks
            dist.destroy_process_group()


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def dtype_of(flag, device):
    """A --dtype flag's torch dtype: "auto" is bf16 on CUDA and fp32 on the CPU."""
    return {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
            "bfloat16": torch.bfloat16}[flag]
