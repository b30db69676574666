"""The `tumorseg` command: a thin argparse shell over the Python API.

Heavy libraries (torch, MONAI, nibabel) are imported inside each command so `--help` is
instant. A `TumorsegError` becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import TumorsegError


def _ints(n: int):
    def parse(text: str) -> tuple[int, ...]:
        parts = text.replace("x", ",").split(",") if isinstance(text, str) else text
        try:
            values = tuple(int(p) for p in parts if str(p).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {n} integers, got '{text}'") from None
        if len(values) == 1:
            values = values * n
        if len(values) != n:
            raise argparse.ArgumentTypeError(f"expected {n} integers, got '{text}'")
        return values

    return parse


def _channels(text: str) -> tuple[str, ...]:
    from .labels import MODALITIES

    return MODALITIES if text == "all" else tuple(c.strip().lower() for c in text.split(",") if c.strip())


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import synthesize

    paths = synthesize(args.out_dir, args.cases, shape=args.shape, seed=args.seed, dtype=args.dtype)
    print(f"wrote {len(paths)} synthetic cases to {args.out_dir}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import PrepareConfig, prepare

    config = PrepareConfig(
        channels=args.channels,
        norm=args.norm,
        crop_size=args.crop,
        crop_mode=args.crop_mode,
        min_tumour=args.min_tumour,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    result = prepare(args.data_dir, args.out_dir, config, workers=args.workers, force=args.force)
    counts = result.manifest["counts"]
    split = result.manifest["split"]
    print(
        f"prepared {args.out_dir}: {counts['kept']} kept ({len(split['train'])} train, {len(split['val'])} val), "
        f"{counts['dropped']} dropped, {counts['unlabelled']} unlabelled, {counts['failed']} failed"
        + (f", {result.skipped} already done" if result.skipped else "")
    )
    if result.failed:
        print(f"{len(result.failed)} case(s) failed; see {Path(args.out_dir) / 'manifest.json'}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tumorseg", description="Brain tumour segmentation for BraTS MRI.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write synthetic BraTS-format cases")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--shape", type=_ints(3), default=(240, 240, 155), metavar="X,Y,Z")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("int16", "float32"), default="int16", help="image data type (real scans: int16)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="BraTS case folders -> training arrays (.npy) + manifest")
    p.add_argument("data_dir", type=Path, help="BraTS download, folder of case folders, or one case folder")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--channels", type=_channels, default=("t2", "t1ce", "flair"), help="comma list or 'all' (default: t2,t1ce,flair)")
    p.add_argument("--norm", choices=("minmax", "zscore"), default="minmax")
    p.add_argument("--crop", type=_ints(3), default=(128, 128, 128), metavar="X,Y,Z")
    p.add_argument("--crop-mode", choices=("fixed", "brain"), default="fixed")
    p.add_argument("--min-tumour", type=float, default=0.01, help="drop cases with less tumour in the crop")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=42, help="seed of the train/val split")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")
    p.add_argument("--force", action="store_true", help="redo cases already prepared")
    p.set_defaults(func=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TumorsegError as exc:
        print(f"tumorseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tumorseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
