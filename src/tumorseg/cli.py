"""The `tumorseg` command: a thin argparse shell over the Python API (its arguments: `cli_arguments`).

Heavy libraries (torch, MONAI, nibabel) are imported inside each command so `--help` is
instant. A `TumorsegError` becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

from .bars import end_bars
from .cli_arguments import build_parser, parse
from .errors import Terminated, TumorsegError

__all__ = ["build_parser", "main", "parse", "run"]


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import synthesize

    paths = synthesize(args.out_dir, args.cases, shape=args.shape, seed=args.seed, dtype=args.dtype, layout=args.layout)
    print(f"wrote {len(paths)} synthetic cases ({args.layout} layout) to {args.out_dir}")
    return 0


def cmd_cases(args: argparse.Namespace) -> int:
    from .layouts import propose_case_list, write_case_list

    if args.out.exists() and not args.force:
        raise TumorsegError(f"{args.out}: exists; --force replaces it")
    if args.out.suffix.lower() not in (".csv", ".tsv"):
        raise TumorsegError(f"{args.out}: a case list is a .csv file (prepare and predict read it by its suffix)")
    rows = propose_case_list(args.data_dir)
    path = write_case_list(rows, args.out)
    guessed = [r for r in rows if r.source == "series names"]
    print(f"wrote {path}: {len(rows)} case(s), {len(guessed)} of them guessed from series names")
    for row in guessed:
        files = ", ".join(f"{kind} {p.name}" for kind, p in row.files.items()) or "no file"
        print(f"  {row.case_id}: {files}" + "".join(f"\n    {note}" for note in row.notes))
    if guessed:
        print(f"check the guessed files (a T1 after contrast taken for one before would go unnoticed), then: "
              f"tumorseg predict MODEL {path} OUT")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import PrepareConfig, prepare
    from .recipes import load_recipe

    values = {**PrepareConfig().to_dict(), **(load_recipe(args.recipe)["prepare"] if args.recipe else {})}
    flags = {"channels": args.channels, "norm": args.norm, "crop_size": args.crop, "crop_mode": args.crop_mode,
             "min_tumour": args.min_tumour, "val_fraction": args.val_fraction, "seed": args.seed,
             "spacing": args.spacing, "cavity": args.cavity}
    config = PrepareConfig.from_dict({**values, **{k: v for k, v in flags.items() if v is not None}})
    result = prepare(args.data_dir, args.out_dir, config, workers=args.workers, force=args.force)
    counts = result.manifest["counts"]
    split = result.manifest["split"]
    print(
        f"prepared {args.out_dir}: {counts['kept']} kept ({len(split['train'])} train, {len(split['val'])} val), "
        f"{counts['dropped']} dropped, {counts['unlabelled']} unlabelled, {counts['failed']} failed"
        + (f", {result.skipped} already done" if result.skipped else "")
    )
    used = result.manifest["settings"]
    print(f"settings: channels {','.join(used['channels'])}, {used['norm']} scaling, crop "
          f"{'x'.join(map(str, used['crop_size']))} ({used['crop_mode']}), min tumour {used['min_tumour'] * 100:g}%, "
          f"spacing {'x'.join(f'{v:g}' for v in used['spacing'])} mm (recorded in manifest.json)")
    if result.failed:
        print(f"{len(result.failed)} case(s) failed; see {Path(args.out_dir) / 'manifest.json'}", file=sys.stderr)
        return 1
    return 0


TRAIN_FLAGS = ("model", "filters", "epochs", "batch_size", "lr", "patch", "target", "schedule", "augment",
               "steps_per_epoch", "max_minutes", "workers", "val_every", "seed", "device", "amp", "deterministic", "tta",
               "postprocess", "fold", "folds")


def cmd_train(args: argparse.Namespace) -> int:
    from .training import resolve_config, train
    from .recipes import load_recipe
    from .training.config import read_config_file, resumed_config
    from .training.run_files import fold_dir

    overrides = {k: getattr(args, k) for k in TRAIN_FLAGS}
    for key in ("filters", "patch"):
        if overrides[key] is not None:
            overrides[key] = list(overrides[key])
    fold = args.fold if args.fold is not None else read_config_file(args.config).get("fold") if args.config else None
    resumed_fold = args.resume and args.run_dir.name.startswith("fold_") and args.run_dir.name[5:].isdigit()
    if args.folds is not None and fold is None and not resumed_fold:  # a fold's folder: its config.yaml has it
        raise TumorsegError("train: --folds sets the folds of a cross-validation; give the fold to train with --fold K "
                            f"(0..{args.folds - 1})")
    run_file = fold_dir(args.run_dir, fold) / "config.yaml"
    config = None
    if args.resume and run_file.is_file():  # a resumed run keeps its settings; a --config file and flags override
        config = resumed_config(run_file, args.config, overrides)
        differ = []
        if args.recipe:  # the recipe's settings (flags over them) against the run's
            asked = resolve_config(None, {**overrides, "fold": config.fold, "folds": config.folds}, recipe=args.recipe)
            run, recipe_keys = config.to_dict(), load_recipe(args.recipe)["train"]
            differ = [f"{k} {run[k]} in the run, {v} in the recipe" for k, v in asked.to_dict().items()
                      if k in recipe_keys and run[k] != v]
        if differ:  # silently keeping the run's settings would ignore the recipe asked for
            raise TumorsegError(f"{run_file.parent}: --recipe {args.recipe} is not the run's settings ({'; '.join(differ[:4])}"
                                f"{'; ...' if len(differ) > 4 else ''}): --resume goes on with the run's; drop --recipe "
                                "(flags still change what may change) or start a new run")
    config = config or resolve_config(args.config, overrides, recipe=args.recipe)  # recipe < file < flags
    result = train(args.prepared_dir, args.run_dir, config, resume=args.resume, resume_with="--resume")
    best = f"best mean Dice {result.best_metric:.3f} at epoch {result.best_epoch}" if result.best_epoch else "no validation"
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print(f"trained {len(result.history)} epochs; {best}; checkpoints in {result.run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate

    out = args.out or args.pred_dir / "metrics.csv"
    earlier = args.out is None and Path(out).is_file()  # the default file: a second truth folder's scores replace it
    result = evaluate(args.pred_dir, args.gt_dir, out_csv=out, workers=args.workers, labels=args.labels,
                      challenge=args.challenge, pred_labels=args.pred_labels, cases=args.cases,
                      only_predicted=args.only_predicted)
    print(result.report())
    if earlier:
        print(f"note: {out} held earlier scores and now holds these (--out FILE keeps both)")
    return 1 if result.failed or result.truth_errors else 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .inference import predict

    result = predict(args.checkpoint if len(args.checkpoint) > 1 else args.checkpoint[0], args.input, args.out_dir, device=args.device, tta=args.tta,
                     postprocess=args.postprocess, probabilities=args.probabilities, force=args.force,
                     plots=args.plots, overlap=args.overlap, labels=args.labels, amp=args.amp,
                     uncertainty=args.uncertainty, report=args.report, engine=args.engine, window=args.window,
                     cases=args.cases)
    rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    print(f"{rank}predicted {len(result.predicted)} case(s) into {args.out_dir}"
          + (f", {len(result.skipped)} already done (--force to redo them)" if result.skipped else "")
          + (f", {len(result.failed)} failed" if result.failed else "")
          + (f"; report: open {result.report}" if result.report else ""), flush=True)  # torchrun may stop us next
    return 1 if result.failed else 0


def cmd_show(args: argparse.Namespace) -> int:
    from .plots import save_case_plot

    views = ("axial", "coronal", "sagittal") if args.view == "all" else (args.view,)
    path = save_case_plot(args.case, pred=args.pred, out=args.out, slice_index=args.slice, views=views,
                          case_id=args.case_id, pred_labels=args.pred_labels)
    print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    settings = DemoSettings(epochs=args.epochs) if args.epochs is not None else DemoSettings()
    result = run_demo(args.work_dir, data=args.data, settings=settings)
    return 1 if result.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import report

    result = report(args.pred_dir, images=args.images, gt=args.gt, out=args.out, pred_labels=args.pred_labels)
    for message in result.failed.values():
        print(message, file=sys.stderr)
    print(f"reported {len(result.cases)} case(s)" + (f", {len(result.failed)} failed" if result.failed else "")
          + f": open {result.index} (table: {result.csv})")
    return 1 if result.failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    from .inference.onnx_model import export_onnx

    path = export_onnx(args.checkpoint, args.out, opset=args.opset)
    print(f"wrote {path} (ONNX opset {args.opset}); predict with: tumorseg predict {path} CASES OUT")
    return 0


COMMANDS = {"synth": cmd_synth, "cases": cmd_cases, "prepare": cmd_prepare, "train": cmd_train,
            "evaluate": cmd_evaluate, "predict": cmd_predict, "show": cmd_show, "demo": cmd_demo, "export": cmd_export,
            "report": cmd_report}


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, _stop_now)  # a second one: the clean-up is stuck, or not wanted
    raise Terminated


def _stop_now(signum: int, frame: object) -> None:
    with contextlib.suppress(OSError):
        os.write(2, b"tumorseg: terminated again: stopping without cleaning up\n")
    os._exit(128 + signal.SIGTERM)


def run() -> None:
    """The `tumorseg` command (and `python -m tumorseg`). A file name that is not UTF-8 (an old
    zip's `patient_\xe9`) is written as its own bytes, as `ls` writes it, not as a traceback."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):  # a stream that is no text file keeps its own
            stream.reconfigure(errors="surrogateescape")
    sys.unraisablehook = unraisable_hook
    sys.exit(main())


REDELIVER_S = 0.05  # seconds before an interrupt Python swallowed is delivered again


def unraisable_hook(unraisable: "sys.UnraisableHookArgs") -> None:
    """Python's hook for errors it can only report (in `__del__`, in a fork's lock callbacks), for
    what a SIGTERM or Ctrl-C leaves there while torch's DataLoader starts its workers:
    - the interrupt itself, raised inside logging's fork callback where Python swallows it: the run
      went on, then failed on its killed workers. It is delivered again, where it stops the run;
    - the half-made iterator's `__del__` missing an attribute (`_workers`): a traceback after the
      run's own last line, left out.
    Any other goes to Python's hook."""
    exc = unraisable.exc_value
    if isinstance(exc, KeyboardInterrupt):  # `Terminated` is one
        on_main = threading.current_thread() is threading.main_thread()
        if isinstance(exc, Terminated) and on_main:
            signal.signal(signal.SIGTERM, _terminate)  # `_terminate` had armed the second one's hard stop
        again = threading.Timer(REDELIVER_S, os.kill,  # after this hook: raised in it, it would be swallowed again
                                (os.getpid(), signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT))
        again.daemon = True
        again.start()
        return
    if not (isinstance(exc, AttributeError) and "DataLoaderIter" in repr(unraisable.object)):
        sys.__unraisablehook__(unraisable)


def main(argv: list[str] | None = None) -> int:
    """Run one command line (`argv`: its words after `tumorseg`; None: the program's); returns its exit code."""
    args = parse(argv)
    on_main = threading.current_thread() is threading.main_thread()  # signal handlers live there
    before = signal.signal(signal.SIGTERM, _terminate) if on_main else None
    try:
        return COMMANDS[args.command](args)
    except TumorsegError as exc:
        end_bars()
        print(f"tumorseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        end_bars()
        terminated = isinstance(exc, Terminated)
        print(f"tumorseg {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + signal.SIGTERM if terminated else 130
    finally:
        if on_main:  # main() called from Python (tests, a notebook) leaves the caller's handler as it was
            signal.signal(signal.SIGTERM, before)


if __name__ == "__main__":
    run()
