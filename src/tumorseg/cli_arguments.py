"""The `tumorseg` command line's words: each command's arguments, their types and help, and the
parsing that reads them (`parse`). The commands themselves are in `cli`."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from . import __version__
from .errors import TumorsegError
from .labels import CONVENTIONS, parse_channels
from .layouts import LAYOUTS

LABEL_CONVENTIONS: tuple[str, ...] = tuple(CONVENTIONS)


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected case ids separated by commas, got '{text}'")
    return names


def _challenge(text: str) -> str:
    from .evaluation.lesionwise import challenge_name

    try:
        return challenge_name(text)  # any spelling: gli, BraTS-MET
    except TumorsegError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _window(text: str) -> str | tuple[int, ...]:
    if text.strip().lower() == "box":
        return "box"
    try:
        return _ints(3)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected one or three integers or 'box', got '{text}'") from None


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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got '{text}'")
    return value


def _floats(n: int):
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(p) for p in text.replace("x", ",").split(",") if p.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {n} numbers, got '{text}'") from None
        values = values * n if len(values) == 1 else values
        if len(values) != n or min(values) <= 0:
            raise argparse.ArgumentTypeError(f"expected {n} positive numbers, got '{text}'")
        return values

    return parse


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got '{text}'") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tumorseg", description="Brain tumour segmentation for BraTS MRI.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices  # command -> its parser, for `parse`

    p = sub.add_parser("synth", help="write synthetic BraTS-format cases")
    p.add_argument("out_dir", type=Path, help="where the case folders are written")
    p.add_argument("--cases", type=int, default=8, help="how many cases (default 8)")
    p.add_argument("--shape", type=_ints(3), default=(240, 240, 155), metavar="X,Y,Z",
                   help="volume size (default BraTS's 240,240,155)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same cases (default 0)")
    p.add_argument("--dtype", choices=("int16", "float32"), default="int16", help="image data type (real scans: int16)")
    p.add_argument("--layout", choices=LAYOUTS, default="brats2020",
                   help="dataset layout: file names, 4D files, dataset.json and label convention")

    p = sub.add_parser("cases", help="write a cases.csv of a folder's cases for you to check, the modalities of "
                                     "scans named by series (dcm2niix) guessed")
    p.add_argument("data_dir", type=Path, help="the patients' scans: a folder of NIfTI files per patient, named by "
                                               "series (3_t1_mprage_sag.nii.gz), or any layout")
    p.add_argument("out", type=Path, help="the case list to write (.csv); prepare, predict, evaluate and show read it")
    p.add_argument("--force", action="store_true", help="replace OUT where it exists")

    p = sub.add_parser("prepare", help="BraTS case folders -> training arrays (.npy) + manifest")
    p.add_argument("data_dir", type=Path, help="BraTS download, folder of case folders, one case folder, or a cases.csv naming each "
                        "case's files")
    p.add_argument("out_dir", type=Path, help="the prepared folder: images/, masks/, manifest.json")
    p.add_argument("--recipe", help="take the settings of a named recipe (seed, brats-cpu, brats-gpu); flags override")
    p.add_argument("--channels", type=parse_channels, help="comma list or 'all' (default: t2,t1ce,flair)")
    p.add_argument("--norm", choices=("minmax", "zscore"), help="default minmax (defaults here: without --recipe)")
    p.add_argument("--crop", type=_ints(3), metavar="X,Y,Z", help="default 128,128,128")
    p.add_argument("--crop-mode", choices=("fixed", "brain"), help="default fixed (the seed's window)")
    p.add_argument("--min-tumour", type=float, help="drop cases with less tumour in the crop (default 0.01)")
    p.add_argument("--val-fraction", type=float, help="share of the cases kept for validation (default 0.25)")
    p.add_argument("--seed", type=int, help="seed of the train/val split (default 42)")
    p.add_argument("--spacing", type=_floats(3), metavar="X,Y,Z",
                   help="voxel size in mm the network sees (default: the data's median, 1 mm for BraTS)")
    p.add_argument("--cavity", choices=("keep", "drop"),
                   help="BraTS 2024 resection cavity (label 4): its own class, or background (required when present)")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")
    p.add_argument("--force", action="store_true", help="redo cases already prepared")

    p = sub.add_parser("train", help="train a network on a prepared folder")
    p.add_argument("prepared_dir", type=Path, help="a folder tumorseg prepare wrote")
    p.add_argument("run_dir", type=Path, help="checkpoints, metrics.csv, curves.png and config.yaml go here")
    p.add_argument("--recipe", help="start from a named recipe: seed, brats-cpu, brats-gpu (config file and flags override)")
    p.add_argument("--config", type=Path, help="YAML, TOML or JSON file of settings (flags override it)")
    p.add_argument("--model", help="unet3d (ours), unet, unet-lite (MONAI UNet, logits at half size), segresnet or dynunet (MONAI)")
    p.add_argument("--filters", type=_int_list, help="widths per level, e.g. 16,32,64,128,256")
    p.add_argument("--epochs", type=int, help="epochs to train (default 100; with --max-minutes an upper bound)")
    p.add_argument("--batch-size", type=int, help="patches per step (default 2)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-4)")
    p.add_argument("--patch", type=_ints(3), metavar="X,Y,Z", help="random patches of this size (default: whole crop)")
    p.add_argument("--target", choices=("labels", "regions"), help="4 softmax classes (seed) or 3 sigmoid regions")
    p.add_argument("--schedule", choices=("none", "cosine", "poly"), help="learning-rate schedule (default none)")
    p.add_argument("--augment", choices=("none", "light", "heavy"), help="data augmentation (default light)")
    p.add_argument("--steps-per-epoch", type=int, help="batches per epoch (default: one pass over the cases)")
    p.add_argument("--max-minutes", type=float, help="wall-clock training budget; stops after the epoch that spends it")
    p.add_argument("--workers", type=int, help="data loader processes (default 0: in the training process)")
    p.add_argument("--val-every", type=int, help="validate every N epochs, and after the last (default 1; the brats "
                   "recipes 10): best.pt and the post-processing come from the validated epochs")
    p.add_argument("--seed", type=int, help="seed of weights, data order and augmentation (default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto: a GPU where there is one")
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"),
                   help="mixed precision (auto: on GPUs native bf16, else fp16 with a scaler; the CPU trains in "
                        "float32, or bf16 if asked for and native)")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="deterministic GPU algorithms: bitwise repeatable and exactly resumable, slower")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="record flip test-time augmentation as the checkpoint's inference setting")
    p.add_argument("--postprocess", action=argparse.BooleanOptionalAction, default=None,
                   help="choose the post-processing on validation, for prediction: largest tumour only, small ET "
                        "as necrosis (Dice), small components per region (lesion-wise Dice)")
    p.add_argument("--fold", type=int, help="train this fold (0..FOLDS-1) of a cross-validation over all prepared "
                   "cases instead of the prepared split, into RUN_DIR/fold_K; predict RUN_DIR ensembles the folds")
    p.add_argument("--folds", type=int, help="folds of the cross-validation (default 5; the same for every fold)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt (RUN_DIR/fold_K/last.pt)")

    p = sub.add_parser("evaluate", help="BraTS region metrics (Dice, HD95, sensitivity, specificity; BraTS 2023+ "
                                        "lesion-wise Dice and HD95) per case + summary")
    p.add_argument("pred_dir", type=Path, help="folder of <case>.nii.gz predictions (label convention from their header)")
    p.add_argument("gt_dir", type=Path,
                   help="ground truth: cases of any layout, segmentation-only case folders, a folder of <case>.nii.gz, "
                        "or a cases.csv")
    p.add_argument("--out", type=Path, help="per-case CSV (default PRED_DIR/metrics.csv); summary JSON beside it")
    p.add_argument("--labels", choices=LABEL_CONVENTIONS,
                   help="the ground truth's label convention (default: detected from its layout)")
    p.add_argument("--pred-labels", choices=LABEL_CONVENTIONS,
                   help="the predictions' label convention (default: the tag predict writes, else the truth's)")
    p.add_argument("--challenge", type=_challenge, metavar="{GLI,PED,SSA,MEN,MET,GoAT}",
                   help="lesion-wise metric parameters (default: from BraTS-XXX- case ids, else GLI)")
    p.add_argument("--workers", type=int, default=1, help="cases scored in parallel processes (default 1)")
    p.add_argument("--cases", type=_names, metavar="ID,ID", help="only these cases of GT_DIR (default: all)")
    p.add_argument("--only-predicted", action="store_true",
                   help="only the cases of GT_DIR that have a prediction (default: a case without one is scored "
                        "as failed, as BraTS does)")

    p = sub.add_parser("predict", help="segment new cases into NIfTI in their original space")
    p.add_argument("checkpoint", type=Path, nargs="+", metavar="MODEL",
                   help="best.pt or last.pt of a training run (the run folder: its best.pt), or a .onnx from tumorseg "
                        "export; several, or a folder of folds (train --fold): their ensemble, probabilities averaged")
    p.add_argument("input", type=Path, help="a case folder, a folder of case folders, or a cases.csv naming each case's files "
                        "(segmentations not needed)")
    p.add_argument("out_dir", type=Path, help="where <case>.nii.gz predictions go (created; finished cases skipped)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                   help="mixed precision (auto: bf16 where the GPU or CPU computes it natively, CPUs with "
                        "AVX512-BF16 or AMX; fp16 on older GPUs; else float32. off: float32, the labels of "
                        "ONNX Runtime and of machines without bf16)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test-time augmentation (default: as the checkpoint says)")
    p.add_argument("--overlap", type=float, default=0.5,
                   help="sliding-window overlap (default 0.5; less is faster and moves some labels)")
    p.add_argument("--window", type=_window, metavar="X,Y,Z|box",
                   help="sliding-window size, one number for a cube, multiples of the network's downsampling (16 "
                        "for the recipes; default: the training patch); 'box' or larger than the brain: one window "
                        "over the brain's box. Fewer, larger windows are faster but change the labels (README, "
                        "Measured)")
    p.add_argument("--engine", choices=("auto", "torch", "compile", "onnx"), default="auto",
                   help="what runs the network: PyTorch, PyTorch through torch.compile (7-18 s to compile here, "
                        "then 0.44-0.64x the time per case for UNet3D and DynUNet), or ONNX Runtime (float32). auto: "
                        "ONNX Runtime where the CPU predicts in float32 (no native bf16, or --amp off) for networks "
                        "it runs faster, else PyTorch; on the CPU, UNet3D and DynUNet with the training patch as "
                        "window are compiled after the first sliding-window pass where the passes left (TTA "
                        "flips, cases) win the compiling back")
    p.add_argument("--no-postprocess", dest="postprocess", action="store_false",
                   help="skip the checkpoint's post-processing (raw network output)")
    p.add_argument("--probabilities", action="store_true", help="also write <case>_probabilities.nii.gz")
    p.add_argument("--plots", action="store_true", help="also write <case>.png with the prediction overlaid")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write <case>_uncertainty.nii.gz: the TTA flips' disagreement (mutual information, bits)")
    p.add_argument("--report", action="store_true", help="then write the HTML report (tumorseg report) to OUT/report")
    p.add_argument("--labels", choices=LABEL_CONVENTIONS,
                   help="label convention of the written files (default: the input layout's own)")
    p.add_argument("--force", action="store_true", help="redo cases already predicted")
    p.add_argument("--cases", type=_names, metavar="ID,ID", help="only these cases of INPUT (default: all)")

    p = sub.add_parser("show", help="plot slices of a case with ground truth and prediction overlaid")
    p.add_argument("case", type=Path, help="a raw case folder (or one of its files), a dataset folder or cases.csv "
                                           "with --case, or a prepared images/<case>.npy")
    p.add_argument("--pred", type=Path, help="a prediction (.nii.gz, or .npy for prepared cases)")
    p.add_argument("--case", dest="case_id", metavar="ID",
                   help="the case to draw of a dataset folder or cases.csv (default: the one --pred is named for)")
    p.add_argument("--out", type=Path, help="PNG file (default: <case>.png here)")
    p.add_argument("--slice", type=int,
                   help="the file's slice index, as a viewer numbers it (default: the slice with the most tumour)")
    p.add_argument("--view", choices=("all", "axial", "coronal", "sagittal"), default="all")
    p.add_argument("--pred-labels", choices=LABEL_CONVENTIONS,
                   help="the prediction's label convention (default: the tag predict writes, else the case's)")

    p = sub.add_parser("demo", help="the whole pipeline on built-in synthetic data (or --data DIR) on the CPU")
    p.add_argument("work_dir", type=Path, nargs="?", default=Path("demo_out"),
                   help="where data, run and predictions go (default demo_out; run again to resume)")
    p.add_argument("--data", type=Path, help="a real BraTS download to run on instead of synthetic cases")
    p.add_argument("--epochs", type=_positive, help="training epochs (default 40)")

    p = sub.add_parser("export", help="a checkpoint -> one ONNX model carrying its settings")
    p.add_argument("checkpoint", type=Path, help="best.pt or last.pt of a training run (the run folder: its best.pt)")
    p.add_argument("out", type=Path, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 13-20 (default 17)")

    p = sub.add_parser("report", help="volumes, RANO diameters, warnings: an HTML report of a folder of predictions")
    p.add_argument("pred_dir", type=Path, help="folder of <case>.nii.gz predictions (and <case>_uncertainty.nii.gz)")
    p.add_argument("--images", type=Path, metavar="DATA_DIR",
                   help="the cases' dataset (or cases.csv): modalities in the views, brain-edge check")
    p.add_argument("--gt", type=Path, metavar="GT_DIR", help="ground truth: BraTS metrics per case as columns")
    p.add_argument("--out", type=Path, metavar="DIR", help="report folder (default PRED_DIR/report)")
    p.add_argument("--pred-labels", choices=LABEL_CONVENTIONS,
                   help="the predictions' label convention (default: the tag predict writes, else the images' "
                        "or the truth's dataset's, else guessed from the values; said in the case's notes)")
    for p in sub.choices.values():
        p.set_defaults(subparser=p)  # for `parse`'s errors
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; an unknown option is the command's error (its usage, not the top level's),
    with the nearest option it has. A command's options may stand between its positionals
    (`predict A.pt B.onnx --force DATA OUT`): argparse alone would end the models at the option."""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not words or words[0] not in parser.commands:  # --help, --version, no or an unknown command: argparse's say
        return parser.parse_args(words)
    args, unknown = parser.commands[words[0]].parse_known_intermixed_args(words[1:])
    args.command = words[0]
    if unknown:
        options = [o for action in args.subparser._actions for o in action.option_strings]
        hints = [f"{u} (did you mean {near[0]}?)" if (near := difflib.get_close_matches(u.split("=")[0], options, 1))
                 else u for u in unknown]
        args.subparser.error(f"unrecognized arguments: {' '.join(hints)}")
    return args
