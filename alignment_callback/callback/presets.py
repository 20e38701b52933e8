"""Named settings of :class:`AlignmentCallback` that follow a published protocol, with provenance.

A preset is a set of ``AlignmentCallback`` keyword arguments.  :func:`resolve_preset` returns
them with the arguments given explicitly laid over them (an explicit argument replaces the
preset's value whole: an explicit ``measures=`` replaces the preset's measures, options
included).  Presets set only how alignment is *measured* (measures and their options,
preprocessing, pooling, aggregation); the permutation count, α and the seed stay the callback's.
The values the callback reports are calibrated: they differ from the published raw numbers by
design (the raw score is logged too).

``"prh"`` -- The Platonic Representation Hypothesis (Huh, Cheung, Wang, Isola, ICML 2024);
code read at github.com/minyoungg/platonic-rep, commit dcd76ba3c950c1b197a2ae8b1c6713535c94ecf9
(2025-04-12): ``measure_alignment.py`` (``prepare_features``, ``compute_score``,
``compute_alignment``, the ``__main__`` defaults), ``metrics.py`` (``mutual_knn``,
``compute_nearest_neighbors``, ``remove_outliers``), ``extract_features.py`` (pooling).  What
that code does:

* features are pooled when they are extracted, and every hidden state is kept: language models
  average each hidden state (embedding output included) over the tokens the attention mask
  keeps (``--pool avg``; ``last`` is the alternative); vision transformers keep the CLS token
  of every block's output (``blocks.{i}.add_1``, the residual stream; only ``cls`` is allowed);
* every feature file is clamped at q = 0.95 (``prepare_features(q=0.95)`` ->
  ``remove_outliers``): ``x.clamp(-c, c)`` with, by default (``--precise`` off),
  c = the mean over samples of each sample's 0.95-quantile of ``|x|`` over all its layers and
  dimensions (one threshold per model for all layers), and with ``--precise`` (and in
  ``platonic.Alignment.score``) c = the sorted ``|x|`` of the whole (n, layers, d) tensor at
  index ``int(0.95 * numel)``;
* for every layer pair the rows are L2-normalized (``F.normalize``, ``normalize=True``), the
  measure is called with ``topk=10`` (``--topk`` default; passed to every measure whose name
  contains ``"knn"``, ``cknna`` included), and the best score over all pairs is kept (``max``,
  starting from 0) with its layer indices;
* ``mutual_knn``: neighbors by inner product of the normalized rows (cosine), self excluded
  (diagonal set to -1e8), top k by ``argsort``; the score is the mean over samples of
  |N_A(i) ∩ N_B(i)| / k;
* the default measure of ``measure_alignment.py`` is ``mutual_knn``.

The preset: ``measures={"mutual_knn": {"k": 10}}``, ``preprocess={"clamp_quantile": 0.95,
"normalize": True}``, ``aggregate="max"``.  Differences that remain: this library clamps each
layer at its own 0.95-quantile of ``|x|`` (linear interpolation) instead of one threshold for
all layers of a model; pooling is the callback's ``pool`` (default ``"mean"`` over dimension 1,
over the batch's ``attention_mask`` entry when it has one, see ``mask_key``): set
``pool="cls"`` for a ViT side as PRH does; ties between equal similarities may order neighbors
differently.

``"repa"`` -- REPA, Representation Alignment for Generation (Yu, Kwak, Jang, Jeong, Huang, Shin,
Xie; arXiv:2410.06940, 2024; ICLR 2025); code read at github.com/sihyun-yu/REPA, commit
67f714503e3892f993844aab088ffc5791c92613 (2025-01-23).  That code trains with REPA but holds no
code for the CKNNA curves of the paper (Fig. 2); issue #24 ("Code for computing the CKNNA
scores", github.com/sihyun-yu/REPA/issues/24, open) and #54 (reproduction, open, no answer) ask
for it, #44 is redirected to #24.  What the author says there (2025-05-21): no class labels
(a null label) were used when extracting the features; the diffusion timestep is the one the
paper states; the representations were averaged across the patch axis (one vector of the hidden
dimension per image).  What the training code shows: the aligned DiT/SiT hidden state is the
output of block ``encoder_depth`` (default 8; 4 for SiT-B/2 per issue #5) passed through an
MLP projector, the target is DINOv2's ``x_norm_patchtokens`` (final layer, layer-normed, patch
tokens only, no CLS) of the image resized to 224 (for 256 px), and the loss is the negative
cosine similarity per patch, weighted ``--proj-coeff`` (default 0.5).

The preset: ``measures={"cknna": {"k": 10}}``, ``pool="mean"`` (the patch mean; exact for a
DiT/SiT hidden state of shape (n, patches, d), which has no CLS token), ``preprocess=True``
(rows L2-normalized, as PRH's pipeline does).  Unknown (not in REPA's code or threads): k
(10 is PRH's default, which REPA's CKNNA presumably came from), whether rows were normalized or
clamped, which DINOv2 layer was the target of the curves (presumably the final patch tokens the
loss uses), which SiT layers and timesteps each figure used, whether the projector was applied
(the question is asked in #24 and not answered there), and the probe size (number of images).
DINOv2 module outputs hold the CLS token (and register tokens) before the patch tokens: with
the reference run live, pass ``reference_pool=patch_mean(1)`` (or ``1 + registers``), or save
patch-mean features once and pass those.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import Tensor

#: Marks an argument the caller did not give (resolve_preset leaves such entries out).
UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET", "__bool__": lambda self: False})()

#: The AlignmentCallback arguments a preset may set.
PRESET_ARGUMENTS = ("measures", "preprocess", "pool", "reference_pool", "aggregate")


@dataclass(frozen=True)
class Preset:
    """One preset: ``arguments`` (``AlignmentCallback`` keyword arguments), a one-line
    ``summary``, ``sources`` (what was read, with addresses) and ``provenance`` (what the
    sources do, what the preset reproduces, what is unknown)."""

    name: str
    summary: str
    arguments: Mapping[str, Any]
    sources: tuple[str, ...]
    provenance: str
    unknown: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        unknown_args = set(self.arguments) - set(PRESET_ARGUMENTS)
        if unknown_args:
            raise ValueError(f"preset {self.name!r}: arguments {sorted(unknown_args)} cannot be "
                             f"set by a preset (only {', '.join(PRESET_ARGUMENTS)})")
        object.__setattr__(self, "arguments", _frozen(self.arguments))


def _frozen(value: Any) -> Any:
    """``value`` with every mapping read-only and every list a tuple, at every depth: a preset
    changed in place would change every later ``preset=`` of the process."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _thawed(value: Any) -> Any:
    """A fresh copy of a :func:`_frozen` value with plain dicts (the caller may change it)."""
    if isinstance(value, Mapping):
        return {k: _thawed(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_thawed(v) for v in value)
    return value


PRH = Preset(
    name="prh",
    summary="mutual kNN, k = 10, rows clamped at the 0.95-quantile of |x| and L2-normalized, "
            "max over layer pairs (PRH's measure_alignment.py)",
    arguments={
        "measures": {"mutual_knn": {"k": 10}},
        "preprocess": {"clamp_quantile": 0.95, "normalize": True},
        "aggregate": "max",
    },
    sources=(
        ("Huh, Cheung, Wang, Isola. The Platonic Representation Hypothesis. ICML 2024, "
         "arXiv:2405.07987"),
        ("github.com/minyoungg/platonic-rep @ dcd76ba3c950c1b197a2ae8b1c6713535c94ecf9: "
         "measure_alignment.py (prepare_features, compute_score, compute_alignment, CLI "
         "defaults --metric mutual_knn --topk 10), metrics.py (mutual_knn, "
         "compute_nearest_neighbors, remove_outliers), extract_features.py (pooling)"),
    ),
    provenance=(
        "PRH pools at extraction (language models: mean of every hidden state over the "
        "attention mask; ViTs: CLS token of every block output), clamps every feature file at "
        "q = 0.95 (remove_outliers: one threshold for all layers of a model, by default the "
        "mean over samples of per-sample quantiles, with --precise the global order statistic), "
        "L2-normalizes the rows of each layer, scores every layer pair with mutual_knn at "
        "topk = 10 (cosine neighbors, self excluded, mean |N_A(i) ∩ N_B(i)| / k) and keeps the "
        "maximum over pairs. This preset: mutual_knn k = 10, clamp 0.95 then L2 rows, max over "
        "pairs. Differences: the clamp threshold is per layer here (0.95-quantile of that "
        "layer's |x|, interpolated); pooling is the callback's pool (default mean over dim 1, "
        "over the batch's attention_mask when it has one; PRH used CLS for ViTs: pass "
        "pool='cls')."
    ),
    unknown=(),
)

REPA = Preset(
    name="repa",
    summary="CKNNA, k = 10, on token-averaged hidden states with L2-normalized rows (REPA's "
            "alignment curves, as far as its public threads document them; the patch average "
            "of a DiT/SiT, which has no CLS token; for a ViT reference pass "
            "reference_pool=patch_mean(1) to leave its CLS token out)",
    arguments={
        "measures": {"cknna": {"k": 10}},
        "pool": "mean",
        "preprocess": True,
    },
    sources=(
        ("Yu, Kwak, Jang, Jeong, Huang, Shin, Xie. Representation Alignment for Generation: "
         "Training Diffusion Transformers Is Easier Than You Think. arXiv:2410.06940 (2024), "
         "ICLR 2025"),
        ("github.com/sihyun-yu/REPA @ 67f714503e3892f993844aab088ffc5791c92613: train.py "
         "(DINOv2 x_norm_patchtokens target, --proj-coeff 0.5, --encoder-depth 8), loss.py "
         "(negative cosine per patch), models/sit.py (projector on block encoder_depth); no "
         "CKNNA code"),
        ("github.com/sihyun-yu/REPA/issues/24 (author, 2025-05-21: null label, timestep as in "
         "the paper, representations averaged across the patch axis; code not released)"),
        ("github.com/sihyun-yu/REPA/issues/44 (redirected to #24), /issues/54 (reproduction "
         "of Fig. 2b, unanswered), /issues/5 (alignment depth 4 for SiT-B/2)"),
    ),
    provenance=(
        "REPA's repository has no code for its CKNNA curves. Its author states in issue #24 "
        "that features were extracted with a null class label, at the paper's timesteps, and "
        "averaged across the patch axis. This preset: cknna k = 10 on mean-pooled (patch "
        "averaged) features with L2-normalized rows, as PRH's pipeline (which defined CKNNA) "
        "does. k = 10 is PRH's default, not stated by REPA's code or threads."
    ),
    unknown=(
        "k (10 assumed: PRH's default)",
        "whether rows were L2-normalized or outlier-clamped",
        ("which DINOv2 layer the curves used (presumably the final patch tokens, the loss "
         "target) and whether its CLS/register tokens were excluded from the average"),
        ("which SiT layers and timesteps each figure used, and whether the projector's output "
         "or the raw hidden state was measured (asked in #24, not answered there)"),
        "the probe: how many images, which split",
    ),
)

PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in (PRH, REPA)})


