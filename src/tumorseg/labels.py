"""Label conventions and modalities: the one place that knows what each label value means.

Every dataset users hold names the same tumour parts with different numbers:

| convention  | necrotic / non-enhancing core | oedema (SNFH) | enhancing tumour | resection cavity |
|-------------|-------------------------------|---------------|------------------|------------------|
| `brats2020` | 1                             | 2             | 4                | -                |
| `brats2023` | 1                             | 2             | 3                | 4 (2024 post-treatment) |
| `msd`       | 2                             | 1             | 3                | -                |
| `peds2024`  | 2 (non-enhancing), 3 (cystic component) | 4   | 1                | -                |

(BraTS 2018-2021 use `brats2020`; nnU-Net's BraTS conversions use `msd`'s numbers; BraTS-PEDs
renumbered its labels in 2024 under the 2023 file names, `layouts` tells the two apart.)
Internally everything is in training labels: 0 background, 1 necrotic core, 2 oedema,
3 enhancing tumour, and 4 resection cavity when a run keeps it. The BraTS regions are the
same in every convention: WT = core + oedema + enhancing, TC = core + enhancing, ET =
enhancing; the resection cavity belongs to none of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import TumorsegError

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
SEED_CHANNELS: tuple[str, ...] = ("t2", "t1ce", "flair")  # the seed's channel order
# Every spelling of a modality that datasets use, lower case -> canonical name.
MODALITY_ALIASES: dict[str, str] = {
    "t1": "t1", "t1n": "t1", "t1w": "t1", "t1native": "t1", "native": "t1",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce", "t1wce": "t1ce", "t1post": "t1ce",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair", "t2flair": "flair",
    "ct1": "t1ce", "fla": "flair",  # HD-GLIO's and BraTS Toolkit's file names
}

NUM_CLASSES = 4  # background + 3 tumour classes
CAVITY_CLASS = 4  # training label of the resection cavity, only when a run keeps it
CLASS_NAMES: tuple[str, ...] = ("background", "necrotic core", "oedema", "enhancing tumour", "resection cavity")
CLASS_ABBREVIATIONS: tuple[str, ...] = ("BG", "NCR", "ED", "ET", "RC")  # BraTS's, for short places (headers)
CAVITY_MODES: tuple[str, ...] = ("keep", "drop")

# Regions scored by BraTS, in training labels. Order is the channel order of region-based
# outputs everywhere in tumorseg.
REGIONS: tuple[str, ...] = ("WT", "TC", "ET")
REGION_LABELS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
REGION_NAMES: dict[str, str] = {
    "WT": "whole tumour",
    "TC": "tumour core",
    "ET": "enhancing tumour",
}


def parse_channels(text: str) -> tuple[str, ...]:
    """"all" or a comma list ("t2, T1-CE,FLAIR") -> modality names, each alias as its canonical name
    (`canonical_modality`); an unknown name stays as given, for its users' check to name."""
    if text.strip().lower() == "all":
        return MODALITIES
    names = (c.strip() for c in text.split(",") if c.strip())
    return tuple(canonical_modality(c) or c.lower() for c in names)


def canonical_modality(name: str) -> str | None:
    """'T1w', 't1gd', 'FLAIR', 't2f', ... -> 't1', 't1ce', 'flair', ...; None if unknown."""
    return MODALITY_ALIASES.get(re.sub(r"[\s_-]", "", name.strip().lower()))


