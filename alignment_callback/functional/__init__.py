"""Pure tensor math: measures, preprocessing, permutation nulls and calibration.

Every function takes ``torch.Tensor`` inputs of shape (n, d) on any device, computes in float32
or better (float64 for float64 input and for integers above 2**24, which float32 cannot hold),
returns tensors, and never touches the global RNG.
"""

from alignment_callback.functional._validation import ShapeOptionError
from alignment_callback.functional.aggregation import Layers, LayerAlignmentResult
from alignment_callback.functional.calibration import CalibrationResult, calibrate
from alignment_callback.functional.cca_measures import cca_similarity, pwcca
from alignment_callback.functional.fdr import benjamini_hochberg
from alignment_callback.functional.gram_measures import linear_cka, rbf_cka, rsa, unbiased_cka
from alignment_callback.functional.kernels import hsic_biased, hsic_unbiased
from alignment_callback.functional.knn_measures import (
    cknna,
    cycle_knn,
    edit_distance_knn,
    lcs_knn,
    mutual_knn,
)
from alignment_callback.functional.permutation import Permutations, permutations
from alignment_callback.functional.pipeline import (
    calibrate_measures,
    calibrated_alignment,
    calibrated_layer_alignment,
    permutation_null,
)
from alignment_callback.functional.predictivity import linear_predictivity
from alignment_callback.functional.preprocessing import pool_features, prepare_features
from alignment_callback.functional.registry import (
    BUILTIN_MEASURES,
    Measure,
    MeasureInfo,
    MeasureOutputError,
    get_measure,
    measure_table,
    register_measure,
)
from alignment_callback.functional.rv import rv_coefficient
from alignment_callback.functional.shape_measures import (
    bures_similarity,
    procrustes_similarity,
    shape_metric,
)
from alignment_callback.functional.svcca import svcca

__all__ = [
    "BUILTIN_MEASURES",
    "CalibrationResult",
    "LayerAlignmentResult",
    "Layers",
    "Measure",
    "MeasureInfo",
    "MeasureOutputError",
    "Permutations",
    "ShapeOptionError",
    "benjamini_hochberg",
    "bures_similarity",
    "calibrate",
    "calibrate_measures",
    "calibrated_alignment",
    "calibrated_layer_alignment",
    "cca_similarity",
    "cknna",
    "cycle_knn",
    "edit_distance_knn",
    "get_measure",
    "hsic_biased",
    "hsic_unbiased",
    "lcs_knn",
    "linear_predictivity",
    "linear_cka",
    "mutual_knn",
    "permutation_null",
    "permutations",
    "pool_features",
    "prepare_features",
    "procrustes_similarity",
    "pwcca",
    "rbf_cka",
    "measure_table",
    "register_measure",
    "rsa",
    "rv_coefficient",
    "shape_metric",
    "svcca",
    "unbiased_cka",
]
