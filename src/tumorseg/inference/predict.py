"""`tumorseg predict`: a checkpoint and cases of any layout -> segmentations in the scans' space.

Each case is preprocessed exactly as `prepare` did for training (the checkpoint records the
channels, normalisation and spacing): its modalities on one grid, reoriented to the canonical
orientation and resampled to the training spacing (`geometry`; BraTS scans pass untouched),
then over the whole brain rather than the training crop: the brain's bounding box, padded to
at least the patch size and to a multiple of the network's divisor, goes through
sliding-window inference (optionally with flip TTA). Probabilities (not labels) go back into
the scan's exact grid, and the labels are written in the input layout's label convention
(or `labels`) with the scan's affine and header, so they open aligned with it in any viewer.
The header's description records the convention for `evaluate`.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..devices import amp_dtype, autocast, describe
from ..errors import TumorsegError
from ..geometry import Grid, resample_box
from ..io import nifti_whole
from ..labels import CLASS_ABBREVIATIONS, REGIONS, LabelConvention
from ..layouts import Case, discover_cases
from ..prepare.case import (check_brain_size, check_headers, check_intensities, load_channels, scaled_window,
                            to_network_grid)
from ..prepare.crop import Box, bounding_box, brain_mask, uncrop
from .compiled import COMPILED_SAVES, COMPILED_SAVES_ONNX, compile_pays
from .outputs import check_one_model, made_by_others, output_paths, scans_digest, write_outputs
from .postprocess import NO_COMPONENT_STEP, postprocess
from .predictor import Predictor
from .ranks import alone, claim, launcher_pid, meet, rank_world, shard
from .window import flip_dims, passes, to_labels, tta_probabilities

class CasePrediction(NamedTuple):
    """One case predicted in its original grid.

    labels: raw labels of `convention`, uint8 (X, Y, Z).
    probabilities: float32 (K, X, Y, Z) network probabilities (before postprocessing), or None.
    affine, header: those of the case's reference scan (the grid of every output).
    convention: the label convention of `labels`.
    uncertainty: float32 (X, Y, Z) flip disagreement in bits (`window.flip_uncertainty`), or None.
    channels: what each of the K probability channels is (`probability_channels`).
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    affine: np.ndarray
    header: Any
    convention: LabelConvention
    uncertainty: np.ndarray | None = None
    channels: tuple[str, ...] = ()


def probability_channels(target: str, k: int) -> tuple[str, ...]:
    """The meaning of each probability channel: the regions WT, TC, ET (sigmoid, overlapping) or
    the training classes BG, NCR, ED, ET (softmax; a fifth, RC the resection cavity, when a run keeps it)."""
    return REGIONS if target == "regions" else tuple(CLASS_ABBREVIATIONS[:k])


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


