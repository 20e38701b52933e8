"""The measure registry: every measure declared once, with what the rest of the library reads.

A *measure* is the math (``linear_cka``, ``mutual_knn``, ...); a *metric* is the torchmetrics
object that computes one.  Each measure is declared by a :class:`MeasureInfo`: its parameters
with defaults and checks, its family, symmetry, range, minimum number of samples, how its fast
permutation null works, and two functions:

* ``prepare(x, role, shared, **params) -> state``, run once per representation (a frozen
  reference is prepared once per fit);
* ``score(state_x, state_y, perms, **params) -> (B,)``, the measure of ``(x, y[π])`` for each
  row π of ``perms`` (the identity gives the observed score).

The command line, the callback, the metric objects, the docs table and the parametrized tests
all read this registry, so adding a measure is one :func:`register_measure` call plus its
NumPy reference in ``tests/``.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Union

import torch
from torch import Tensor

from alignment_callback.functional import cca_measures as cm
from alignment_callback.functional import gram_measures as gm
from alignment_callback.functional import knn_measures as km
from alignment_callback.functional import predictivity as pr
from alignment_callback.functional import shape_measures as shm
from alignment_callback.functional import svcca as sv
from alignment_callback.functional._precision import no_autocast
from alignment_callback.functional._validation import (
    as_scalar,
    check_bandwidth,
    check_matrix,
    check_pair,
    check_positive_int,
    errors_named,
    per_side,
)

MeasureFn = Callable[[Tensor, Tensor], Any]


# ----------------------------------------------------------------------------- declarations
def _two_samples(params: Mapping[str, Any]) -> int:
    return 2


def _n_per_permutation(n: int, params: Mapping[str, Any]) -> int:
    return n


@dataclass(frozen=True)
class Param:
    """A measure parameter: name, default, a check returning the normalized value, and help."""

    name: str
    default: Any
    check: Callable[[Any, str], Any]
    help: str


def _three_matrices(dtype: torch.dtype) -> int:
    return 3


def _rsa_peak(dtype: torch.dtype) -> int:
    """RSA's preparation: float64 distances and ranks (measured peak 5.5 float32 n×n)."""
    return 4 if dtype == torch.float64 else 6


def _unbiased_peak(dtype: torch.dtype) -> int:
    """Unbiased CKA's U-centering: the gram, its copy and the expression's temporaries."""
    return 5