@dataclass(frozen=True)
class LabelConvention:
    """The raw label value of each tumour part in one dataset's segmentations."""

    name: str
    necrosis: int
    oedema: int
    enhancing: int
    cavity: int | None = None
    core_extra: tuple[int, ...] = ()  # more raw values of the core class (BraTS-PEDs 2024's cystic component)

    @property
    def tumour_values(self) -> tuple[int, int, int]:
        """Raw values of training classes 1, 2, 3."""
        return self.necrosis, self.oedema, self.enhancing

    @property
    def values(self) -> tuple[int, ...]:
        """Every raw value a segmentation in this convention may hold, background included."""
        return (0, *sorted((*self.tumour_values, *self.core_extra))) + ((self.cavity,) if self.cavity is not None else ())

    def invalid(self, seg: np.ndarray) -> list[int]:
        """Values present in `seg` that this convention does not allow."""
        if seg.dtype.kind in "ui" and seg.size and 0 <= seg.min() and seg.max() <= max(self.values):
            present = np.flatnonzero(np.bincount(seg.ravel().astype(np.int64, copy=False)))
        else:
            present = np.unique(seg)
        return [int(v) if float(v).is_integer() else float(v) for v in present if v not in self.values]

    def problem(self, seg: np.ndarray) -> str | None:
        """`has labels .. outside the <name> labels ..` (with a hint for training labels in a BraTS
        2020 file) when `seg` holds values this convention does not allow; None when it does not."""
        bad = self.invalid(seg)
        if not bad:
            return None
        fractions = [v for v in bad if isinstance(v, float)]
        if fractions:  # a float map: its every value listed would be megabytes of one line
            return f"has {len(fractions)} non-integer values ({min(fractions):g} to {max(fractions):g}): {NOT_LABELS}"
        hint = (" (label 3: enhancing tumour in BraTS 2023+, MSD and nnU-Net numbers, or training labels; BraTS "
                "2020 and 2021 files use 4: name the file's convention)") if 3 in bad and self == BRATS2020 else ""
        return f"has labels {format_values(bad)} outside the {self.name} labels {format_values(self.values)}{hint}"

    def to_training(self, seg: np.ndarray, cavity: str | None = None) -> np.ndarray:
        """Raw labels -> training labels uint8 (valid values assumed: check `invalid` first).

        The resection cavity becomes class 4 with `cavity="keep"` and background with
        "drop"; when it is present and `cavity` is None the caller must choose (error).
        """
        seg = np.asarray(seg)
        lut = np.zeros(max(self.values) + 1, dtype=np.uint8)
        for cls, value in enumerate(self.tumour_values, start=1):
            lut[value] = cls
        lut[list(self.core_extra)] = 1
        if self.cavity is not None:
            if cavity is None and (seg == self.cavity).any():
                raise TumorsegError(
                    f"resection cavity (label {self.cavity}) present: choose to keep it as its own class "
                    "or drop it to background (--cavity keep|drop)"
                )
            lut[self.cavity] = CAVITY_CLASS if cavity == "keep" else 0
        return lut[seg.astype(np.intp, copy=False)]

    def from_training(self, mask: np.ndarray) -> np.ndarray:
        """Training labels (0..3, 4 = cavity) -> raw labels of this convention, uint8 (the core
        class as `necrosis`: a network does not tell `core_extra`'s parts apart)."""
        lut = np.zeros(CAVITY_CLASS + 1, dtype=np.uint8)
        lut[1:4] = self.tumour_values
        lut[CAVITY_CLASS] = self.cavity if self.cavity is not None else 0
        return lut[np.asarray(mask).astype(np.intp, copy=False)]

    def regions(self, seg: np.ndarray) -> np.ndarray:
        """Raw labels (...) -> boolean region masks (3, ...) in the order WT, TC, ET."""
        core = (seg == self.necrosis) | (seg == self.enhancing)
        for value in self.core_extra:
            core |= seg == value
        return np.stack([core | (seg == self.oedema), core, seg == self.enhancing])

    def to_dict(self) -> dict:
        return {"name": self.name, "necrosis": self.necrosis, "oedema": self.oedema,
                "enhancing": self.enhancing, "cavity": self.cavity, "core_extra": list(self.core_extra)}

    def tag(self) -> str:
        """Short text stored in written NIfTI headers (`descrip`) so `evaluate` can read it back."""
        values = f"{self.necrosis},{self.oedema},{self.enhancing}" + (f",{self.cavity}" if self.cavity is not None else "")
        return f"labels={self.name}:{values}"


CONVENTIONS: dict[str, LabelConvention] = {
    "brats2020": LabelConvention("brats2020", necrosis=1, oedema=2, enhancing=4),
    "brats2023": LabelConvention("brats2023", necrosis=1, oedema=2, enhancing=3, cavity=4),
    "msd": LabelConvention("msd", necrosis=2, oedema=1, enhancing=3),
    # BraTS-PEDs 2024: 1 enhancing, 2 non-enhancing tumour, 3 cystic component, 4 oedema
    "peds2024": LabelConvention("peds2024", necrosis=2, oedema=4, enhancing=1, core_extra=(3,)),
}
BRATS2020 = CONVENTIONS["brats2020"]
NOT_LABELS = "a probability or intensity map, not labels"  # no convention makes such a file right
_TAG_RE = re.compile(r"labels=(?P<name>[\w.-]+):(?P<values>\d+(,\d+){2,3})")