def inference_box(brain: np.ndarray, patch: tuple[int, ...], divisor: int) -> Box:
    """The brain's bounding box grown (about its centre) to >= `patch` and a multiple of `divisor`.

    The box may reach outside the image; `crop` zero-pads there. An empty brain (all-zero
    scans) uses the whole image.
    """
    bbox = bounding_box(brain) or tuple((0, n) for n in brain.shape)
    box = []
    for (a, b), p in zip(bbox, patch):
        size = max(b - a, int(p))
        size = -(-size // divisor) * divisor
        start = a - (size - (b - a)) // 2
        box.append((start, start + size))
    return tuple(box)


def network_input(
    data: list[np.ndarray], predictor: Predictor, brain: np.ndarray | None = None
) -> tuple[np.ndarray, Box]:
    """Scaled, stacked channels `(C, *box size)` float32 over the inference box, and the box.

    `data` are the channels on the network's grid, `brain` their `crop.brain_mask` (None: computed
    here). Scaling uses each full volume's statistics, exactly as `prepare` does for training.
    """
    brain = brain_mask(data) if brain is None else brain
    box = inference_box(brain, predictor.patch, predictor.divisor)
    return scaled_window(data, predictor.norm, brain, box), box


def _outside_box(target: str, channels: int) -> list[float]:
    """Each probability channel's value outside the inference box: certain background."""
    return [1.0 if target == "labels" and k == 0 else 0.0 for k in range(channels)]


def _full_probabilities(probs: np.ndarray, box: Box, shape: tuple[int, ...], target: str) -> np.ndarray:
    """Box probabilities (K, ...) -> the image grid; background is certain outside the box."""
    return np.stack([uncrop(p, box, shape, fill=f) for p, f in zip(probs, _outside_box(target, len(probs)))])


class CaseInput(NamedTuple):
    """A case read and preprocessed, ready for the network (`load_input`)."""

    image: np.ndarray  # (C, *box size) float32 on the network's grid
    box: Box
    src: Grid  # the scan's grid: outputs are written on it
    net: Grid  # the network's grid
    affine: np.ndarray
    header: Any


def load_input(predictor: Predictor, case: Case) -> CaseInput:
    """Read a case's scans and preprocess them as training did (no network work: runs in a
    reader thread while the network works on the previous case)."""
    vols = load_channels(case, predictor.channels)
    warnings = check_intensities(case, predictor.channels, vols) + check_headers(case, predictor.channels)
    data, src, net = to_network_grid(vols, predictor.spacing)
    brain = brain_mask(data)
    for warning in warnings + check_brain_size(case, brain, net):
        tqdm.write(f"warning: {warning}", file=sys.stderr)
    image, box = network_input(data, predictor, brain)
    return CaseInput(image, box, src, net, vols[0].affine, vols[0].header)


class _StitchedOnCpu(nn.Module):
    """`model` on its device for windows cut from and stitched into a volume on the CPU: MONAI's
    `sw_device` / `device` split, for a case whose stitched outputs do not fit in GPU memory."""

    def __init__(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model, self.device, self.amp_dtype = model, device, amp_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.amp_dtype):
            return self.model(x.to(self.device)).float().cpu()


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


def predict_case(
    predictor: Predictor, case: Case | str | os.PathLike, probabilities: bool = False, inp: CaseInput | None = None,
    uncertainty: bool = False, after_pass: Callable[[float, int], nn.Module | None] | None = None,
) -> CasePrediction:
    """Segment one case in its original grid (see `CasePrediction`); `inp` if already loaded.

    `case`: a `Case` (`layouts.discover_cases`) or one case's folder. `uncertainty` (needs the
    flips of TTA) adds the voxel-wise flip disagreement. `after_pass`: `window.tta_probabilities`'s
    hook between sliding-window passes.
    Raises TumorsegError naming the case and file for a missing, unreadable or mismatched scan.
    """
    if not isinstance(case, Case):
        found = discover_cases(case)
        if len(found) != 1:
            raise TumorsegError(f"{case}: {len(found)} cases, not one: give one case's folder (or predict the folder)")
        case = found[0]
    if uncertainty and not predictor.tta:
        raise TumorsegError("uncertainty comes from the TTA flips: predict with --tta")
    image, box, src, net, affine, header = inp or load_input(predictor, case)
    x, roi = torch.from_numpy(image)[None], predictor.roi(image.shape[1:])
    with torch.inference_mode():
        try:
            probs, disagreement = tta_probabilities(
                predictor.model, x.to(predictor.device), roi, predictor.target, predictor.overlap,
                predictor.tta, predictor.amp_dtype, predictor.sw_batch_size, uncertainty, after_pass,
            )
            out_of_memory = False
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True  # retried below: inside `except` the traceback keeps the failed pass's tensors
        if out_of_memory:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            tqdm.write(f"note: {case.case_id}: out of GPU memory; retrying with the windows one at a time and stitched "
                       "on the CPU (slower)", file=sys.stderr)
            model = _StitchedOnCpu(predictor.eager(), predictor.device, predictor.amp_dtype)  # one window at a time: no padding
            probs, disagreement = tta_probabilities(model, x, roi, predictor.target, predictor.overlap,
                                                    predictor.tta, uncertainty=uncertainty)
    probs = probs[0]
    same = net.same_as(src)
    if disagreement is not None:  # (1, *box) on the network's grid -> the scan's grid
        flips = disagreement.cpu().numpy()
        disagreement = uncrop(flips[0], box, src.shape) if same else resample_box(flips, box, net, src, [0.0])[0]
    et_threshold, minimum = predictor.et_threshold, predictor.min_component
    if same:  # the scan's own grid (BraTS): labels in the box (on the device), then uncropped
        labels = uncrop(to_labels(probs, predictor.target), box, src.shape)
        full = _full_probabilities(probs.cpu().numpy(), box, src.shape, predictor.target) if probabilities else None
    else:  # probabilities, not labels, go back to the scan's grid (exact when only reoriented)
        full = resample_box(probs.cpu().numpy(), box, net, src, _outside_box(predictor.target, probs.shape[0]))
        labels = to_labels(full, predictor.target)
        full = full if probabilities else None
        ratio = np.prod(net.spacing) / np.prod(src.spacing)  # sizes tuned in training voxels: the same volumes here
        et_threshold, *minimum = (max(1, round(v * ratio)) if v else v for v in (et_threshold, *minimum))
    labels = postprocess(labels, predictor.largest_tumour, et_threshold, minimum)
    conv = predictor.labels or case.labels
    return CasePrediction(conv.from_training(labels), full, affine, header, conv, disagreement,
                          probability_channels(predictor.target, probs.shape[0]))


def _compile_if_it_pays(predictor: Predictor, seconds: float, passes_left: int, bar: tqdm | None) -> Predictor:
    """`predict --engine auto` after its first sliding-window pass: the predictor compiled where, at
    that pass's pace (`seconds`, in PyTorch or ONNX Runtime), the passes left win back the compiling
    (`compiled.compile_pays`); else as it is."""
    # an ensemble compiles each of its networks: its pass must pay for all of them
    if not compile_pays(seconds / predictor.members, passes_left,
                        COMPILED_SAVES_ONNX if predictor.engine == "onnx" else COMPILED_SAVES):
        return predictor
    if bar is not None:
        bar.write(f"predict: {seconds:.0f} s per sliding-window pass, {passes_left} passes to go: compiling the "
                  "network (torch.compile)", file=sys.stderr)
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
            print(f"predict: {_runtime_line(predictor, amp)}", file=sys.stderr)
        if predictor.engine == "compile" and predictor.fixed_window():
            predictor.warm_up()  # compiles before the first case
        elif predictor.engine == "compile":
            print("note: windows larger than the training patch differ from case to case; the network compiles "
                  "again for each new size", file=sys.stderr)
    if not postprocess:
        predictor = replace(predictor, largest_tumour=False, et_threshold=None, min_component=NO_COMPONENT_STEP,
                            postprocess_source=None, statistics=None)
    if progress and rank_world()[0] == 0:
        print(f"predict: {predictor.settings_line()}", file=sys.stderr)
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
            print(f"note: {out_dir}: {len(unknown)} prediction(s) there record no model (tumorseg wrote them before "
                  "it recorded one): kept as they are; --force redoes them", file=sys.stderr)
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
                print(f"note: {out_dir}: {len(cases_of)} case(s) {why}, predicted again: "
                      f"{', '.join(cases_of[:3])}{', ...' if len(cases_of) > 3 else ''}", file=sys.stderr)
        bar = tqdm(total=len(todo), desc="predict", unit="case", disable=not progress)
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
                    bar.write(f"error: {result.failed[case.case_id]}", file=sys.stderr)
                bar.update(1)
            for case, future in writes:
                try:
                    result.written.extend(future.result())
                    result.predicted.append(case.case_id)
                except Exception as exc:  # noqa: BLE001
                    result.failed[case.case_id] = _failure(case, exc)
                    bar.write(f"error: {result.failed[case.case_id]}", file=sys.stderr)
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