@dataclass(frozen=True)
class MeasureInfo:
    """The declaration of a measure (see the module docstring).

    Attributes
    ----------
    name : str
        Canonical name.
    family : str
        ``"gram"`` (a function of one n×n matrix per side; the null gathers it),
        ``"knn"`` (neighbor lists; the null maps edges through π) or ``"other"``.
    summary : str
        The math in one line (the docs table).
    prepare : Callable[..., Any]
        ``(x, role, shared, **params) -> state``.
    score : Callable[..., Tensor]
        ``(state_x, state_y, perms, **params) -> (B,)``.
    layer_scores : Callable[..., Tensor] | None
        Optional ``(states_x, states_y, perms, **params) -> (B, LA, LB)``.
    params : tuple[Param, ...]
        The parameters, in order.
    symmetric : bool
        ``s(x, y) == s(y, x)``.
    value_range : tuple[float | None, float | None]
        Documented (min, max); ``max`` is s_max (``None``: unbounded).
    min_samples : Callable[[Mapping[str, Any]], int]
        ``params -> n``: the fewest samples the measure is defined for.
    perm_cost : Callable[[int, Mapping[str, Any]], int]
        ``(n, params) -> elements`` of temporary memory per permutation.
    null_method : str
        How the fast null works (the docs table).
    invariances : str
        What the measure is invariant to (the docs table).
    shared : str | None
        Name of a preparation several measures share (``"neighbor_lists"``), or None.
    group : str | None
        Measures of one group compute their nulls in one pass (``"knn"``), or None.
    aliases : tuple[str, ...]
        Other accepted names.
    degenerate_hint : Callable[[Mapping[str, Any]], str] | None
        ``params -> advice`` when the null sits at s_max.
    analytic : bool
        The null has exact permutation moments (the gram family's cosines), so
        ``null="moments"`` / ``"auto"`` can calibrate without permutations.
    feature_state : Callable[[Tensor], Any] | None
        ``x -> state`` in feature space (no n×n matrix), used with an analytic
        null when d < n (linear kernels).
    prepare_peak : Callable[[torch.dtype], int]
        ``dtype -> count`` of n×n matrices of the data's dtype alive at the peak
        of preparing one gram-family state, the state included (default 3); the memory
        check before any n×n matrix is allocated uses it.
    exact_scores : bool
        Equal statistics are computed bit for bit equal (ratios of integer
        counts), so the null is compared with the score as it is; otherwise (default)
        null values within ``tie_tolerance`` of the score are its ties.
    memory_check : Callable[[Tensor, int, Mapping[str, Any]], None] | None
        ``(x, kept, params) -> None`` raising ``MemoryError`` before any state
        is prepared when the preparation's peak, with ``kept`` states of n×n size already
        held (every other layer's, both sides), would not fit; None: no n×n state outside
        the gram family.
    """

    name: str
    family: str
    summary: str
    prepare: Callable[..., Any]
    score: Callable[..., Tensor]
    layer_scores: Callable[..., Tensor] | None = None
    params: tuple[Param, ...] = ()
    symmetric: bool = True
    value_range: tuple[float | None, float | None] = (0.0, 1.0)
    min_samples: Callable[[Mapping[str, Any]], int] = _two_samples
    perm_cost: Callable[[int, Mapping[str, Any]], int] = _n_per_permutation
    null_method: str = ""
    invariances: str = ""
    shared: str | None = None
    group: str | None = None
    aliases: tuple[str, ...] = ()
    degenerate_hint: Callable[[Mapping[str, Any]], str] | None = None
    analytic: bool = False
    feature_state: Callable[[Tensor], Any] | None = None
    prepare_peak: Callable[[torch.dtype], int] = _three_matrices
    exact_scores: bool = False
    memory_check: Callable[[Tensor, int, Mapping[str, Any]], None] | None = None

    def bind(self, **kwargs: Any) -> "Measure":
        """This measure with ``kwargs`` checked and defaults filled in."""
        known = {p.name: p for p in self.params}
        unknown = set(kwargs) - set(known)
        if unknown:
            near = sorted({m for name in unknown
                           for m in difflib.get_close_matches(name, _CALIBRATION_ARGUMENTS, 1)})
            hint = (f" (did you mean {', '.join(near)}, an argument of the calibration itself?)"
                    if near else "")
            raise TypeError(
                f"{self.name} got unexpected keyword argument(s) {sorted(unknown)}; it accepts "
                f"{sorted(known) or 'none'}{hint}"
            )
        params = {p.name: p.check(kwargs.get(p.name, p.default), f"{self.name}: {p.name}")
                  for p in self.params}
        return Measure(self, tuple(params.items()))


#: The calibration functions' own arguments, which a misspelling passes on to the measure
_CALIBRATION_ARGUMENTS = ("num_permutations", "alpha", "seed", "aggregate", "null", "groups",
                          "max_score", "num_bootstrap", "confidence")


