"""Gram matrices, centering and HSIC estimators."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from alignment_callback.functional import _compiled
from alignment_callback.functional._precision import no_autocast
from alignment_callback.functional._scaling import rescale_exactly, times_power_of_two
from alignment_callback.functional._validation import as_float, check_bandwidth


def linear_gram(x: Tensor) -> Tensor:
    """Linear kernel ``K = X Xᵀ``."""
    return x @ x.T


def squared_distances(x: Tensor) -> Tensor:
    """Squared Euclidean distances ``D_ij = ‖x_i − x_j‖²`` (exact zeros on the diagonal).

    From the column-centered rows: the distances do not change, but ``‖x_i‖² + ‖x_j‖² −
    2x_iᵀx_j`` of rows with a large common offset would cancel away their digits (an offset of
    10⁴ leaves none of them in float32)."""
    x = x - x.mean(0, keepdim=True)
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min_(0.0)
    d2.fill_diagonal_(0.0)
    return d2


def _kthvalue_may_refuse(t: Tensor) -> bool:
    """``torch.kthvalue`` on ``t`` may raise under the deterministic mode (CUDA, torch < 2.10)."""
    return t.device.type != "cpu" and torch.are_deterministic_algorithms_enabled()


def median(values: Tensor) -> Tensor:
    """Median of all entries, averaging the two middle values for an even count (NumPy's).

    One selection (``kthvalue``) for the lower middle value; the upper one is the same value
    when more entries than its rank are <= it, else the smallest entry above it (two passes).
    Where ``kthvalue`` may refuse (a CUDA tensor under ``torch.use_deterministic_algorithms``,
    as ``Trainer(deterministic=True)`` sets: torch before 2.10 has no deterministic CUDA
    kernel for it), the lower middle value is read off a sort instead: the same value.
    """
    flat = values.flatten()
    m = flat.numel()
    rank = (m + 1) // 2
    if _kthvalue_may_refuse(flat):
        lo = torch.sort(flat).values[rank - 1]
    else:
        lo = torch.kthvalue(flat, rank).values
    if m % 2 or int((flat <= lo).sum()) > rank:
        hi = lo
    else:  # the smallest entry above lo (a pass, no copy of the entries above it)
        hi = torch.where(flat > lo, flat, math.inf).amin()
    return (lo + hi) / 2


def _kernel_(exponent: Tensor, minus_one: bool) -> Tensor:
    """``exp`` (or ``expm1``) of ``exponent`` in its own memory (the n×n copies are what
    limits n; in-place methods, as autograd allows, not ``out=``)."""
    return exponent.expm1_() if minus_one else exponent.exp_()


def check_sigma_fits(sigma: float | str, dtype: torch.dtype, measure: str = "rbf_cka") -> float:
    """``2σ²`` for an absolute ``sigma`` (0.0 for ``"median"``); a ``ValueError`` naming
    ``measure`` when it underflows ``dtype`` (a parameter error, whatever the data)."""
    if isinstance(sigma, str):
        return 0.0
    scale = 2.0 * float(sigma) * float(sigma)  # inf in Python for sigma > 1.3e154, no error
    if not scale >= torch.finfo(dtype).tiny:
        raise ValueError(f"{measure}: sigma={float(sigma)} is too small for {dtype}: 2*sigma^2 "
                         f"= {scale:g} underflows. Use a larger sigma or sigma='median'")
    return scale


def rbf_gram(x: Tensor, sigma: float | str = 1.0, minus_one: bool = False,
             measure: str = "rbf_cka") -> Tensor:
    """RBF kernel ``K_ij = exp(−‖x_i − x_j‖² / (2σ²))``, or with ``minus_one`` ``K − 1`` as
    ``expm1(−‖x_i − x_j‖² / (2σ²))``: centering removes the constant, and ``K − 1`` keeps the
    digits that ``exp`` rounds away where ``K`` is close to 1 (σ large against the distances).

    ``sigma`` is absolute (a finite positive number; PRH convention, default 1.0), or
    ``"median"`` for ``σ = sqrt(median of all n² squared distances)`` (scale-free).  Either
    way the data is first rescaled exactly by a power of two (an absolute σ by the same one:
    the kernel depends on x/σ only), so huge or tiny float32 / float64 magnitudes neither
    overflow nor underflow the squared distances (an absolute σ must still have a 2σ² the dtype
    holds: :func:`check_sigma_fits`).

    Raises ``ValueError`` naming overflow when the squared distances overflow the dtype
    (float16 features beyond about 180), and underflow when the data's scale makes the kernel
    meaningless at this absolute ``sigma`` (distances all negligible against 2σ², so the kernel is
    constant, or all so large that every entry off the diagonal underflows to 0, so the kernel
    is the identity), and ``measure`` (the one the gram is for).
    """
    check_bandwidth(sigma)
    if isinstance(sigma, str):  # "median"
        d2 = squared_distances(rescale_exactly(x))
        s2 = median(d2)
        if not bool(s2 > 0):
            raise ValueError(
                f"{measure}: sigma='median' is 0: at least half of the squared distances between "
                "rows are 0 (mostly identical rows; all of them: a zero-variance representation);"
                " give sigma a number")
        # -d2 / (2σ²) is d2 / (-2σ²), bit for bit; d2 is this function's own
        return _kernel_(d2.div_(-2.0 * s2), minus_one)
    sigma = float(sigma)  # also a 0-dim tensor (a learned or computed bandwidth)
    scale = check_sigma_fits(sigma, x.dtype, measure)
    # the kernel depends on x / σ only: x is brought to magnitude ~1 by a power of two 2**ex,
    # exactly, so that huge (or tiny) features do not overflow their squared distances, and
    # d2 / (2σ²) with σ = m·2**e is d2(x·2**-ex) · 2**(2(ex − e)) / (2m²): the power of two
    # is applied to the tensor, exactly, so that 2σ² need not be a finite number of x's dtype
    # (nor of a Python float); in place where it can (d2 is this function's own, and the n×n
    # copies are what limits n)
    scaled = rescale_exactly(x)
    ex = 0 if scaled is x else math.frexp(float(x.abs().amax()))[1]
    d2 = squared_distances(scaled)
    if not bool(torch.isfinite(d2).all()):  # float16: magnitudes up to 2**16 are kept as given
        raise ValueError(
            f"{measure}: squared distances overflow {x.dtype} (largest |x| = "
            f"{float(x.abs().max()):.3g}); pass float32 or float64 features")
    m, e = math.frexp(sigma)
    largest = _power_of_two_str(float(d2.max()), 2 * ex)  # before the scaling below
    if e != ex:
        d2 = times_power_of_two(d2, torch.tensor(2 * (ex - e), device=d2.device))
    ratio = d2.div_(2.0 * m * m)
    distinct = bool((x != x[:1]).any())
    if distinct and not bool((ratio > torch.finfo(x.dtype).eps).any()):
        bound = f"= {scale:g}" if math.isfinite(scale) else "> 1.8e+308"
        raise ValueError(
            f"{measure}: squared distances underflow against 2*sigma^2 {bound} (largest "
            f"distance² = {largest}); the RBF kernel is constant at sigma={sigma}. "
            "Rescale the features or use sigma='median'"
        )
    # every off-diagonal exp(−d²/2σ²) underflows to 0: K = I exactly, whatever the data
    nearest = _smallest_off_diagonal(ratio) if distinct else 0.0
    if float(torch.tensor(-nearest, dtype=x.dtype).exp()) == 0.0:
        bound = f"= {scale:g}" if math.isfinite(scale) else "> 1.8e+308"
        times = f"{nearest:.3g}"
        if not math.isfinite(nearest):  # beyond x's dtype: from the distances before scaling
            smallest = _smallest_off_diagonal(squared_distances(scaled)) / (2.0 * m * m)
            times = _power_of_two_str(smallest, 2 * (ex - e))
        raise ValueError(
            f"{measure}: every distance is large against 2*sigma^2 {bound} (the smallest "
            f"distance² between two rows is {times} times 2σ²): every kernel value off "
            f"the diagonal underflows {x.dtype} to 0, so at sigma={sigma} the RBF kernel is "
            "the identity, the same for any data. Rescale the features (e.g. L2-normalize "
            "rows) or use sigma='median'"
        )
    return _kernel_(ratio.neg_(), minus_one)


def _power_of_two_str(v: float, p: int) -> str:
    """``v · 2**p`` written with 3 significant digits (``.3g``), also beyond the range of a
    float."""
    try:
        exact = math.ldexp(v, p)
        if exact != 0.0 or v == 0.0 or not math.isfinite(v):
            return f"{exact:.3g}"
    except OverflowError:
        pass
    exponent = math.log10(abs(v)) + p * math.log10(2.0)
    whole = math.floor(exponent)
    mantissa = math.copysign(10.0 ** (exponent - whole), v)
    if f"{mantissa:.2f}".startswith(("10", "-10")):  # 9.996 rounds up to 10.0
        mantissa, whole = mantissa / 10.0, whole + 1
    return f"{mantissa:.2f}e{whole:+03d}"


def _smallest_off_diagonal(m: Tensor) -> float:
    """The smallest entry of the square ``m`` off its diagonal (O(n) extra memory)."""
    diagonal = m.diagonal()
    saved = diagonal.clone()
    diagonal.fill_(math.inf)
    try:
        return float(m.min())
    finally:
        diagonal.copy_(saved)


def center_gram(k: Tensor) -> Tensor:
    """Double centering ``H K H`` with ``H = I − 11ᵀ/n``."""
    k = k - k.mean(0, keepdim=True)
    return k - k.mean(1, keepdim=True)


def symmetrize_(m: Tensor, tile: int = 512) -> Tensor:
    """Make a nearly symmetric matrix exactly symmetric, in place: ``m ← (m + mᵀ)/2``, tile by
    tile (no n×n temporary).  Matrix products and centering leave rounding-level asymmetry."""
    n = m.shape[0]
    for a in range(0, n, tile):
        for b in range(a, n, tile):
            upper, lower = m[a:a + tile, b:b + tile], m[b:b + tile, a:a + tile]
            avg = (upper + lower.T) * 0.5
            upper.copy_(avg)
            lower.copy_(avg.T)
    return m


def u_center_gram(k: Tensor) -> Tensor:
    """U-centering (Székely & Rizzo 2014) of a symmetric gram: zero diagonal and

    ``Ũ_ij = K̃_ij − r_i/(n−2) − r_j/(n−2) + s/((n−1)(n−2))`` for i ≠ j, with K̃ the gram with
    zeroed diagonal, r its row sums and s its total.  For symmetric K, L:
    ``⟨U(K), U(L)⟩_F / (n(n−3)) = hsic_unbiased(K, L)``, so unbiased CKA is a cosine of
    U-centered grams, and a permutation acts on U(L) as it acts on L.
    """
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"unbiased HSIC needs n >= 4 samples, got {n}")
    kt = k.clone()
    kt.fill_diagonal_(0.0)
    r = kt.sum(1)
    s = r.sum()
    u = kt - r[:, None] / (n - 2) - r[None, :] / (n - 2) + s / ((n - 1) * (n - 2))
    u.fill_diagonal_(0.0)
    return u


def _check_grams(k: Tensor, l: Tensor) -> tuple[Tensor, Tensor]:
    """The grams as detached floats of one dtype (float64 when either is float64 or holds
    integers above 2**24, see ``as_float``), after checking their shapes and values."""
    k, l = as_float(k, "k"), as_float(l, "l")
    if k.shape != l.shape or k.dim() != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"grams must be square and of equal shape, got {tuple(k.shape)}, {tuple(l.shape)}")
    if k.shape[0] < 2:
        raise ValueError(f"HSIC needs grams of at least 2 samples, got {k.shape[0]}")
    for name, gram in (("k", k), ("l", l)):
        if not bool(torch.isfinite(gram).all()):
            raise ValueError(f"{name} contains NaN/Inf values")
    dtype = torch.promote_types(k.dtype, l.dtype)
    return k.to(dtype), l.to(dtype)


def _unit_scaled(gram: Tensor) -> tuple[Tensor, int]:
    """``gram · 2**-e`` with its largest ``|entry|`` moderate (``rescale_exactly``), and ``e``:
    HSIC is bilinear, so computed on the rescaled grams it is the same number times
    ``2**-(e_k + e_l)`` (exact), and huge or tiny grams neither overflow (inf − inf = NaN) nor
    underflow in its sums of products."""
    scaled = rescale_exactly(gram)
    if scaled is gram:
        return gram, 0
    return scaled, math.frexp(float(gram.abs().amax()))[1]


def _scaled_back(value: Tensor, exponent: int) -> Tensor:
    """``value · 2**exponent`` (exact; ±inf where the dtype cannot hold it)."""
    if exponent == 0:
        return value
    return times_power_of_two(value, torch.tensor(exponent, device=value.device))


@no_autocast()
def hsic_biased(k: Tensor, l: Tensor) -> Tensor:
    """Biased HSIC: ``tr(K H L H) = Σ_ij (HKH)_ij L_ji``, ``H = I − 11ᵀ/n`` (Gretton et al. 2005).

    Without the ``1/(n−1)²`` factor, which cancels in CKA.  Valid for non-symmetric matrices
    too.

    Parameters
    ----------
    k : Tensor of shape (n, n)
        The first gram (kernel) matrix, e.g. ``X Xᵀ``.
    l : Tensor of shape (n, n)
        The second gram matrix, of the same samples in the same order.

    Returns
    -------
    Tensor
        0-dim; float32, or float64 when an input is float64 (or holds integers above 2**24).

    References
    ----------
    Gretton, Bousquet, Smola, Schölkopf. Measuring statistical dependence with
    Hilbert-Schmidt norms. ALT 2005.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import hsic_biased
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    >>> k, l, h = x @ x.T, y @ y.T, torch.eye(10, dtype=torch.float64) - 1.0 / 10
    >>> bool(torch.isclose(hsic_biased(k, l), torch.trace(k @ h @ l @ h)))
    True
    """
    (k, ek), (l, el) = (_unit_scaled(g) for g in _check_grams(k, l))
    # tr(KHLH) = Σ (HKH)_ij (HLH)_ji, and H(K − c)H = HKH: both centered, their means taken
    # out first, so that a large offset (un-centered grams) costs no digits
    return _scaled_back((center_gram(k - k.mean()) * center_gram(l - l.mean()).T).sum(),
                        ek + el)


def _off_diagonal_centered(k: Tensor) -> Tensor:
    """``k`` with a zero diagonal and the mean of its off-diagonal entries taken out of them:
    the unbiased estimator ignores such a constant, and without it the estimator's three terms
    cancel a large offset's digits (un-centered grams)."""
    n = k.shape[0]
    kt = k - (k.sum() - k.diagonal().sum()) / (n * (n - 1))
    kt.fill_diagonal_(0.0)
    return kt


@no_autocast()
def hsic_unbiased(k: Tensor, l: Tensor) -> Tensor:
    """Unbiased HSIC (Song et al. 2012, eq. 5), valid for non-symmetric matrices too.

    With K̃, L̃ the matrices with zeroed diagonals:
    ``[tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2·1ᵀK̃L̃1/(n−2)] / (n(n−3))``,
    where ``tr(K̃L̃) = Σ_ij K̃_ij L̃_ji`` and ``1ᵀK̃L̃1 = Σ_j colsum(K̃)_j rowsum(L̃)_j``.
    Needs n >= 4.

    Parameters
    ----------
    k : Tensor of shape (n, n)
        The first gram (kernel) matrix, e.g. ``X Xᵀ``.
    l : Tensor of shape (n, n)
        The second gram matrix, of the same samples in the same order.

    Returns
    -------
    Tensor
        0-dim; float32, or float64 when an input is float64 (or holds integers above 2**24).

    References
    ----------
    Song, Smola, Gretton, Bedo, Borgwardt. Feature selection via dependence maximization.
    JMLR 13, 2012.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import hsic_unbiased, unbiased_cka
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    >>> k, l = x @ x.T, y @ y.T
    >>> cka = hsic_unbiased(k, l) / (hsic_unbiased(k, k) * hsic_unbiased(l, l)).sqrt()
    >>> bool(torch.isclose(cka, unbiased_cka(x, y)))
    True
    """
    (k, ek), (l, el) = (_unit_scaled(g) for g in _check_grams(k, l))
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"unbiased HSIC needs n >= 4 samples, got {n}")
    kt, lt = _off_diagonal_centered(k), _off_diagonal_centered(l)
    trace = (kt * lt.T).sum()
    cross = (kt.sum(0) * lt.sum(1)).sum()
    value = trace + kt.sum() * lt.sum() / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)
    return _scaled_back(value / (n * (n - 3)), ek + el)


