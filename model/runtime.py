"""Where a model runs: the device, the precision, and the processes of a torchrun job.

Used by training and by every command that runs a model (sample, walkthrough, plots, report).
"""

import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def derived_seed(*parts):
    """A seed made from integers: the same parts give the same seed in every process and run (the
    training loop's batches and dropout, GRPO's samples)."""
    return hash(tuple(parts)) & 0x7FFF_FFFF_FFFF_FFFF  # hash of a tuple of ints is not randomised


def available_devices():
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(name):
    """'auto' -> cuda, then mps, then cpu. An explicit device that is not here raises UserError
    listing the ones that are."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    found = available_devices()
    kind, _, index = name.partition(":")
    ok = (kind == "cpu" and not index) or (kind == "mps" and not index and "mps" in found) or (
        kind == "cuda" and (f"cuda:{index or 0}" in found))
    if not ok:
        raise UserError(f"device {name!r} is not available on this machine; available: {', '.join(found)}")
    return name


def resolve_dtype(name, device_type):
    """'auto': bfloat16 on CUDA where supported, else float16 there; float32 elsewhere."""
    if name == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return DTYPES[name]


def autocast_context(device_type, dtype):
    """Mixed precision: weights stay float32 (float64 for the parity tests), matmuls run in
    bfloat16/float16 under autocast."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type=device_type, dtype=dtype)
    return nullcontext()


@dataclass
class Runtime:
    device: str
    device_type: str
    dtype: torch.dtype
    ddp: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self):
        return self.rank == 0


def setup_runtime(device_name, dtype_name):
    """One process, or one of many started by torchrun (RANK/WORLD_SIZE in the environment):
    NCCL on CUDA, Gloo on CPU."""
    if "RANK" not in os.environ:
        device = resolve_device(device_name)
        rt = Runtime(device, device.split(":")[0], None)
    else:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        if use_cuda:
            resolve_device("cuda")  # a clear error when there is none
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        elif device_name not in ("auto", "cpu"):
            raise UserError(f"torchrun supports CUDA (NCCL) and CPU (Gloo); got --device={device_name}")
        else:
            device = "cpu"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rt = Runtime(device, device.split(":")[0], None, True, rank, local_rank, int(os.environ["WORLD_SIZE"]))
    rt.dtype = resolve_dtype(dtype_name, rt.device_type)
    if rt.device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls where float32 remains
    return rt


def peak_memory_mb(device_type):
    """The most memory this process has held: on CUDA the tensors' peak, elsewhere the peak RSS."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 1024  # macOS reports bytes, Linux KiB


def end_processes():
    """Leave the process group (also when setting up failed), so torchrun ends cleanly."""
    if dist.is_initialized():
        dist.destroy_process_group()


def reduce_across_ranks(rt, loss, stop):
    """The mean loss over processes, and whether any process was asked to stop (so all stop
    at the same step)."""
    if not rt.ddp:
        return loss, stop
    t = torch.tensor([loss, float(stop)], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t[0].item() / rt.world_size, t[1].item() > 0
