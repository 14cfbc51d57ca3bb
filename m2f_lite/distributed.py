"""Processes and devices: one process per GPU under ``torchrun``, or a single process.

``torchrun --nproc_per_node=N`` (add ``--nnodes``/``--rdzv_endpoint`` for several machines) starts
N copies of the program with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` set; :func:`init_runtime` reads them (``env://``), picks ``cuda:LOCAL_RANK`` when
there is a GPU, and joins the process group: nccl on GPUs, gloo on CPUs. Without torchrun it is
one process on ``cuda:0`` or the CPU. ``python -m m2f_lite.distributed`` takes torchrun's
arguments and runs it, but ends a Ctrl-C or SIGTERM with exit 130/143 and one line, as one
process does (:func:`launch`), where torchrun itself exits 1 with a traceback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Process 0 logs, draws the progress bar and writes the checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_runtime(device: str = "auto") -> Runtime:
    """The device and, under torchrun, the process group.

    ``device`` (``cfg.device``): ``"auto"`` is ``cuda:LOCAL_RANK`` when a GPU is visible, else the
    CPU; ``"cpu"`` or ``"cuda"`` force one (``"cuda"`` without a GPU is an error).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={device!r}: expected 'auto', 'cpu' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA GPU is visible (use device=cpu)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return Runtime(rank=rank, world_size=world_size, device=device)


def any_process(flag: bool, rt: Runtime) -> bool:
    """True if ``flag`` is true in any process; every process must call it at the same point."""
    if not rt.distributed:
        return flag
    t = torch.tensor([float(flag)], device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: Any, rt: Runtime) -> list[Any]:
    """``obj`` from every process, in rank order (a one-item list in a single process)."""
    if not rt.distributed:
        return [obj]
    out: list[Any] = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


def launch(argv: list[str]) -> int:
    """``python -m m2f_lite.distributed [torchrun options] -m m2f_lite.cli train ...``: torchrun,
    ending a stop by signal as one process does.

    torchrun itself turns a Ctrl-C or SIGTERM into exit status 1 and a traceback
    (``SignalException``, or ``ChildFailedError`` when the workers exit 130/143 after saving),
    although every process has saved and stopped as asked. This runs torchrun's own launcher
    (``torch.distributed.run``) and returns 128 + the signal instead, with one line; any other
    failure is torchrun's report, unchanged. torchrun forwards the signal to the workers and
    waits ``--shutdown_timeout`` seconds for them to save (default 30) before killing them.
    """
    import signal
    import sys

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except SignalException as e:  # torchrun was signalled; it stopped the workers first
        code = 128 + int(e.sigval)
    except ChildFailedError as e:  # the workers exited non-zero: by a signal, all of them?
        codes = {f.exitcode for f in e.failures.values()}
        if len(codes) != 1 or not codes <= {128 + signal.SIGINT, 128 + signal.SIGTERM}:
            raise
        code = codes.pop()
    else:
        return 0
    print(f"m2f-lite: stopped by {signal.Signals(code - 128).name} (exit {code})", file=sys.stderr)
    return code


if __name__ == "__main__":
    import sys

    sys.exit(launch(sys.argv[1:]))