@dataclass(frozen=True)
class Measure:
    """A measure with its parameters bound: what every computation receives.

    Picklable (its functions are module-level), hashable, and comparable: two measures with the
    same name and parameters share prepared states and nulls.
    """

    info: MeasureInfo = field(compare=False)
    params: tuple[tuple[str, Any], ...] = ()
    name: str = ""
    #: a user callable's identity (0 for a declared measure): two functions that share a
    #: ``__name__`` (lambdas, partials, a function named like a built-in) are two measures
    identity: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.info.name)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # pickled by name: the declaration is looked up again (its functions are not copied)
        if REGISTRY.get(self.info.name) is self.info:
            return _bind_registered, (self.info.name, self.params)
        return Measure, (self.info, self.params, self.name, self.identity)

    @property
    def kwargs(self) -> dict[str, Any]:
        """The bound parameters as a dict."""
        return dict(self.params)

    @property
    def max_score(self) -> float | None:
        """s_max, the measure's maximum (``None`` if unbounded)."""
        return self.info.value_range[1]

    @property
    def min_samples(self) -> int:
        return self.info.min_samples(self.kwargs)

    @property
    def family(self) -> str:
        return self.info.family

    def perm_cost(self, n: int) -> int:
        """Temporary elements per permutation (sets chunk sizes)."""
        return self.info.perm_cost(n, self.kwargs)

    @no_autocast()
    def prepare(self, x: Tensor, role: str = "x", shared: Any = None) -> Any:
        """The prepared state of one representation (``role``: ``"x"`` model, ``"y"``
        reference; only tie-breaking depends on it)."""
        return self.info.prepare(x, role, shared, **self.kwargs)

    @no_autocast()
    def score(self, sx: Any, sy: Any, perms: Tensor) -> Tensor:
        """(B,) scores of ``(x, y[π])`` for every row π of ``perms``."""
        return self.info.score(sx, sy, perms, **self.kwargs)

    @no_autocast()
    def layer_scores(self, sxs: list, sys: list, perms: Tensor) -> Tensor:
        """(B, LA, LB) scores, every Y layer permuted by the same π."""
        if self.info.layer_scores is not None:
            return self.info.layer_scores(sxs, sys, perms, **self.kwargs)
        rows = [torch.stack([self.score(sx, sy, perms) for sy in sys], 1) for sx in sxs]
        return torch.stack(rows, 1)

    @no_autocast()
    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """The measure's value on ``(x, y)`` (no permutation).

        Gram-family measures take the feature route where their functions do (linear CKA and
        RV from ``n >= 4096`` samples with features narrower than n: no n×n matrix), and
        otherwise refuse with a ``MemoryError`` before allocating n×n matrices that would not
        fit.  A ``ValueError`` from one side's data names it ("y: zero-variance
        representation: ..."), as ``calibrated_alignment``'s do.
        """
        x, y = check_pair(x, y)
        n = x.shape[0]
        check_samples(self, n)
        identity = torch.arange(n, device=x.device)[None]
        if self.family == "gram":
            route = self.info.feature_state
            if (route is not None and n >= gm.FEATURE_ROUTE_MIN_SAMPLES
                    and max(x.shape[1], y.shape[1]) < n):
                sx, sy = per_side(route, x, y)
                value = self.layer_scores([sx], [sy], identity)[0, 0, 0]
                return value.to(torch.promote_types(x.dtype, y.dtype))
            gm._check_memory(self.name, x, "calibrated_alignment with null='moments' for "
                             "linear_cka (computed from the features when d < n)",
                             1 + self.info.prepare_peak(x.dtype))
        if self.info.memory_check is not None:  # y's state is prepared while x's is kept
            self.info.memory_check(x, 1, self.kwargs)
        with errors_named("x"):
            sx = self.prepare(x, "x")
        with errors_named("y"):
            sy = self.prepare(y, "y")
        return self.score(sx, sy, identity)[0]


# ------------------------------------------------------------------------------ parameters
def _int_at_least(minimum: int) -> Callable[[Any, str], int]:
    return functools.partial(_check_int, minimum=minimum)


def _check_int(value: Any, name: str, minimum: int) -> int:
    return check_positive_int(value, name, minimum)


K_PARAM = Param("k", 10, _int_at_least(1), "neighbors per sample")
K2_PARAM = Param("k", 10, _int_at_least(2), "neighbors per sample (>= 2)")
SIGMA_PARAM = Param("sigma", 1.0, check_bandwidth,
                    "RBF bandwidth: absolute (rows are usually L2-normalized) or 'median'")
CCA_DIM_PARAM = Param("cca_dim", 10, _int_at_least(1), "singular directions kept per side")


# ------------------------------------------------------------------------------- adapters
def _gram_prepare(x: Tensor, role: str, shared: Any, *, state: Callable[..., Any], **params: Any) -> Any:
    return state(x, **params)


def _gram_score(sx: Any, sy: Any, perms: Tensor, **params: Any) -> Tensor:
    return gm.gram_score(sx, sy, perms)


def _gram_layers(sxs: list, sys: list, perms: Tensor, **params: Any) -> Tensor:
    return gm.gram_layer_scores(sxs, sys, perms)


def _knn_prepare(x: Tensor, role: str, shared: Any, *, kind: str, k: int) -> km.KnnState:
    return km.knn_state(x, k, kind, role, lists=shared)


def _knn_score(sx: km.KnnState, sy: km.KnnState, perms: Tensor, *, kind: str, k: int) -> Tensor:
    return km.knn_score(kind, sx, sy, perms)


def _knn_layers(sxs: list, sys: list, perms: Tensor, *, kind: str, k: int) -> Tensor:
    return km.knn_layer_scores([(kind, sxs, sys)], perms)[0]


def _knn_cost(n: int, params: Mapping[str, Any]) -> int:
    # mapped edges, look-ups and their (B, n, k) int64 temporaries, weighted so that a chunk's
    # arrays stay in cache (measured: 2-3x faster than chunks sized by memory alone)
    return 128 * n * params["k"]