def resolve_preset(name: str | None, explicit_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The preset's arguments with ``explicit_kwargs`` laid over them.

    ``{**PRESETS[name].arguments, **given}`` (a fresh copy), with ``given`` the entries of
    ``explicit_kwargs`` that are not :data:`UNSET`.

    Parameters
    ----------
    name : str or None
        A key of :data:`PRESETS` (``"prh"``, ``"repa"``), or None (no preset: the explicit
        arguments alone).
    explicit_kwargs : mapping of str to Any
        The arguments the caller gave; entries equal to :data:`UNSET` count as not given.  An
        explicit argument replaces the preset's value whole.

    Returns
    -------
    dict
        A new dict (the preset's values are copies: changing them changes no preset).

    Raises
    ------
    ValueError
        An unknown name (the message lists the presets).

    Examples
    --------
    >>> from alignment_callback.callback.presets import UNSET, resolve_preset
    >>> settings = resolve_preset("prh", {"aggregate": "mean", "pool": UNSET})
    >>> settings["measures"], settings["aggregate"], "pool" in settings
    ({'mutual_knn': {'k': 10}}, 'mean', False)
    """
    given = {k: v for k, v in explicit_kwargs.items() if v is not UNSET}
    if name is None:
        return given
    if not isinstance(name, str) or name not in PRESETS:
        known = ", ".join(f"{key!r} ({p.summary})" for key, p in PRESETS.items())
        raise ValueError(f"unknown preset {name!r}; the presets are: {known}")
    out = _thawed(PRESETS[name].arguments)
    out.update(given)
    return out


def patch_mean(prefix_tokens: int = 1) -> Callable[[Tensor], Tensor]:
    """A ``pool`` for ViT outputs (n, tokens, d) that averages the patch tokens only.

    ``pool(x)_i = mean_{t >= p} x[i, t]`` with p = ``prefix_tokens``, the leading tokens
    skipped (1 for DINOv2's CLS token; 1 + 4 for DINOv2 with registers).

    Parameters
    ----------
    prefix_tokens : int, default=1
        Leading tokens to leave out, an integer >= 0.

    Returns
    -------
    callable
        ``pool(x: Tensor (n, tokens, d)) -> Tensor (n, d)``, for ``pool=`` /
        ``reference_pool=``; it raises ``ValueError`` for outputs that are not 3-D or have
        at most ``prefix_tokens`` tokens.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.callback.presets import patch_mean
    >>> x = torch.tensor([[[9.0], [1.0], [3.0]]])  # CLS, then two patches
    >>> patch_mean(1)(x)
    tensor([[2.]])
    """
    if (isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, numbers.Integral)
            or prefix_tokens < 0):
        raise ValueError(f"patch_mean: prefix_tokens must be an integer >= 0, got "
                         f"{prefix_tokens!r}")
    prefix_tokens = int(prefix_tokens)

    def pool(x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] <= prefix_tokens:
            raise ValueError(f"patch_mean({prefix_tokens}) needs (n, tokens, d) outputs with more "
                             f"than {prefix_tokens} tokens, got shape {tuple(x.shape)}")
        return x[:, prefix_tokens:].mean(1)

    pool.__qualname__ = pool.__name__ = f"patch_mean({prefix_tokens})"
    return pool
