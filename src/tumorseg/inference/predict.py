"""`tumorseg predict`: a checkpoint (or several) and cases of any layout -> segmentations in the
scans' space, case after case (`case.predict_case`: preprocessing as training's, sliding windows
over the brain, labels in each scan's grid and label convention).

The next case is read and the last one written while the network works on the current one;
outputs are written atomically, cases already predicted by the same model and settings are
skipped, and the ranks of a torchrun job share the cases, each predicted once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Collection, Sequence

import numpy as np
from torch import nn
from tqdm import tqdm

from ..bars import progress_bar
from ..devices import amp_dtype, describe
from ..errors import TumorsegError
from ..io import nifti_whole
from ..layouts import Case, discover_cases
from ..log import say
from .case import load_input, predict_case
from .compiled import COMPILED_SAVES, COMPILED_SAVES_ONNX, compile_pays
from .outputs import check_one_model, made_by_others, output_paths, scans_digest, write_outputs
from .postprocess import NO_COMPONENT_STEP
from .predictor import Predictor
from .ranks import alone, claim, launcher_pid, meet, rank_world, shard
from .window import flip_dims, passes


@dataclass
class PredictResult:
    """What a predict run did: cases predicted and their files written, cases skipped (outputs
    existed), cases failed."""

    out_dir: Path
    predicted: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    report: Path | None = None


def _runtime_line(predictor: Predictor, amp: str) -> str:
    """Device, precision and engine; why a requested precision is not the one running."""
    if predictor.engine == "mixed":
        return (f"{describe(predictor.device, amp, predictor.amp_dtype)}, PyTorch and ONNX Runtime "
                "(networks of the ensemble)")
    if predictor.engine != "onnx":
        runtime = "PyTorch" if predictor.engine == "torch" else "PyTorch compiled (torch.compile)"
        return f"{describe(predictor.device, amp, predictor.amp_dtype)}, {runtime}"
    if amp_dtype(amp, predictor.device, predicting=True) is None:
        return f"{describe(predictor.device, amp, None)}, ONNX Runtime"
    return f"{describe(predictor.device, 'off', None)}, ONNX Runtime (its graph is float32; amp {amp} is PyTorch's)"


def _compile_if_it_pays(predictor: Predictor, seconds: float, passes_left: int, bar: tqdm | None) -> Predictor:
    """`predict --engine auto` after its first sliding-window pass: the predictor compiled where, at
    that pass's pace (`seconds`, in PyTorch or ONNX Runtime), the passes left win back the compiling
    (`compiled.compile_pays`); else as it is."""
    # an ensemble compiles each of its networks: its pass must pay for all of them
    if not compile_pays(seconds / predictor.members, passes_left,
                        COMPILED_SAVES_ONNX if predictor.engine == "onnx" else COMPILED_SAVES):
        return predictor
    if bar is not None:
        say(f"predict: {seconds:.0f} s per sliding-window pass, {passes_left} passes to go: compiling the "
            "network (torch.compile)")
    fast = predictor.compiled()
    return predictor if fast.model.failure else fast  # failed: the path that ran the first pass, not eager PyTorch


def _failure(case: Case, exc: BaseException) -> str:
    if isinstance(exc, TumorsegError):
        return str(exc)
    return f"{case.case_id}: {type(exc).__name__}: {exc}"  # a resource problem (GPU memory) or a bug: still name it


def predict(
    checkpoint: str | Path | Sequence[str | Path] | Predictor,
    input_dir: str | Path,
    out_dir: str | Path,
    device: str = "auto",
    tta: bool | None = None,
    postprocess: bool = True,
    probabilities: bool = False,
    force: bool = False,
    plots: bool = False,
    overlap: float | None = None,
    progress: bool = True,
    labels: str | None = None,
    amp: str = "auto",
    uncertainty: bool = False,
    report: bool = False,
    engine: str = "auto",
    window: str | Sequence[int] | None = None,
    cases: Collection[str] | None = None,
    redo_others: bool = False,
    distributed: bool = True,
) -> PredictResult:
    """Segment every BraTS case under `input_dir` into `out_dir/<case_id>.nii.gz`.

    Args:
        checkpoint: a tumorseg checkpoint (`best.pt` of a run; a folder of cross-validation folds:
            their ensemble), several (their ensemble: `Predictor.from_checkpoints`), or a loaded
            `Predictor` (used as it is, except that `overlap`, `tta`, `labels`, `window` when given
            replace its own).
        input_dir: one case folder, a folder of them, or a dataset: any layout `layouts`
            knows; segmentations are not needed.
        out_dir: where predictions go (created if needed).
        device: "auto", "cpu" or "cuda".
        tta: flip test-time augmentation; None uses the checkpoint's setting.
        postprocess: apply the checkpoint's post-processing (False: the network's raw labels).
        probabilities: also write `<case_id>_probabilities.nii.gz`, float32 (X, Y, Z, K).
        force: predict cases whose outputs already exist (otherwise they are skipped).
        plots: also write `<case_id>.png`, slices with the prediction overlaid.
        overlap: sliding-window overlap in [0, 1); None: a Predictor's own, else 0.5.
        progress: show a progress bar.
        labels: label convention of the written files (a name of `labels.CONVENTIONS`: "brats2020",
            "brats2023", "msd", "peds2024");
            None writes each case in its input layout's own convention.
        amp: mixed precision, "auto" (bf16 where the GPU or CPU computes it natively, fp16 on
            older GPUs, else float32), "bf16", "fp16" or "off".
        uncertainty: also write `<case_id>_uncertainty.nii.gz`, float32: the mutual information
            between prediction and flip over the TTA flips, in bits (needs TTA).
        report: afterwards, write the `tumorseg report` of the predictions to `out_dir/report`.
        engine: "auto" (ONNX Runtime where the CPU predicts in float32, for the networks it runs
            faster, where installed; else PyTorch; either compiled after the first sliding-window
            pass where, at its pace, the passes left (TTA flips, cases) win the compiling back:
            `compiled.compile_pays`), "torch", "compile" or "onnx".
        window: sliding-window size (three sides, multiples of the network's divisor; None: the
            training patch); a side larger than the brain's box means one window across it, and
            "box" one window over the whole box.
        cases: only the cases of these ids (None: all under `input_dir`).
        redo_others: predict again this run's cases whose files another model (or other settings)
            made, instead of refusing the run (the demo's own folder, after more training).
        distributed: under torchrun (RANK, WORLD_SIZE set), share the cases with the other ranks,
            each of which must call `predict` too; False: this process predicts every case.

    A folder holds one model's predictions (`Predictor.made_by`, in each label file's header): a
    run that would keep files another model made is refused in one line. A failing case is
    reported in one line and recorded in the result; the others go on. Under `torchrun` (one
    process per GPU, any number of nodes) each rank predicts its share of the cases (`shard`);
    outputs are written atomically, so a re-run skips what is done.
    """
    given = dict(locals())
    switches = {"tta": tta, "postprocess": postprocess, "probabilities": probabilities, "force": force, "plots": plots,
                "uncertainty": uncertainty, "report": report, "distributed": distributed}
    wrong = [f"{k}={v!r}" for k, v in switches.items() if v is not None and not isinstance(v, (bool, np.bool_))]
    if wrong:  # bool("no") is True: a notebook's tta="no" would silently run the 8 flips
        raise TumorsegError(f"predict: {', '.join(wrong)}: give True or False")
    if not distributed and rank_world()[1] > 1:  # torchrun's variables, but a call of this process's own
        with alone():
            return predict(**{**given, "distributed": True})
    launcher = launcher_pid()
    out_dir = Path(out_dir)
    found = discover_cases(input_dir, only=cases)
    if isinstance(checkpoint, Predictor):
        predictor = checkpoint.with_settings(tta, overlap, labels, window)
    else:
        predictor = Predictor.from_checkpoints(checkpoint, device=device, tta=tta, labels=labels, amp=amp,
                                               engine=engine, overlap=0.5 if overlap is None else overlap, window=window)
        if progress:
            say(f"predict: {_runtime_line(predictor, amp)}")
        if predictor.engine == "compile" and predictor.fixed_window():
            predictor.warm_up()  # compiles before the first case
        elif predictor.engine == "compile":
            say("note: windows larger than the training patch differ from case to case; the network compiles "
                "again for each new size")
    if not postprocess:
        predictor = replace(predictor, largest_tumour=False, et_threshold=None, min_component=NO_COMPONENT_STEP,
                            postprocess_source=None, statistics=None)
    if progress and rank_world()[0] == 0:
        say(f"predict: {predictor.settings_line()}")
    if uncertainty and not predictor.tta:
        raise TumorsegError("--uncertainty comes from the TTA flips: add --tta (or use a checkpoint trained with --tta)")
    mine = shard(found)
    planned = {case.case_id: output_paths(out_dir, case.case_id, probabilities, plots, uncertainty) for case in mine}
    made_by = predictor.made_by()
    with claim(out_dir, [p.name for paths in planned.values() for p in paths]):
        run_ids = {c.case_id for c in found}
        other, unknown, recorded = made_by_others(out_dir, made_by, run_ids if force else set())
        check_one_model(out_dir, other, run_ids, redo_others)
        if unknown and rank_world()[0] == 0:
            say(f"note: {out_dir}: {len(unknown)} prediction(s) there record no model (tumorseg wrote them before "
                "it recorded one): kept as they are; --force redoes them")
        result = PredictResult(out_dir=out_dir)
        todo = []
        damaged, changed = [], []
        for case in mine:
            done = not force and case.case_id not in other and all(p.exists() for p in planned[case.case_id])
            if done and not all(nifti_whole(p) for p in planned[case.case_id] if p.suffix == ".gz"):
                done = False  # emptied or cut short since it was written (a full disk, a copy): redone
                damaged.append(case.case_id)
            elif done and case.case_id in recorded and recorded[case.case_id] != scans_digest(case, predictor.channels):
                done = False  # other scans under the case's name: labels of the old ones would pass for theirs
                changed.append(case.case_id)
            if done:
                result.skipped.append(case.case_id)
            else:
                todo.append(case)
        for cases_of, why in ((damaged, "with a damaged prediction file"),
                              (changed, "whose scans changed since they were predicted")):
            if cases_of:
                say(f"note: {out_dir}: {len(cases_of)} case(s) {why}, predicted again: "
                    f"{', '.join(cases_of[:3])}{', ...' if len(cases_of) > 3 else ''}")
        bar = progress_bar(total=len(todo), desc="predict", unit="case", disable=not progress)
        # Reading the next case and writing the previous one overlap with the network's work.
        with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
            loading = reader.submit(load_input, predictor, todo[0]) if todo else None
            writes = []
            # until a pass over a case has shown the pace; a Predictor given is used as it is
            timing = engine == "auto" and not isinstance(checkpoint, Predictor) and predictor.may_compile()
            per_case = passes(len(flip_dims(predictor.tta)))

            def paced(seconds: float, passes_left: int) -> nn.Module | None:
                nonlocal predictor, timing
                if not timing:  # the first pass decided
                    return None
                timing = False
                left = passes_left + per_case * (len(todo) - i - 1)  # this case's, then the other cases'
                predictor = _compile_if_it_pays(predictor, seconds, left, bar if progress else None)
                return predictor.model if predictor.engine == "compile" else None

            for i, case in enumerate(todo):
                current, loading = loading, reader.submit(load_input, predictor, todo[i + 1]) if i + 1 < len(todo) else None
                try:
                    pred = predict_case(predictor, case, probabilities, current.result(), uncertainty,
                                        paced if timing else None)
                    writes.append((case, writer.submit(write_outputs, pred, case, planned[case.case_id], probabilities, plots,
                                                       made_by, scans_digest(case, predictor.channels))))
                except Exception as exc:  # noqa: BLE001 - one line naming the case, the others go on
                    result.failed[case.case_id] = _failure(case, exc)
                    say(f"error: {result.failed[case.case_id]}")
                bar.update(1)
            for case, future in writes:
                try:
                    result.written.extend(future.result())
                    result.predicted.append(case.case_id)
                except Exception as exc:  # noqa: BLE001
                    result.failed[case.case_id] = _failure(case, exc)
                    say(f"error: {result.failed[case.case_id]}")
        bar.close()
    # Under torchrun every rank waits for all (an early exit would make torchrun stop the others),
    # and the report, of all the cases, is rank 0's alone.
    meet("predicted", launcher)
    if report and rank_world()[0] == 0:
        from ..evaluation.evaluate import find_predictions
        from ..report import report as write_report  # matplotlib only when asked for

        if find_predictions(out_dir)[0]:  # every case failed: their lines say why, no empty report
            result.report = write_report(out_dir, images=input_dir, out=out_dir / "report", progress=progress).index
    meet("reported", launcher)
    return result