def _ordered_knn_cost(n: int, params: Mapping[str, Any]) -> int:
    return _knn_cost(n, params) + 16 * n * params["k"] ** 2  # and the k×k matches of the DP


def _knn_min(params: Mapping[str, Any], minimum: int = 2) -> int:
    return max(params["k"] + 1, minimum)


def _svcca_prepare(x: Tensor, role: str, shared: Any, *, cca_dim: int) -> Tensor:
    return sv.svcca_state(x, cca_dim)


def _svcca_score(sx: Tensor, sy: Tensor, perms: Tensor, *, cca_dim: int) -> Tensor:
    return sv.svcca_score(sx, sy, perms)


def _rbf_hint(params: Mapping[str, Any]) -> str:
    return (f"sigma={params['sigma']!r} is far from the scale of the data's distances, so the "
            "RBF kernel is nearly the identity (or constant); try sigma='median'")


REGISTRY: dict[str, MeasureInfo] = {}
_ALIASES: dict[str, str] = {}


def register_measure(info: MeasureInfo) -> MeasureInfo:
    """Add a measure (and its aliases) to the registry; returns it."""
    if not isinstance(info, MeasureInfo):
        raise TypeError(f"register_measure takes a MeasureInfo, got {type(info).__name__}")
    names = (info.name, *info.aliases)
    if len(set(names)) != len(names):
        raise ValueError(f"measure {info.name!r}: its aliases {info.aliases!r} repeat a name")
    for name in names:
        if name in REGISTRY or name in _ALIASES:
            raise ValueError(f"a measure named {name!r} is already registered")
    REGISTRY[info.name] = info
    for alias in info.aliases:
        _ALIASES[alias] = info.name
    return info


def _gram(name: str, state: Callable[..., Any], summary: str, min_n: int = 2, **kw: Any) -> MeasureInfo:
    return register_measure(MeasureInfo(
        name, "gram", summary, functools.partial(_gram_prepare, state=state), _gram_score,
        _gram_layers, min_samples=functools.partial(_constant, value=min_n),
        null_method="fused float64 pass over the n×n matrices per permutation; or exact "
                    "moments + Pearson III (null='moments')", analytic=True, **kw))


def _constant(params: Mapping[str, Any], value: int) -> int:
    return value


def _knn(name: str, summary: str, minimum_k: int = 1, min_n: int = 2,
         perm_cost: Callable[[int, Mapping[str, Any]], int] = _knn_cost, **kw: Any) -> MeasureInfo:
    return register_measure(MeasureInfo(
        name, "knn", summary, functools.partial(_knn_prepare, kind=name),
        functools.partial(_knn_score, kind=name), functools.partial(_knn_layers, kind=name),
        params=(K2_PARAM if minimum_k == 2 else K_PARAM,),
        min_samples=functools.partial(_knn_min, minimum=min_n), perm_cost=perm_cost,
        null_method="model edges mapped through π and found in the reference's lists",
        invariances="rotation, isotropic scaling (of L2-normalized rows: any row scaling)",
        shared="neighbor_lists", group="knn", **kw))


_GRAM_INVARIANCE = "rotation, isotropic scaling, translation"
_gram("linear_cka", gm.linear_state, "HSIC(K,L)/√(HSIC(K,K)·HSIC(L,L)), K = XXᵀ, biased HSIC",
      invariances=_GRAM_INVARIANCE, aliases=("cka-kernel=linear-hsic=gretton-score",),
      feature_state=gm.linear_feature_state)
_gram("rbf_cka", gm.rbf_state, "CKA with K_ij = exp(−‖x_i − x_j‖²/(2σ²))",
      params=(SIGMA_PARAM,), invariances="rotation, translation (isotropic scaling with sigma='median')",
      degenerate_hint=_rbf_hint)
_gram("unbiased_cka", gm.unbiased_state, "linear CKA with the unbiased HSIC (Song et al. 2012)",
      min_n=4, value_range=(-1.0, 1.0), invariances=_GRAM_INVARIANCE, prepare_peak=_unbiased_peak)
_gram("rsa", gm.rsa_state, "Spearman ρ of the upper triangles of the cosine-distance matrices",
      min_n=3, value_range=(-1.0, 1.0), invariances="rotation, any row scaling",
      prepare_peak=_rsa_peak)