def format_values(values, most: int = 10) -> str:
    """Label values as a list, at most `most` of them: a float map's million values are no line."""
    values = list(values)
    more = f", ... ({len(values)} values)" if len(values) > most else ""
    return ", ".join(str(int(v)) if float(v).is_integer() else f"{float(v):g}" for v in values[:most]) + more


def convention(spec: str | dict | LabelConvention) -> LabelConvention:
    """A convention by name ('brats2020', 'brats2023', 'msd'), from `to_dict()`, or as it is."""
    if isinstance(spec, LabelConvention):
        return spec
    if isinstance(spec, dict):
        return LabelConvention(**{k: spec.get(k) for k in ("name", "necrosis", "oedema", "enhancing", "cavity")},
                               core_extra=tuple(spec.get("core_extra") or ()))
    if spec not in CONVENTIONS:
        raise TumorsegError(f"unknown label convention '{spec}' (choose from {', '.join(CONVENTIONS)})")
    return CONVENTIONS[spec]


def convention_from_tag(text: str) -> LabelConvention | None:
    """The convention a `tag()` in a header's description names, or None."""
    m = _TAG_RE.search(text)
    if m is None:
        return None
    values = [int(v) for v in m["values"].split(",")]
    tagged = LabelConvention(m["name"], *values[:3], cavity=values[3] if len(values) == 4 else None)
    known = CONVENTIONS.get(tagged.name)  # with what the tag leaves out (`core_extra`)
    return known if known is not None and known.tag() == tagged.tag() else tagged


def _description(header) -> str:
    try:
        return bytes(header["descrip"]).decode(errors="ignore")
    except (KeyError, TypeError, ValueError):
        return ""


def convention_from_header(header) -> LabelConvention | None:
    """The convention `predict` recorded in a NIfTI header's description (`tag()`), if any."""
    return convention_from_tag(_description(header))


MODEL_DIGITS = 12  # hex digits of the model fingerprint `predict` writes after the labels tag
_PREDICTION_TAG = "tumorseg "
_MODEL_RE = re.compile(rf"^{_PREDICTION_TAG}labels=\S+ model=([0-9a-f]{{{MODEL_DIGITS}}})\b")


SCANS_DIGITS = 8  # hex digits of the fingerprint of the scans a prediction comes from
_SCANS_RE = re.compile(rf" scans=([0-9a-f]{{{SCANS_DIGITS}}})\b")
DESCRIPTION_BYTES = 80  # NIfTI-1's `descrip` field


def prediction_description(conv: LabelConvention, model: str | None, scans: str | None = None) -> str:
    """What `predict` writes in a label file's header description: its convention's `tag()`, then
    the model fingerprint (`Predictor.made_by`) and the scans' (`outputs.scans_digest`) where
    known (the latter only where it fits the field); read back by the functions below."""
    text = f"{_PREDICTION_TAG}{conv.tag()}" + (f" model={model}" if model else "")
    with_scans = f"{text} scans={scans}" if scans else text
    return with_scans if len(with_scans.encode()) <= DESCRIPTION_BYTES else text


def read_as(conv: LabelConvention, why: str) -> str:
    """The note for an untagged prediction (another tool's) read in `conv` because of `why`: every
    command says it alike, since a wrong convention mis-scores without an error."""
    return f"untagged prediction read as {conv.name} labels ({why}; --pred-labels to set)"


def scans_from_header(header) -> str | None:
    """The scans' fingerprint `predict` recorded in the header description, if any."""
    found = _SCANS_RE.search(_description(header))
    return found[1] if found else None


def model_from_header(header) -> str | None:
    """The model fingerprint `predict` recorded after its labels tag (`Predictor.made_by`), if any."""
    found = _MODEL_RE.search(_description(header))
    return found[1] if found else None


def tumorseg_prediction(header) -> bool:
    """Whether `predict` wrote this label file (its labels tag opens the description)."""
    return _description(header).startswith(f"{_PREDICTION_TAG}labels=")