_NUMBA_RANKS_MIN = 1 << 16  # fewer values: torch.sort is as fast
_RANKS = "_ranks_numba"


def average_ranks(values: Tensor, tol: float = 0.0) -> Tensor:
    """Ranks 1..m of a 1-D tensor, ties receiving their average rank (as scipy's rankdata).

    Values that differ by at most ``tol`` from their neighbor in sorted order form one tie
    (default 0: exactly equal values); a ``tol`` at the rounding error of the computation that
    produced ``values`` keeps values that are equal in exact arithmetic tied.  On the CPU, from
    65,536 values, a compiled radix sort (numba) replaces ``torch.sort``, with the same ranks.
    Integer values get float64 ranks; NaN raises ``ValueError``.
    """
    if not values.is_floating_point():
        values = values.to(torch.float64)
    if bool(torch.isnan(values).any()):
        raise ValueError("average_ranks: values contain NaN, which has no rank")
    m = values.numel()
    if values.device.type == "cpu" and _NUMBA_RANKS_MIN <= m < 2**32 and _compiled.available(_RANKS):
        v = values.detach().to(torch.float64).contiguous().numpy()
        out = np.empty_like(v)
        try:
            _compiled.load(_RANKS).average_ranks(v, float(tol), out)
        except Exception as err:  # the kernel failed to compile (e.g. an incompatible numpy)
            _compiled.disable(_RANKS, err)
        else:
            return torch.from_numpy(out).to(values.dtype)
    return _sorted_average_ranks(values, tol)


def _sorted_average_ranks(values: Tensor, tol: float) -> Tensor:
    """:func:`average_ranks` with ``torch.sort`` (any device)."""
    m = values.numel()
    ordered, order = torch.sort(values)
    starts = torch.ones(m, dtype=torch.bool, device=values.device)
    if m > 1:
        torch.gt(ordered[1:] - ordered[:-1], tol, out=starts[1:])
    del ordered
    group = starts.cumsum(0).sub_(1)
    first = starts.nonzero().squeeze(1)  # sorted position of each tie's first value
    del starts
    last = torch.cat([first[1:], first.new_tensor([m])])  # one past its last value
    avg = (first + last + 1).to(values.dtype) / 2  # mean of the ranks first + 1 .. last
    ranks = torch.empty_like(values)
    ranks[order] = avg[group]
    return ranks