_knn("mutual_knn", "mean_i |N_X(i) ∩ N_Y(i)| / k", exact_scores=True)
_knn("cycle_knn", "mean_i 1[∃ j ∈ N_Y(i): i ∈ N_X(j)]", symmetric=False, exact_scores=True)
_knn("cknna", "unbiased-HSIC CKA restricted to mutual kNN pairs (PRH); can pass ±1 (raw "
     "features far from the origin, tiny n): clamped", minimum_k=2, min_n=4,
     value_range=(-1.0, 1.0), symmetric=False)
_knn("lcs_knn", "mean_i LCS(N_X(i), N_Y(i)) / k of the ordered lists", perm_cost=_ordered_knn_cost,
     exact_scores=True)
_knn("edit_distance_knn", "1 − mean_i Levenshtein(N_X(i), N_Y(i)) / k of the ordered lists",
     perm_cost=_ordered_knn_cost, exact_scores=True)
register_measure(MeasureInfo(
    "svcca", "other", "mean canonical correlation of the top cca_dim singular subspaces",
    _svcca_prepare, _svcca_score, params=(CCA_DIM_PARAM,),
    min_samples=sv.svcca_min_samples, perm_cost=sv.svcca_cost,
    null_method="rows of Y's orthonormal basis permuted, in cache-sized blocks; the "
                "eigenvalues of a cca_dim×cca_dim matrix per permutation",
    invariances="translation, per-feature scaling (rotation and invertible linear maps "
                "when cca_dim >= the rank of both sides)"))


# ----------------------------------------------------------------- shape, CCA, predictivity
def _call_state(x: Tensor, role: str, shared: Any, *, state: Callable[..., Any], **params: Any) -> Any:
    return state(x, **params)


def _call_score(sx: Any, sy: Any, perms: Tensor, *, score: Callable[..., Tensor],
                **params: Any) -> Tensor:
    return score(sx, sy, perms)


def _square_cost(n: int, params: Mapping[str, Any]) -> int:
    return n * n


def _check_alpha_param(value: Any, name: str) -> float:
    return shm._check_alpha(value)


def _check_kernel_param(value: Any, name: str) -> str:
    return shm._check_kernel(value)


def _check_dims_param(value: Any, name: str) -> int | None:
    return cm._check_dims(value)


def _check_ridge(value: Any, name: str) -> Any:
    grid, fixed = pr._check_params(value, 2)
    if value is None or isinstance(value, (int, float)):
        return value
    return grid[0] if fixed else grid  # one penalty, however given, is that fixed penalty


def _check_folds(value: Any, name: str) -> int:
    pr._check_params(None, value)
    return int(value)


def _cca_score_dims(sx: Any, sy: Any, perms: Tensor, **params: Any) -> Tensor:
    return cm.cca_score(sx, sy, perms, params.get("dims"))


def _cca_state(x: Tensor, dims: int | None = None) -> Any:
    return cm.cca_state(x)


def _cca_min(params: Mapping[str, Any]) -> int:
    return max(3, (params["dims"] or 1) + 2)


def _predictivity_min(params: Mapping[str, Any]) -> int:
    return pr.min_samples(params["folds"])


def _other(name: str, summary: str, state: Callable[..., Any], score: Callable[..., Tensor],
           **kw: Any) -> MeasureInfo:
    return register_measure(MeasureInfo(
        name, "other", summary, functools.partial(_call_state, state=state),
        functools.partial(_call_score, score=score), perm_cost=_square_cost, **kw))


_FACTOR_NULL = "rows of Y's (n, r) factor permuted; an r×r product and its singular values"
_other("procrustes_similarity", "‖X̂ᵀŶ‖_* of centered, Frobenius-normalized features (= 1 − d²/2)",
       shm.procrustes_state, shm.procrustes_score, null_method=_FACTOR_NULL,
       invariances=_GRAM_INVARIANCE)
_other("shape_metric", "1 − θ/(π/2), θ the angular shape distance with partial whitening α",
       shm.shape_state, shm.shape_score,
       params=(Param("alpha", 1.0, _check_alpha_param, "partial whitening: 0 CCA-like, 1 Procrustes"),),
       null_method=_FACTOR_NULL, aliases=("procrustes-angular-score",),
       invariances="rotation, translation; isotropic scaling at α = 1; invertible linear maps at α = 0")
_other("bures_similarity", "tr((K^½ L K^½)^½)/√(tr K·tr L) of the centered grams",
       shm.bures_state, shm.bures_score,
       params=(Param("kernel", "linear", _check_kernel_param, "'linear' or 'rbf'"), SIGMA_PARAM),
       memory_check=shm.check_bures_memory,
       null_method=_FACTOR_NULL + " (RBF: r ≈ n, O(n³) per permutation)", aliases=("nbs",),
       invariances="linear: rotation, isotropic scaling, translation; rbf: rotation, translation")
