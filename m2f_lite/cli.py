"""The ``m2f-lite`` command line: data, train, eval, predict, convert, export, weights, eval-files, bench,
ablate.

Each sub-command is a small function here that parses its arguments and calls the package; the
work lives in the modules (``m2f_lite.data``, ``m2f_lite.engine``, ...). Errors a user can fix
(a missing file, an unknown override) print one line, ``m2f-lite: error: ...``, and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

from m2f_lite import atomic_io
from m2f_lite.data import synthetic


class UserError(Exception):
    """An error caused by the user's input: printed as one line, without a traceback."""


OVERRIDES_HELP = "dotted config overrides, e.g. --model.num_queries=50 or solver.max_iter=300"


def _add_run(sub: argparse._SubParsersAction) -> None:
    from m2f_lite.presets import PRESETS  # plain dicts: cheap to import

    t = sub.add_parser(
        "train",
        help="train a preset (torchrun --nproc_per_node=N -m m2f_lite.cli train ... for DDP)",
        epilog=textwrap.fill("presets: " + ", ".join(PRESETS), 88) + f"\n\n{OVERRIDES_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("preset", help="a preset name (m2f_lite.config.PRESETS), e.g. shapes_tiny")
    t.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in output_dir"
    )
    t.add_argument("--resume-from", metavar="CKPT", help="continue from this checkpoint file")
    t.set_defaults(func=_cmd_train, takes_overrides=True)

    e = sub.add_parser(
        "eval", help="evaluate a checkpoint (or a preset --weights W)", epilog=OVERRIDES_HELP
    )
    e.add_argument(
        "model", metavar="CHECKPOINT_OR_PRESET", help="a .pt checkpoint, or a preset name"
    )
    e.add_argument("--weights", help="weights for a preset (an m2f-lite checkpoint)")
    e.add_argument("--json", metavar="FILE", help="also write the metrics to this json file")
    e.set_defaults(func=_cmd_eval, takes_overrides=True)

    p = sub.add_parser(
        "predict",
        help="segment images: overlay PNG + raw segmentation files",
        epilog=OVERRIDES_HELP,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    p.add_argument("--weights", required=True, help="an m2f-lite checkpoint (train or convert)")
    p.add_argument(
        "--task",
        default=None,
        choices=("panoptic", "instance", "semantic"),
        help="default: the checkpoint's first task of panoptic, instance, semantic",
    )
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.set_defaults(func=_cmd_predict, takes_overrides=True)

    c = sub.add_parser(
        "convert",
        help="official detectron2 .pkl/.pth or an HF folder -> m2f-lite checkpoint "
        "(--to transformers: the other way, to an HF folder)",
    )
    c.add_argument("src", help="official checkpoint file, or a local HF transformers model folder")
    c.add_argument("dst", help="the m2f-lite checkpoint to write (.pt)")
    c.add_argument("--source", default="auto", choices=("auto", "detectron2", "transformers"))
    c.add_argument(
        "--preset", default=None, help="the preset the weights belong to (default: guessed)"
    )
    c.add_argument(
        "--to",
        default="m2f-lite",
        choices=("m2f-lite", "transformers"),
        help="transformers: SRC is an m2f-lite checkpoint, DST the HF folder to write "
        "(save_pretrained layout)",
    )
    c.set_defaults(func=_cmd_convert)

    x = sub.add_parser("export", help="the network -> ONNX (onnxruntime) or torch.export (.pt2)")
    x.add_argument("checkpoint", help="an m2f-lite checkpoint (.pt)")
    x.add_argument("out", help="the file to write (.onnx or .pt2)")
    x.add_argument("--format", required=True, choices=("onnx", "torch-export"))
    x.add_argument(
        "--size",
        metavar="HxW",
        default=None,
        help="a fixed input size, multiples of 32 (required for Swin); default: dynamic H, W",
    )
    x.set_defaults(func=_cmd_export)

    w = sub.add_parser(
        "weights",
        help="download an official checkpoint (m2f_lite.weights.model_zoo), verify, convert",
    )
    w.add_argument("name", help="a model zoo row = its preset name, e.g. coco_panoptic_r50")
    w.add_argument("--root", default="weights", help="folder for the weights (default: weights)")
    w.set_defaults(func=_cmd_weights)

    b = sub.add_parser(
        "bench",
        help="speed/memory benchmark (benchmarks/bench_model.py)",
        epilog="its own options after --, e.g. m2f-lite bench -- --help",
    )
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for bench_model.py")
    b.set_defaults(func=_cmd_bench)

    # listed for --help; main() hands everything after "ablate" to m2f_lite.ablations' own parser
    sub.add_parser(
        "ablate",
        help="the paper's ablations on the shapes data, several seeds (m2f-lite ablate --help)",
        add_help=False,
    )


def _config(name: str, overrides: list[str]):
    from m2f_lite.config import get_config

    return get_config(name, overrides)


def _print_metrics(metrics: dict, json_path: str | None = None) -> None:
    import json

    from m2f_lite.metrics.eval_files import format_results

    print(format_results(metrics))
    if json_path:
        from m2f_lite.atomic_io import atomic_write_text

        atomic_write_text(json_path, json.dumps(metrics, indent=2))


def _cmd_train(args: argparse.Namespace) -> None:
    from m2f_lite.engine import train
    from m2f_lite.train_log import headline

    cfg = _config(args.preset, args.overrides)
    if args.resume and args.resume_from:
        raise UserError("give --resume or --resume-from, not both")
    atomic_io.check_output_dir(cfg.output_dir, "output_dir")
    synthetic.ensure_dataset(cfg, (cfg.data.train_split, cfg.data.val_split))
    result = train(cfg, resume=args.resume_from or args.resume)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun, process 0 reports
    if result["interrupted"]:
        if main_process:
            print(
                f"stopped at iteration {result['iteration']}; saved {result['checkpoint']}; continue with --resume",
                file=sys.stderr,
            )
        raise SystemExit(128 + result["interrupted"])  # every process: 130 / 143, as one process
    if not main_process:
        return
    if result["metrics"]:
        _print_metrics(result["metrics"])
        summary = ", ".join(f"{k} {v:.1f}" for k, v in headline(result["metrics"]).items())
        print(
            f"{cfg.name}: {summary} after {result['iteration']} iterations, {result['seconds'] / 60:.1f} min"
        )
    print(f"checkpoint: {result['checkpoint']}")


def _cmd_eval(args: argparse.Namespace) -> None:

    from m2f_lite import checkpoint as ckpt
    from m2f_lite.config import apply_overrides
    from m2f_lite.engine import evaluate
    from m2f_lite.modeling.mask2former import build_model

    atomic_io.check_output_file(args.json, "--json")  # before the evaluation, not after it
    if Path(args.model).is_file():
        if args.weights:
            raise UserError(f"{args.model} is a checkpoint: --weights is for a preset")
        state = ckpt.load_checkpoint(args.model)
        cfg = apply_overrides(ckpt.checkpoint_config(state, args.model), args.overrides)
        weights = args.model
    else:
        from m2f_lite.config import PRESETS

        if args.model not in PRESETS:
            raise FileNotFoundError(f"{args.model}: no such checkpoint file, and not a preset name")
        cfg = _config(args.model, args.overrides)
        weights = args.weights or cfg.weights
        if not weights:
            raise UserError(f"{args.model!r} is not a file; for a preset give --weights CHECKPOINT")
        state = ckpt.load_checkpoint(weights)
    model = build_model(cfg)
    ckpt.load_model_state(model, state["model"], source=weights)
    synthetic.ensure_dataset(cfg, (cfg.data.val_split,))
    import torch

    model.to("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    _print_metrics(evaluate(cfg, model), args.json)


def _cmd_predict(args: argparse.Namespace) -> None:

    from m2f_lite.predictor import Predictor, register_image, write_prediction

    atomic_io.check_output_dir(args.out, "--out")
    if args.device:
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise UserError(f"--device {args.device}: {e}") from e
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise UserError(
                f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
    predictor = Predictor.from_checkpoint(
        args.weights, device=args.device, overrides=args.overrides
    )
    args.task = args.task or predictor.tasks[0]
    if args.task not in predictor.tasks:
        raise UserError(
            f"--task {args.task}: {args.weights} predicts {', '.join(predictor.tasks)} "
            f"(add --inference.{args.task}_on=true to predict it anyway)"
        )
    for image in args.images:
        if not Path(image).is_file():
            raise FileNotFoundError(f"image {image}: no such file")
        # only the task written, compact (label map, RLE masks): memory bounded by the image
        result = predictor(image, tasks=(args.task,), compact=True)
        image_id, stem = register_image(args.out, image)  # keyed by the path: stable, unique
        files = write_prediction(
            predictor, result, args.task, args.out, stem=stem, image_id=image_id
        )
        print(f"{image}: " + ", ".join(str(f) for f in files))


def _cmd_convert(args: argparse.Namespace) -> None:
    from m2f_lite.weights.convert import convert_main

    if args.to == "transformers":  # m2f-lite checkpoint -> HF folder
        from m2f_lite.weights.transformers import to_transformers_main

        print(to_transformers_main(args.src, args.dst))
        return
    report = convert_main(args.src, args.dst, source=args.source, preset=args.preset)
    print(report)
    print(f"wrote {args.dst}")


def _cmd_export(args: argparse.Namespace) -> None:
    from m2f_lite.export import export_main  # the export logic lives in m2f_lite/export.py

    print(export_main(args.checkpoint, args.out, format=args.format, size=args.size))


def _cmd_weights(args: argparse.Namespace) -> None:
    from m2f_lite.weights.model_zoo import ZOO, download_weights

    if args.name not in ZOO:
        raise UserError(f"weights {args.name!r}: not a model zoo row; one of: {', '.join(ZOO)}")
    print(f"wrote {download_weights(args.name, args.root)}")  # DownloadError: _run


def _cmd_bench(args: argparse.Namespace) -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_model.py"
    if not script.is_file():
        raise UserError(
            f"{script} not found: `m2f-lite bench` runs the repository's benchmarks/bench_model.py (clone the repository)"
        )
    spec = importlib.util.spec_from_file_location("bench_model", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    module.main(argv)


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as the one line ``m2f-lite: error: ...`` (exit 2)."""

    def error(self, message: str) -> None:
        print(f"m2f-lite: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="m2f-lite", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from m2f_lite.data.cli import add_data_commands  # the `data` group lives with the data code

    add_data_commands(sub)
    from m2f_lite.metrics.eval_files import add_eval_files_command  # scores files on disk

    add_eval_files_command(sub)
    _add_run(sub)
    from m2f_lite.grade import add_grade_command  # students' notebooks, with the checks

    add_grade_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before torch starts OpenMP (libgomp): spin briefly, then sleep, while threads wait for each
    # other. On a busy CPU a spinning thread burns the time slice its descheduled sibling needs.
    # Measured, a shapes_tiny step on 2 cores, one of them busy with another program: 4.7 s with
    # the default spin, 0.48 s with 1000; on idle cores 0.20-0.23 s against 0.23-0.24 s.
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["ablate"]:  # its own options, parsed by m2f_lite.ablations
        from m2f_lite import ablations

        return _run(lambda: ablations.main(argv[1:]))
    parser = build_parser()
    # train/eval/predict take dotted overrides (`--model.num_queries=50` or `model.num_queries=50`),
    # which argparse does not know: they come back as the unknown arguments.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    return _run(lambda: args.func(args))


def _message(e: BaseException) -> str:
    """The error's message. One raised in a DataLoader worker comes back as "Caught DatasetError
    in DataLoader worker process 0. Original Traceback (most recent call last): ..." (torch's
    ``ExceptionWrapper``): its last line, less the class name, is the original message."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.strip().splitlines()[-1]  # "m2f_lite.data.files.DatasetError: <message>"
        return last.split(": ", 1)[-1]
    return text


def _run(command) -> int:
    """Run a sub-command: errors a user can fix as one line (exit 2), Ctrl-C as exit 130."""
    from m2f_lite.data.download import DownloadError  # a download or an archive failed

    try:
        command()
    except (UserError, FileNotFoundError, ValueError, DownloadError) as e:
        print(f"m2f-lite: error: {_message(e)}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # a non-finite loss with solver.nonfinite_loss=stop
        print(f"m2f-lite: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("m2f-lite: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
