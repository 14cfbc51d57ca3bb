"""The ``m2f-lite data`` commands: make the synthetic shapes, download, prepare or check datasets.

``m2f_lite.cli`` adds this group to the ``m2f-lite`` parser; the work lives in the data modules.
"""

from __future__ import annotations

import argparse


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="make, download, prepare or check datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)

    s = dsub.add_parser(
        "synthetic",
        help="write the synthetic shapes dataset (COCO panoptic/instances + semantic PNGs)",
    )
    s.add_argument("--out", default="data/shapes", help="output folder (default: data/shapes)")
    s.add_argument("--n-train", type=int, default=500, help="training images (default: 500)")
    s.add_argument("--n-val", type=int, default=100, help="validation images (default: 100)")
    s.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.set_defaults(func=_cmd_data_synthetic)

    names = ("coco", "ade20k", "cityscapes")
    d = dsub.add_parser("download", help="download, verify and extract coco, ade20k or cityscapes")
    d.add_argument("name", choices=names)
    d.add_argument("--root", default="data", help="folder that holds the datasets (default: data)")
    d.set_defaults(func=_cmd_data_download)

    pr = dsub.add_parser(
        "prepare",
        help="make the derived files (coco: panoptic_semseg; cityscapes: trainIds, panoptic)",
    )
    pr.add_argument("name", choices=names)
    pr.add_argument("--root", default="data", help="folder that holds the datasets (default: data)")
    pr.add_argument("--workers", type=int, default=1, help="processes for coco (default: 1)")
    pr.set_defaults(func=_cmd_data_prepare)

    c = dsub.add_parser(
        "check", help="validate a dataset folder and list every problem (exit 1 on errors)"
    )
    c.add_argument(
        "path",
        help="dataset folder (the shapes/coco_custom layout, coco/ or ADEChallengeData2016/)",
    )
    c.add_argument(
        "--format", default="auto", choices=("auto", "coco_panoptic", "coco_instance", "semantic")
    )
    c.add_argument(
        "--num-classes", type=int, default=None, help="for semantic labels (default: from the JSON)"
    )
    c.add_argument(
        "--limit", type=int, default=None, help="check only the first N images of each split"
    )
    c.set_defaults(func=_cmd_data_check)


def _cmd_data_synthetic(args: argparse.Namespace) -> None:
    from m2f_lite.data import synthetic

    synthetic.main(args)


def _cmd_data_download(args: argparse.Namespace) -> None:
    from m2f_lite.data.download import download

    download(args.name, args.root)  # a DownloadError is one line: m2f_lite.cli._run


def _cmd_data_prepare(args: argparse.Namespace) -> None:
    from m2f_lite.data.prepare import prepare

    prepare(args.name, args.root, workers=args.workers)


def _cmd_data_check(args: argparse.Namespace) -> None:
    from m2f_lite.data import check

    rc = check.main(args.path, fmt=args.format, num_classes=args.num_classes, limit=args.limit)
    if rc:
        raise SystemExit(rc)