register_measure(MeasureInfo(
    "cca_similarity", "other", "mean of the top `dims` canonical correlations",
    functools.partial(_call_state, state=_cca_state), _cca_score_dims, perm_cost=_square_cost,
       params=(Param("dims", None, _check_dims_param, "correlations averaged (None: all)"),),
    min_samples=_cca_min, null_method="rows of Y's orthonormal basis permuted; an SVD per permutation",
    invariances="invertible linear maps, translation"))
_other("pwcca", "Σ α_i ρ_i, weights from x's projections (Morcos et al. 2018)", cm.pwcca_state,
       cm.pwcca_score, symmetric=False, min_samples=functools.partial(_constant, value=3),
       null_method="rows of Y's orthonormal basis permuted; an SVD per permutation",
       invariances="translation, isotropic scaling of x, invertible linear maps of y")
_other("linear_predictivity", "cross-validated R² of ridge regression x → y (pooled over outputs)",
       pr.predictivity_state, pr.predictivity_score, symmetric=False, value_range=(None, 1.0),
       params=(Param("ridge", None, _check_ridge,
                     "penalty relative to the training rows' scale, "
                     "ridge*||X||_F^2/min(m-1, p) (0: least squares; None: inner CV over a grid)"),
               Param("folds", 5, _check_folds, "contiguous cross-validation folds")),
       min_samples=_predictivity_min,
       null_method="quadratic forms of Y's centered gram, built once from x; a gather per permutation",
       invariances="rotation, isotropic scaling, translation of either side")
_gram("rv_coefficient", gm.linear_state, "Escoufier's RV of column-centered data (= linear CKA)",
      invariances=_GRAM_INVARIANCE, feature_state=gm.linear_feature_state)

#: The built-in measures by name (read-only view of the registry's canonical names).
BUILTIN_MEASURES: Mapping[str, MeasureInfo] = REGISTRY


def _fmt_range(bounds: tuple[float | None, float | None]) -> str:
    lo, hi = bounds
    text = ("−∞" if lo is None else f"{lo:g}", "∞" if hi is None else f"{hi:g}")
    return f"[{text[0]}, {text[1]}]".replace("-", "−")


def measure_table(names: Any = None) -> str:
    r"""The registered measures as a Markdown table (the one in ``docs/measures.md``).

    One row per measure: name, family, parameters with defaults, range, whether
    s(x, y) = s(y, x), definition, how the fast permutation null works, invariances and aliases.

    Parameters
    ----------
    names : iterable of str, default=None
        Measures to list, in order (None: every registered measure, in registration order).

    Examples
    --------
    >>> print(measure_table(["mutual_knn"]).splitlines()[2])
    | `mutual_knn` | knn | k=10 | [0, 1] | yes | mean_i \|N_X(i) ∩ N_Y(i)\| / k | ... | ... | — |
    """
    rows = ["| measure | family | parameters | range | symmetric | definition | fast null "
            "| invariant to | aliases |", "|---|---|---|---|---|---|---|---|---|"]
    for name in (list(REGISTRY) if names is None
                 else [canonical_name(n) for n in measure_list(names, "names")]):
        info = REGISTRY[name]
        cells = [f"`{name}`", info.family,
                 ", ".join(f"{p.name}={p.default!r}" for p in info.params) or "—",
                 _fmt_range(info.value_range), "yes" if info.symmetric else "no", info.summary, info.null_method, info.invariances,
                 ", ".join(f"`{a}`" for a in info.aliases) or "—"]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------- resolution
def _recompute_prepare(x: Tensor, role: str, shared: Any, **bound: Any) -> Tensor:
    return x


class MeasureOutputError(TypeError, ValueError):
    """A measure callable returned something other than one real number: a mistake in the
    callable, not in the data (the callback raises it whatever ``on_error`` says)."""


def _scalar(value: Any, like: Tensor, name: str = "") -> Tensor:
    """A callable measure's value as a 0-dim tensor; a clear error for anything else."""
    try:
        return as_scalar(value, "a measure callable's value", like)
    except (TypeError, ValueError) as error:
        raise MeasureOutputError(f"{error} (measure callable {name!r})" if name else
                                 str(error)) from None