def convention_from_names(labels: dict[str, int], name: str) -> LabelConvention:
    """A convention from label names -> values (MSD and nnU-Net `dataset.json` "labels").

    Recognises the names these datasets use ("edema", "non-enhancing tumor", "enhancing
    tumour", "necrotic ...", "cystic component", "resection cavity"); several core parts (BraTS-PEDs
    2024's non-enhancing tumour and cyst) make one core class. A preset with the same values keeps its name.
    """
    parts: dict[str, int] = {}
    core_extra: list[int] = []
    for label, value in labels.items():
        text = label.lower().replace("-", " ").replace("_", " ")
        if "background" in text or text.strip() == "ignore":  # nnU-Net's ignore label is no tumour part
            continue
        if "edema" in text or "oedema" in text or "snfh" in text or "hyperintens" in text or text.strip() == "ed":
            part = "oedema"
        elif any(k in text for k in ("non enh", "nonenh", "necro", "netc", "ncr", "cyst")) or text.strip() in ("core", "net", "cc"):
            part = "necrosis"
        elif "enhanc" in text or text.strip() == "et":
            part = "enhancing"
        elif "cavity" in text or text.strip() == "rc":
            part = "cavity"
        else:
            raise TumorsegError(f"unknown label name '{label}' (expected oedema, necrosis, enhancing tumour, cavity)")
        if part == "necrosis" and part in parts:
            core_extra.append(int(value))
        else:
            parts[part] = int(value)
    missing = [p for p in ("necrosis", "oedema", "enhancing") if p not in parts]
    if missing:
        raise TumorsegError(f"labels {labels} name no {', '.join(missing)}")
    found = LabelConvention(name, parts["necrosis"], parts["oedema"], parts["enhancing"], parts.get("cavity"),
                            tuple(sorted(core_extra)))
    return next((c for c in CONVENTIONS.values() if _same_values(c, found)), found)


def convention_from_regions(regions: dict[str, list[int]], name: str) -> LabelConvention:
    """A convention from nnU-Net's region form: {"whole tumor": [1, 2, 3], "tumor core": [2, 3],
    "enhancing tumor": [3]} (WT, TC, ET as lists of label values; a core of several values, as
    BraTS-PEDs 2024's [1, 2, 3] around ET 1, is one core class)."""
    by_size = sorted((set(int(v) for v in values) for values in regions.values()), key=len)
    if (len(by_size) != 3 or not (len(by_size[0]) == 1 and by_size[0] < by_size[1] < by_size[2])
            or len(by_size[2] - by_size[1]) != 1):
        raise TumorsegError(f"regions {regions} are not nested WT > TC > ET label sets (one oedema label)")
    (et,), (oed,) = by_size[0], by_size[2] - by_size[1]
    nec, *extra = sorted(by_size[1] - by_size[0])
    found = LabelConvention(name, necrosis=nec, oedema=oed, enhancing=et, core_extra=tuple(extra))
    return next((c for c in CONVENTIONS.values() if _same_values(c, found)), found)


def _same_values(a: LabelConvention, b: LabelConvention) -> bool:
    return a.tumour_values == b.tumour_values and a.cavity == b.cavity and a.core_extra == b.core_extra


# BraTS 2020 shorthands, used where data is known to be in that convention (metrics on raw labels).
RAW_LABELS: tuple[int, ...] = BRATS2020.values


def to_training_labels(seg: np.ndarray) -> np.ndarray:
    """BraTS 2020 labels (0,1,2,4) -> training labels (0,1,2,3), uint8."""
    return BRATS2020.to_training(seg)


def to_raw_labels(mask: np.ndarray) -> np.ndarray:
    """Training labels (0..3) -> BraTS 2020 labels (0,1,2,4), uint8."""
    return BRATS2020.from_training(mask)


def regions_from_labels(mask: np.ndarray) -> np.ndarray:
    """Training labels (...) -> boolean region masks (3, ...) in the order WT, TC, ET."""
    return np.stack([np.isin(mask, REGION_LABELS[r]) for r in REGIONS])


def labels_from_regions(regions: np.ndarray) -> np.ndarray:
    """Boolean region masks (3, ...) WT, TC, ET -> training labels, nested as BraTS defines.

    ET inside TC inside WT: voxels in WT only are oedema (2), in TC but not ET necrotic (1),
    in ET enhancing (3).
    """
    wt, tc, et = (np.asarray(r, dtype=bool) for r in regions)
    out = np.zeros(wt.shape, dtype=np.uint8)
    out[wt] = 2
    out[tc] = 1
    out[et] = 3
    return out
