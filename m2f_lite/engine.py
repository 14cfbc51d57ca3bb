"""Training and evaluation: one readable loop (nanoGPT style) with AMP, DDP, checkpoints and resume.

``train(cfg)`` runs ``cfg.solver.max_iter`` optimizer steps. One step (:func:`forward_backward`):

1. ``grad_accum`` micro-batches: the forward pass under ``torch.autocast`` (``solver.amp``: fp16 with a
   ``GradScaler`` as the official recipes, or bf16), the set criterion (``criterion.total``: Σ λ·loss over all the predictions, 10
   in the official config) divided by ``grad_accum``, backward; under DDP gradients are averaged
   over processes on the last micro-batch only (``no_sync`` before it). The criterion normalises
   each micro-batch by its own number of masks (over all processes, as the official), so the
   accumulated gradient is the mean of the micro-batches' gradients: the big batch's exactly when
   the micro-batches hold as many masks, a re-weighting of images otherwise;
2. the whole model's gradient norm is clipped (``solver.clip_value``: 0.01 in the official recipes);
3. a NaN/inf loss or gradient norm is caught: ``solver.nonfinite_loss="skip"`` drops the step,
   ``"stop"`` ends the run with the iteration in the message; otherwise AdamW steps and the
   learning rate follows its schedule (``m2f_lite.optim``).

Around it: the data stream of ``m2f_lite.sampler`` (the same images per step for any number of
processes, and resumable); a checkpoint every ``checkpoint_period`` steps and ``model_final.pt``
(``m2f_lite.checkpoint``, with every process's RNG state, so a resumed run repeats the
uninterrupted one bit for bit on the CPU); evaluation every ``eval_period`` steps and at the end;
a progress bar (loss, lr, it/s, ETA), ``log.jsonl`` and ``loss.png`` (``m2f_lite.train_log``).
Ctrl-C or SIGTERM finishes the step (or the image being evaluated), saves a checkpoint and returns
(``result["interrupted"]`` is the signal number; the CLI exits with 128 + it); ``kill -9`` loses
the steps since the last one, and the next run removes the temporary file a killed save left.
One run at a time holds ``output_dir`` (:class:`OutputDirLock`).

Several GPUs or machines: ``torchrun --nproc_per_node=N -m m2f_lite.cli train PRESET`` (see
``m2f_lite.distributed``); ``solver.ims_per_batch`` stays the global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import socket
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

try:
    import fcntl  # POSIX: the output_dir lock
except ImportError:  # Windows
    fcntl = None

from m2f_lite import checkpoint as ckpt
from m2f_lite.atomic_io import atomic_write_text, remove_stale_temporaries
from m2f_lite.config import Config
from m2f_lite.criterion import build_criterion, pad_target_masks
from m2f_lite.data.build import build_dataset, collate
from m2f_lite.data.files import DatasetError
from m2f_lite.distributed import Runtime, any_process, gather_objects, init_runtime
from m2f_lite.evaluation import EvaluationStopped, autocast_dtype, evaluate
from m2f_lite.modeling.mask2former import build_model
from m2f_lite.optim import build_lr_scheduler, build_optimizer
from m2f_lite.sampler import build_train_loader
from m2f_lite.train_log import TrainLog, headline, peak_memory_mb

OOM_ADVICE = (
    "out of GPU memory. Try, one at a time: a smaller solver.ims_per_batch (the global batch), or "
    "the same batch in pieces with solver.grad_accum=2 (or 4); mixed precision if it is off, "
    "solver.amp=fp16 (the official) or solver.amp=bf16; fewer sampled points, e.g. loss.num_points=6272; a smaller data.image_size or "
    "data.crop_size."
)
TERMS = (
    "loss",
    "loss_ce",
    "loss_mask",
    "loss_dice",
)  # logged: the total and the final prediction's


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global RNG, which libraries may use)
    torch.manual_seed(seed)


class StopOnSignal:
    """Remember a Ctrl-C (SIGINT) or SIGTERM so that the loop can finish its step and save.

    A second signal raises ``KeyboardInterrupt`` at once, unless it comes within
    ``REPEAT_S`` seconds of the first: under torchrun a Ctrl-C reaches every process twice (from
    the terminal, then forwarded by torchrun's agent), which must still save. Outside the main
    thread (where Python cannot install handlers) this does nothing.
    """

    REPEAT_S = 2.0

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if time.monotonic() - self._first < self.REPEAT_S:
                return  # the same stop, forwarded by torchrun
            raise KeyboardInterrupt
        self.signum, self._first = signum, time.monotonic()
        name = signal.Signals(signum).name
        print(
            f"\n{name}: finishing this step, then saving a checkpoint (again: quit without saving)",
            file=sys.stderr,
        )

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def forward_backward(
    ddp: nn.Module,
    criterion: nn.Module,
    batches,
    scaler: torch.amp.GradScaler,
    *,
    rt: Runtime,
    dtype: torch.dtype | None,
    grad_accum: int,
) -> tuple[dict[str, float], float]:
    """Steps 1 of the module doc: gradients of one global batch. Returns the loss terms (summed
    over micro-batches, each divided by ``grad_accum``) and the seconds spent waiting for data."""
    terms, data_time = dict.fromkeys(TERMS, 0.0), 0.0
    for micro in range(grad_accum):
        t = time.perf_counter()
        images, targets = next(batches)
        data_time += time.perf_counter() - t
        images = [x.to(rt.device, non_blocking=True) for x in images]
        targets = [{k: y[k].to(rt.device) for k in ("labels", "masks")} for y in targets]
        last = micro == grad_accum - 1
        with ddp.no_sync() if rt.distributed and not last else nullcontext():
            with torch.autocast(
                rt.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
            ):
                outputs = ddp(images)
                # the model pads its input; targets are padded the same way (bottom, right)
                losses = criterion(outputs, pad_target_masks(targets, outputs["padded_size"]))
                loss = criterion.total(losses) / grad_accum
            scaler.scale(loss).backward()
        terms["loss"] += loss.item()
        for k in TERMS[1:]:
            terms[k] += losses[k].item() / grad_accum
    return terms, data_time


class OutputDirBusy(ValueError):
    """Another training run holds the lock on ``output_dir``; the message names the folder."""


class OutputDirLock:
    """One training run per ``output_dir``: an exclusive ``fcntl.flock`` on its ``.m2f_lite.lock``.

    A second run into the same folder is refused (:class:`OutputDirBusy`) instead of interleaving
    ``log.jsonl`` and replacing the first run's checkpoints. The operating system releases the
    lock when the process ends, ``kill -9`` included, so a dead run never blocks the next one;
    the file keeps the holder's pid and host for the message. Process 0 takes the lock and
    tells the others (all processes raise together). Holding it, process 0 also removes the
    temporary files a killed save left (``atomic_io.remove_stale_temporaries``). No ``fcntl``
    (Windows): no lock.
    """

    NAME = ".m2f_lite.lock"

    def __init__(self, folder: Path, rt: Runtime) -> None:
        self.folder, self.rt, self._file = folder, rt, None

    def __enter__(self) -> OutputDirLock:
        holder = None
        if self.rt.main and fcntl is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._file = open(self.folder / self.NAME, "a+")  # held until __exit__
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._file.seek(0)
                holder = self._file.read().strip() or "another process"
                self._file.close()
                self._file = None
            else:
                self._file.seek(0)
                self._file.truncate()
                self._file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
                self._file.flush()
                remove_stale_temporaries(self.folder)
        if any_process(holder is not None, self.rt):
            raise OutputDirBusy(
                f"output_dir {self.folder} is in use by another training run ({holder or 'see process 0'}); "
                "wait for it to end, or give another output_dir"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def train(
    cfg: Config, *, resume: bool | str | os.PathLike = False, progress: bool = True
) -> dict[str, Any]:
    """Train ``cfg`` (module doc). ``resume``: ``True`` continues from the newest checkpoint in
    ``cfg.output_dir`` (or starts if there is none), a path continues from that file.
    ``progress=False`` hides the progress bars (the JSONL log is written either way). The run
    holds ``output_dir`` (:class:`OutputDirLock`): a second run into it is refused.

    Returns ``{"iteration", "checkpoint", "metrics", "skipped_steps", "interrupted", "seconds"}``.
    """
    rt = init_runtime(cfg.device)
    with OutputDirLock(Path(cfg.output_dir), rt):
        return _train(cfg, rt, resume=resume, progress=progress)


def _train(
    cfg: Config, rt: Runtime, *, resume: bool | str | os.PathLike, progress: bool
) -> dict[str, Any]:
    """:func:`train`'s body, run while ``output_dir`` is locked."""
    s, t_start, out = cfg.solver, time.perf_counter(), Path(cfg.output_dir)
    path = ckpt.latest_checkpoint(out) if resume is True else (Path(resume) if resume else None)
    state = None
    if path is not None:
        state = ckpt.load_checkpoint(path)
        if "iteration" not in state or "optimizer" not in state:
            raise ckpt.CheckpointError(
                f"{path}: weights only, no training state; to start from it set weights={path}"
            )
        if int(state["iteration"]) > s.max_iter:  # the schedule would be past its end
            raise ValueError(
                f"{path}: saved at iteration {state['iteration']}, beyond "
                f"solver.max_iter={s.max_iter}; resume with solver.max_iter >= {state['iteration']}"
            )
        allowed = ckpt.check_resume_config(ckpt.checkpoint_config(state, path), cfg, path=path)
        if allowed and rt.main:
            print(f"resuming {path} with: " + "; ".join(allowed), file=sys.stderr)

    seed_everything(cfg.seed)  # the same initial weights in every process
    model = build_model(cfg).to(rt.device)
    criterion = build_criterion(cfg).to(rt.device)
    if state is None and cfg.weights:
        ckpt.load_weights(model, cfg.weights)
    if cfg.model.backbone_norm == "syncbn" and rt.distributed:
        if rt.device.type == "cuda":  # MODEL.RESNETS.NORM "SyncBN": global-batch statistics
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameters, same keys
        elif rt.main:
            print(
                "model.backbone_norm=syncbn: no SyncBatchNorm on CPUs; BN per process",
                file=sys.stderr,
            )
    optimizer = build_optimizer(cfg, model)
    dtype = autocast_dtype(s.amp, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=dtype == torch.float16)
    seed_everything(cfg.seed + rt.rank)  # then each process its own randomness (point sampling)
    start_iter = 0
    if state is not None:
        ckpt.load_model_state(model, state["model"], source=str(path))
        optimizer.load_state_dict(state["optimizer"])
        if scaler.is_enabled() and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        start_iter = int(state["iteration"])
        if len(state["rng"]) == rt.world_size:
            ckpt.set_rng_state(state["rng"][rt.rank])
        elif rt.main:
            print(
                f"{path}: saved by {len(state['rng'])} processes, resumed by {rt.world_size}: fresh random states",
                file=sys.stderr,
            )
    scheduler = build_lr_scheduler(cfg, optimizer, last_iter=start_iter - 1)
    device_ids = [rt.device.index] if rt.device.type == "cuda" else None
    ddp = (
        nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if rt.distributed
        else model
    )

    train_set = build_dataset(cfg, cfg.data.train_split, train=True)
    if len(train_set) == 0:
        raise DatasetError(
            f"no images in data.train_split={cfg.data.train_split!r}: nothing to train on",
            file=cfg.data.root,
        )
    loader = build_train_loader(
        train_set,
        global_batch=s.ims_per_batch,
        collate_fn=collate,
        world_size=rt.world_size,
        rank=rt.rank,
        grad_accum=s.grad_accum,
        seed=cfg.seed,
        start_iter=start_iter,
        num_workers=cfg.data.num_workers,
        pin_memory=rt.device.type == "cuda",
    )
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", cfg.to_json())
    log = TrainLog(out, enabled=rt.main, resume_from=start_iter if state is not None else None)

    def save(name: str, iteration: int) -> Path:
        rngs = gather_objects(ckpt.rng_state(), rt)  # collective: every process calls save
        if rt.main:
            ckpt.save_checkpoint(
                out / name,
                model=model,
                config=cfg,
                iteration=iteration,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler if scaler.is_enabled() else None,
                sampler=loader.batch_sampler.state(iteration),
                extra={"rng": rngs, "meta": dataclasses.asdict(train_set.meta)},
            )
        return out / name

    def run_eval(iteration: int) -> dict[str, dict[str, float]] | None:
        """The metrics; ``None`` when a Ctrl-C or SIGTERM stopped the evaluation (the caller
        saves and stops): a signal is answered after the current image, not the whole split."""
        rng = ckpt.rng_state()  # evaluating must not change the training's random stream
        try:
            metrics = evaluate(
                cfg,
                model,
                progress=rt.main and progress,
                stop=lambda: any_process(stop.signum is not None, rt),
            )
        except EvaluationStopped:
            return None
        finally:
            ckpt.set_rng_state(rng)
        if rt.main:
            log.append({"iteration": iteration, "eval": headline(metrics), "metrics": metrics})
            log.plot(out / "loss.png")
            summary = ", ".join(f"{k} {v:.1f}" for k, v in headline(metrics).items())
            tqdm.write(f"iteration {iteration}: {summary}")
        return metrics

    head = next(
        (g for g in optimizer.param_groups if g.get("name") == "head"), optimizer.param_groups[0]
    )
    batches, window, skipped, metrics, saved, iteration = iter(loader), [], 0, {}, path, start_iter
    bar = tqdm(
        total=s.max_iter,
        initial=start_iter,
        disable=not (rt.main and progress),
        dynamic_ncols=True,
        desc=cfg.name,
    )
    model.train()
    with StopOnSignal() as stop, contextlib.closing(bar):  # closed before an error prints
        # `iteration` counts the optimizer steps done, this one included
        for iteration in range(start_iter + 1, s.max_iter + 1):
            t0 = time.perf_counter()
            try:
                terms, data_time = forward_backward(
                    ddp, criterion, batches, scaler, rt=rt, dtype=dtype, grad_accum=s.grad_accum
                )
                scaler.unscale_(optimizer)  # a no-op without fp16; clipping sees true gradients
                grad_norm = float(
                    torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip_value or math.inf)
                )
            except torch.OutOfMemoryError:
                print(f"m2f-lite: iteration {iteration}: {OOM_ADVICE}", file=sys.stderr)
                raise
            # (an inf gradient under fp16 is the GradScaler's business: it skips and rescales)
            bad_grad = not scaler.is_enabled() and not math.isfinite(grad_norm)
            if any_process(not math.isfinite(terms["loss"]) or bad_grad, rt):
                what = f"non-finite loss ({terms['loss']}) or gradient norm ({grad_norm})"
                if s.nonfinite_loss == "stop":
                    last = f"the last checkpoint is {saved}" if saved else "no checkpoint was saved"
                    raise FloatingPointError(
                        f"iteration {iteration}: {what}; stopping (solver.nonfinite_loss=stop); {last}"
                    )
                skipped += 1
                tqdm.write(
                    f"iteration {iteration}: {what}; step skipped ({skipped} so far)",
                    file=sys.stderr,
                )
                if scaler.is_enabled():
                    scaler.update()
            else:
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()

            window.append(
                {
                    **terms,
                    "time": time.perf_counter() - t0,
                    "data_time": data_time,
                    "grad_norm": grad_norm,
                }
            )
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss']:.3f}", lr=f"{head['lr']:.2e}", refresh=False)
            if iteration % s.log_period == 0 or iteration == s.max_iter:
                means = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                log.append(
                    {
                        "iteration": iteration,
                        **means,
                        "lr": head["lr"],
                        "memory_mb": peak_memory_mb(rt.device),
                        "skipped": skipped,
                    }
                )
                window = []
            if iteration == s.max_iter:
                break  # the final checkpoint and evaluation follow
            stopping = any_process(stop.signum is not None, rt)
            if iteration % s.checkpoint_period == 0 or stopping:
                saved = save(ckpt.checkpoint_name(iteration), iteration)
            if stopping:
                break
            if s.eval_period > 0 and iteration % s.eval_period == 0:
                evaluated = run_eval(iteration)
                if evaluated is None:  # stopped by a signal: save this iteration, then stop
                    if iteration % s.checkpoint_period != 0:
                        saved = save(ckpt.checkpoint_name(iteration), iteration)
                    break
                metrics = evaluated
        bar.close()
        if iteration == s.max_iter and skipped == iteration - start_iter > 0:
            raise FloatingPointError(  # not a trained model: no model_final.pt, no success
                f"all {skipped} steps had a non-finite loss or gradient norm and were skipped "
                "(solver.nonfinite_loss=skip): the weights never changed; no model_final.pt written"
            )
        if iteration == s.max_iter and start_iter < s.max_iter:
            saved = save("model_final.pt", iteration)
            if s.eval_period > 0:
                evaluated = run_eval(iteration)  # None: stopped, model_final.pt is saved
                metrics = evaluated if evaluated is not None else metrics
        if rt.main:
            log.plot(out / "loss.png")
    return {
        "iteration": iteration,
        "checkpoint": str(saved) if saved else None,
        "metrics": metrics,
        "skipped_steps": skipped,
        "interrupted": stop.signum,  # None unless a signal stopped the training or evaluation
        "seconds": time.perf_counter() - t_start,
    }