def _check_signature(fn: MeasureFn, name: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse a callable that cannot be called as ``fn(x, y, **kwargs)`` (a configuration
    mistake, found before any data is seen); one without a readable signature is let through."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C extensions
        return
    try:
        signature.bind(None, None, **kwargs)
    except TypeError as error:
        given = f" with its options {sorted(kwargs)}" if kwargs else ""
        raise TypeError(f"measure callable {name!r} cannot be called as f(x, y){given}: "
                        f"{error}") from None


def _recompute_score(sx: Tensor, sy: Tensor, perms: Tensor, *, fn: MeasureFn, name: str = "",
                     **bound: Any) -> Tensor:
    return torch.stack([_scalar(fn(sx, sy[p]), sx, name) for p in perms])


def _bound_call(x: Tensor, y: Tensor, *, fn: MeasureFn, kwargs: dict[str, Any]) -> Any:
    return fn(x, y, **kwargs)


def _from_callable(fn: MeasureFn, kwargs: dict[str, Any]) -> Measure:
    name = getattr(fn, "__name__", type(fn).__name__)
    _check_signature(fn, name, kwargs)
    bound = functools.partial(_bound_call, fn=fn, kwargs=kwargs) if kwargs else fn
    # its range is unknown: no clamping, and s_max None unless the call gives max_score
    info = MeasureInfo(name, "other", "user-supplied callable", _recompute_prepare,
                       functools.partial(_recompute_score, fn=bound, name=name),
                       value_range=(None, None),
                       null_method="recomputed on every permuted Y")
    return Measure(info, tuple(sorted(kwargs.items(), key=lambda kv: kv[0])), name, id(fn))


MeasureSpec = Union[str, Measure, MeasureFn]


def measure_list(measures: Any, name: str = "measures") -> list[Any]:
    """``measures`` as a list of measure specifications: one name, :class:`Measure` or
    callable is a list of it (a name is never split into its letters)."""
    if isinstance(measures, (str, Measure)) or callable(measures):
        return [measures]
    if isinstance(measures, Mapping) or not isinstance(measures, Iterable):
        raise TypeError(f"{name} must be a measure name, a Measure, a callable or a list of "
                        f"them, got {type(measures).__name__}")
    return list(measures)


def _bind_registered(name: str, params: tuple[tuple[str, Any], ...]) -> Measure:
    return Measure(REGISTRY[name], params)


def canonical_name(name: str) -> str:
    """The registered name of ``name`` or of an alias; a clear error for unknown names."""
    if name in REGISTRY:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    close = difflib.get_close_matches(name, list(REGISTRY) + list(_ALIASES), n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"unknown measure {name!r}{hint} Built-ins: {', '.join(sorted(REGISTRY))}")


class _DefaultName(str):
    """A parameter's default name, marked (see :func:`default_value`)."""

    __slots__ = ()


def default_value(value: str) -> str:
    """``value`` marked as a parameter's default: equal to it and shown as it in signatures,
    but told apart (:func:`is_default`) from the same value given explicitly, so that
    ``measure="mutual_knn", metric=...`` is a conflict even when ``"mutual_knn"`` is the
    default."""
    return _DefaultName(value)


def is_default(value: Any) -> bool:
    """Whether ``value`` is a :func:`default_value` marker: the caller left the argument out."""
    return isinstance(value, _DefaultName)


def renamed_argument(name: str, value: Any, old: str, old_value: Any, stacklevel: int = 3) -> Any:
    """The value of argument ``name``, or of its deprecated name ``old`` (with a
    ``DeprecationWarning``).  ``old_value`` is None when ``old`` was not given; ``value`` counts as
    not given when it is None or a :func:`default_value` marker.  Giving both is a ``TypeError``:
    neither silently overrides the other.

    The callback's ``measures=`` / ``metrics=``:
    ``measures = renamed_argument("measures", measures, "metrics", metrics)``.
    """
    if old_value is None:
        return value
    if value is not None and not is_default(value):
        raise TypeError(f"give {name}= or its deprecated name {old}=, not both")
    warnings.warn(f"the {old}= argument is now called {name}= (a measure is the math, a "
                  "metric the torchmetrics object)", DeprecationWarning, stacklevel=stacklevel)
    return old_value


def measure_argument(measure: Any, kwargs: dict[str, Any], stacklevel: int = 3) -> Any:
    """``measure``, or the deprecated ``metric=`` keyword taken out of ``kwargs`` (the
    argument's old name: a measure is the math, a metric the torchmetrics object).  The
    caller's default of ``measure`` is a :func:`default_value` marker, so that a ``measure``
    given next to ``metric=`` is a ``TypeError`` (:func:`renamed_argument`).
    """
    if "metric" not in kwargs:
        return measure
    return renamed_argument("measure", measure, "metric", kwargs.pop("metric"), stacklevel + 1)


#: Arguments of the calibrating functions and metrics that a measure option may share a name
#: with (``shape_metric``'s ``alpha``): their default and meaning.
_OWN_ARGUMENTS = {"alpha": (0.05, "the level of the threshold τ")}


def check_shadowed_options(measure: Any, owner: str, **arguments: Any) -> None:
    """Refuse ``owner``'s argument (of :data:`_OWN_ARGUMENTS`) set away from its default next to
    a measure *named* in ``measure`` with an option of the same name: ``alpha=0.5`` next to
    ``"shape_metric"`` would set the test level, never the measure's ``alpha``.  The measure's
    option goes through ``measure=get_measure(name, ...)``, after which ``owner``'s argument is
    unambiguous.  The default (0.05) passes: it is the conventional level, and what a caller
    that forwards its own ``alpha`` gives without being asked."""
    if not isinstance(measure, str):
        return
    info = REGISTRY.get(_ALIASES.get(measure, measure))
    if info is None:  # an unknown name: get_measure says so
        return
    for param in info.params:
        if param.name not in arguments or param.name not in _OWN_ARGUMENTS:
            continue
        name, value = param.name, arguments[param.name]
        default, meaning = _OWN_ARGUMENTS[name]
        if value == default:
            continue
        raise TypeError(
            f"{owner}: {name}={value!r} is ambiguous: it sets {owner}'s own {name} ({meaning}), "
            f"and measure {measure!r} has an option {name!r} too. Pass the measure as "
            f"measure=get_measure({info.name!r}, {name}=...) for its option (or "
            f"get_measure({info.name!r}) for its default); {name}= then sets {owner}'s only")


def get_measure(measure: MeasureSpec, **kwargs: Any) -> Measure:
    """Resolve ``measure``: a built-in name (or alias), a :class:`Measure`, or a callable
    ``f(x, y)`` (recomputed on every permuted Y: exact, slow).

    Parameters
    ----------
    measure : str, Measure or callable
        The measure; a :class:`Measure` is returned as it is (it takes no ``kwargs``:
        ``TypeError``).
    **kwargs
        The measure's parameters (``k``, ``sigma``, ``cca_dim``), checked against its
        declaration (an unknown name or a bad value raises ``ValueError`` naming the measure);
        for a callable they are bound to it.

    Returns
    -------
    Measure
        Callable as ``measure(x, y)``; its name, parameters and fast-null hooks travel with it.

    Examples
    --------
    >>> import torch
    >>> import alignment_callback.functional as F
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(30, 4, generator=g), torch.randn(30, 5, generator=g)
    >>> m = F.get_measure("mutual_knn", k=5)
    >>> m.name, m.params, float(m(x, y)) == float(F.mutual_knn(x, y, k=5))
    ('mutual_knn', (('k', 5),), True)
    """
    if isinstance(measure, Measure):
        if kwargs:
            raise TypeError(f"a Measure object takes no extra keyword arguments, got {sorted(kwargs)}")
        return measure
    if isinstance(measure, str):
        return REGISTRY[canonical_name(measure)].bind(**kwargs)
    if callable(measure):
        return _from_callable(measure, dict(kwargs))
    raise TypeError(f"measure must be a name, a Measure or a callable, got {type(measure).__name__}")


def check_samples(measure: Measure, n: int) -> None:
    """Raise when ``n`` samples are too few for ``measure`` (e.g. n <= k for kNN)."""
    need = measure.min_samples
    if n < need:
        detail = "".join(f", {k}={v}" for k, v in measure.params)
        raise ValueError(f"{measure.name}{detail} needs at least {need} samples, got n={n}")


def prepare_pair(measure: Measure, x: Tensor, y: Tensor) -> tuple[Any, Any]:
    """Validate a paired input and prepare both sides (x as the model, y as the reference)."""
    x, y = check_pair(x, y)
    check_samples(measure, x.shape[0])
    return measure.prepare(x, "x"), measure.prepare(y, "y")


def prepare_one(measure: Measure, x: Tensor, name: str = "x", role: str = "x") -> Any:
    """Validate one representation and prepare it (used to cache a frozen reference)."""
    x = check_matrix(x, name)
    check_samples(measure, x.shape[0])
    return measure.prepare(x, role)
