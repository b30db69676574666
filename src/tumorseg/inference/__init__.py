"""Step 4b: trained network -> segmentations of new cases in their original space."""

from .postprocess import (
    case_statistics,
    choose_postprocessing,
    keep_largest_tumour,
    postprocess,
    suppress_small_et,
    tune_et_threshold,
    tune_postprocessing,
)
from .case import CasePrediction, predict_case
from .predict import PredictResult, predict
from .predictor import Predictor
from .window import probabilities, to_labels

__all__ = [
    "CasePrediction",
    "PredictResult",
    "Predictor",
    "case_statistics",
    "choose_postprocessing",
    "keep_largest_tumour",
    "postprocess",
    "predict",
    "predict_case",
    "probabilities",
    "suppress_small_et",
    "to_labels",
    "tune_et_threshold",
    "tune_postprocessing",
]
