"""Independent float64 NumPy reference implementations of the alignment measures.

Written directly from the definitions in docs/measures.md (not from the library's code) so that the
tests compare two independent implementations. Clarity over speed: loops are fine here.

All functions take NumPy arrays X (n, p), Y (n, q) and return Python floats.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "linear_gram",
    "rbf_gram",
    "squared_distances",
    "median_sigma",
    "centering",
    "hsic_biased",
    "hsic_unbiased",
    "linear_cka",
    "rbf_cka",
    "unbiased_cka",
    "knn_indices",
    "knn_mask",
    "mutual_knn",
    "cycle_knn",
    "cknna",
    "svcca",
    "lcs_length",
    "levenshtein",
    "lcs_knn",
    "edit_distance_knn",
    "average_ranks",
    "rsa",
]


#: The measures this module implements (the CKA, kNN, SVCCA and RSA families); the shape, CCA,
#: predictivity and RV families are in ``numpy_reference_families.py``.
MEASURES = ("linear_cka", "rbf_cka", "unbiased_cka", "mutual_knn", "cycle_knn", "cknna", "svcca",
            "lcs_knn", "edit_distance_knn", "rsa")


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


# --------------------------------------------------------------------------- grams / HSIC


def linear_gram(x) -> np.ndarray:
    x = _f64(x)
    return x @ x.T


def squared_distances(x) -> np.ndarray:
    """All n^2 squared Euclidean distances, by explicit differences (no expansion trick)."""
    x = _f64(x)
    n = x.shape[0]
    d2 = np.empty((n, n))
    for i in range(n):
        diff = x - x[i]
        d2[i] = np.sum(diff * diff, axis=1)
    return d2


def median_sigma(x) -> float:
    """sigma = sqrt(median of all n^2 squared distances), diagonal zeros included."""
    return float(np.sqrt(np.median(squared_distances(x))))


def rbf_gram(x, sigma=1.0) -> np.ndarray:
    d2 = squared_distances(x)
    if isinstance(sigma, str):
        if sigma != "median":
            raise ValueError(f"unknown sigma {sigma!r}")
        sigma = median_sigma(x)
    return np.exp(-d2 / (2.0 * float(sigma) ** 2))


def centering(n: int) -> np.ndarray:
    """H = I - 11^T / n."""
    return np.eye(n) - np.ones((n, n)) / n


def hsic_biased(K, L) -> float:
    """tr(K H L H)."""
    K, L = _f64(K), _f64(L)
    n = K.shape[0]
    H = centering(n)
    return float(np.trace(K @ H @ L @ H))


def hsic_unbiased(K, L) -> float:
    """Song et al. (2012) eq. 5, exactly as docs/measures.md writes it.

    With K~, L~ the grams with zeroed diagonals:
    [tr(K~L~) + 1'K~1 * 1'L~1 / ((n-1)(n-2)) - 2 * 1'K~L~1 / (n-2)] / (n(n-3)),
    where tr(K~L~) = sum_ij K~_ij L~_ji (valid for non-symmetric matrices too).
    """
    Kt = _f64(K).copy()
    Lt = _f64(L).copy()
    n = Kt.shape[0]
    np.fill_diagonal(Kt, 0.0)
    np.fill_diagonal(Lt, 0.0)
    tr_KL = np.sum(Kt * Lt.T)  # sum_ij K~_ij L~_ji
    one = np.ones(n)
    term2 = (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 * (one @ (Kt @ Lt) @ one) / (n - 2)
    return float((tr_KL + term2 - term3) / (n * (n - 3)))


def _cka_from_grams(K, L, hsic) -> float:
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


# --------------------------------------------------------------------------- CKA family


def linear_cka(x, y) -> float:
    return float(_cka_from_grams(linear_gram(x), linear_gram(y), hsic_biased))


def rbf_cka(x, y, sigma=1.0) -> float:
    """RBF CKA with absolute sigma (or "median", computed separately for x and for y)."""
    return float(_cka_from_grams(rbf_gram(x, sigma), rbf_gram(y, sigma), hsic_biased))


def unbiased_cka(x, y) -> float:
    return float(_cka_from_grams(linear_gram(x), linear_gram(y), hsic_unbiased))


# --------------------------------------------------------------------------- kNN family


def knn_indices(x, k: int, keys=None) -> np.ndarray:
    """(n, k) indices of the k rows with the largest inner product <x_i, x_j>, j != i.

    Ordered by decreasing similarity; exact ties go to the lower ``keys`` value (the library's
    per-row tie-breaking priorities), or to the smaller index when ``keys`` is None.
    """
    return _top_k_rows(_f64(x) @ _f64(x).T, k, keys)


def _top_k_rows(G, k: int, keys=None) -> np.ndarray:
    n = G.shape[0]
    keys = np.arange(n) if keys is None else np.asarray(keys)
    out = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        others = np.array([j for j in range(n) if j != i])
        # lexsort: last key is primary -> decreasing similarity, then increasing priority
        order = np.lexsort((keys[others], -G[i, others]))
        out[i] = others[order[:k]]
    return out


def mutual_knn(x, y, k: int = 10, keys_x=None, keys_y=None) -> float:
    """mean_i |N_X(i) & N_Y(i)| / k."""
    nx, ny = knn_indices(x, k, keys_x), knn_indices(y, k, keys_y)
    n = nx.shape[0]
    return float(np.mean([len(set(nx[i]) & set(ny[i])) / k for i in range(n)]))


def cycle_knn(x, y, k: int = 10, keys_x=None, keys_y=None) -> float:
    """mean_i 1[exists j in N_Y(i): i in N_X(j)]."""
    nx, ny = knn_indices(x, k, keys_x), knn_indices(y, k, keys_y)
    n = nx.shape[0]
    hits = [any(i in set(nx[j]) for j in ny[i]) for i in range(n)]
    return float(np.mean(hits))


def knn_mask(K, k: int, keys=None) -> np.ndarray:
    """M(i, j) = 1[j in the k largest entries of row i of K, j != i] (ties as knn_indices)."""
    K = _f64(K)
    n = K.shape[0]
    M = np.zeros((n, n))
    top = _top_k_rows(K, k, keys)
    for i in range(n):
        M[i, top[i]] = 1.0
    return M


def cknna(x, y, k: int = 10, keys_x=None, keys_y=None) -> float:
    """PRH CKNNA: sim(K, L) = HSIC_unbiased(M*K, M*L) with M = M_K * M_L (self excluded);
    sim(K, K) uses M_K. CKNNA = sim(K, L) / sqrt(sim(K, K) sim(L, L)). No epsilon."""
    K, L = linear_gram(x), linear_gram(y)
    MK, ML = knn_mask(K, k, keys_x), knn_mask(L, k, keys_y)
    M = MK * ML
    s_kl = hsic_unbiased(M * K, M * L)
    s_kk = hsic_unbiased(MK * K, MK * K)
    s_ll = hsic_unbiased(ML * L, ML * L)
    return float(s_kl / np.sqrt(s_kk * s_ll))


def lcs_length(a, b) -> int:
    """Length of the longest common subsequence of sequences a and b."""
    a, b = list(a), list(b)
    T = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            if a[i - 1] == b[j - 1]:
                T[i][j] = T[i - 1][j - 1] + 1
            else:
                T[i][j] = max(T[i - 1][j], T[i][j - 1])
    return T[len(a)][len(b)]


def levenshtein(a, b) -> int:
    """Unit-cost insert / delete / substitute edit distance."""
    a, b = list(a), list(b)
    D = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        D[i][0] = i
    for j in range(len(b) + 1):
        D[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            D[i][j] = min(D[i - 1][j] + 1, D[i][j - 1] + 1, D[i - 1][j - 1] + cost)
    return D[len(a)][len(b)]


def lcs_knn(x, y, k: int = 10, keys_x=None, keys_y=None) -> float:
    """mean_i LCS(N_X(i), N_Y(i)) / k, on neighbor lists ordered by decreasing similarity."""
    nx, ny = knn_indices(x, k, keys_x), knn_indices(y, k, keys_y)
    return float(np.mean([lcs_length(a, b) for a, b in zip(nx, ny)]) / k)


def edit_distance_knn(x, y, k: int = 10, keys_x=None, keys_y=None) -> float:
    """1 - mean_i Levenshtein(N_X(i), N_Y(i)) / k."""
    nx, ny = knn_indices(x, k, keys_x), knn_indices(y, k, keys_y)
    return float(1.0 - np.mean([levenshtein(a, b) for a, b in zip(nx, ny)]) / k)


# --------------------------------------------------------------------------- SVCCA


def svcca(x, y, cca_dim: int = 10) -> float:
    """Center and scale columns (divide by std), keep the top cca_dim left singular vectors of
    each side, return the mean canonical correlation = mean singular value of U1^T U2."""

    def top_left_singular(a):
        a = _f64(a)
        a = a - a.mean(axis=0, keepdims=True)
        std = a.std(axis=0, keepdims=True)
        std[std == 0] = 1.0  # constant column: stays all-zero
        a = a / std
        U, _, _ = np.linalg.svd(a, full_matrices=False)
        return U[:, :cca_dim]

    U1, U2 = top_left_singular(x), top_left_singular(y)
    rho = np.linalg.svd(U1.T @ U2, compute_uv=False)
    return float(np.mean(rho))


# --------------------------------------------------------------------------- RSA


def average_ranks(v) -> np.ndarray:
    """Ranks 1..m, ties receive the average of the ranks they span."""
    v = _f64(v)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _pearson(a, b) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a @ b) / np.sqrt((a @ a) * (b @ b)))


def rsa(x, y) -> float:
    """Spearman correlation of the upper triangles (i < j) of the two cosine-distance matrices
    1 - cos(x_i, x_j) (rows are normalized here for the cosine)."""

    def cos_dist_upper(a):
        a = _f64(a)
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        D = 1.0 - a @ a.T
        iu = np.triu_indices(a.shape[0], k=1)
        return D[iu]

    return _pearson(average_ranks(cos_dist_upper(x)), average_ranks(cos_dist_upper(y)))
