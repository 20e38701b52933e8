"""Choose layers by exact name, glob or regex: the submodules to hook, or saved features' layers.

Names are *normalized*: the prefixes that wrappers add are removed, so the same layer name works
on a plain model, a ``torch.compile``-d one (``_orig_mod.``) and a DDP / DataParallel one
(``module.``).  Hooks are still put on the real submodules.  A wrapper is recognized by the
model's structure, not by a name alone: a child called ``module`` that sits next to other
children is a real layer, and its name keeps its ``module.`` prefix.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from typing import Any, Iterable, Sequence, Union

from torch import nn

LayerSpec = Union[str, "re.Pattern[str]"]
Layers = Union[LayerSpec, Sequence[LayerSpec]]

_WRAPPER_ATTRS = ("module", "_orig_mod")
_WRAPPER_PREFIX = re.compile(r"^(?:(?:module|_orig_mod)\.)+")


def _only_child(module: nn.Module) -> str | None:
    """The name of ``module``'s child when it has exactly one, else None."""
    children = list(module.named_children())
    return children[0][0] if len(children) == 1 else None


def _wrapper_prefix(model: nn.Module) -> str:
    """Real-name prefix of the innermost model under DDP / DataParallel / compile wrappers.

    A wrapper is recognized by its structure: a module whose *only* child is named ``module``
    or ``_orig_mod`` (so stripping the prefix can never make two names collide).
    """
    prefix = ""
    root = model
    while (child := _only_child(root)) in _WRAPPER_ATTRS:
        prefix += child + "."
        root = getattr(root, child)
    return prefix


def normalize_pattern(name: str) -> str:
    """Strip leading ``module.`` / ``_orig_mod.`` and inner ``._orig_mod`` segments from a name
    written for a wrapped model (used for a layer spec that matches nothing as written)."""
    name = _WRAPPER_PREFIX.sub("", name)
    return re.sub(r"(^|\.)_orig_mod(?=\.|$)", "", name).lstrip(".")


def named_layers(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """Every hookable submodule as ``(normalized_name, real_name, module)``, in model order.

    The normalized name drops the wrappers' prefix (:func:`_wrapper_prefix`) and the
    ``_orig_mod`` segment of an inner ``torch.compile`` wrapper (a module whose only child is
    ``_orig_mod``).  The root module (and the wrapper modules above the real model) are
    skipped; an inner compile wrapper and the module it wraps get the same name, and the outer
    one is kept.
    """
    prefix = _wrapper_prefix(model)
    compiled = {f"{real}._orig_mod" if real else "_orig_mod"
                for real, module in model.named_modules() if _only_child(module) == "_orig_mod"}
    out: list[tuple[str, str, nn.Module]] = []
    seen: set[str] = set()
    for real, module in model.named_modules():
        if not real.startswith(prefix):
            continue  # the root or one of the wrappers above the real model
        parts = real.split(".")
        kept = [part for i, part in enumerate(parts)
                if i >= prefix.count(".") and ".".join(parts[:i + 1]) not in compiled]
        name = ".".join(kept)
        if not name or name in seen:
            continue
        seen.add(name)
        out.append((name, real, module))
    return out


def _glob_to_regex(pattern: str) -> "re.Pattern[str]":
    """Translate a dotted-name glob: ``*`` stays inside one component, ``**`` spans several; a
    ``**.`` component also matches none (``"**.fc"`` matches ``fc``, ``"a.**.b"`` matches
    ``a.b``)."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**.", i) and (i == 0 or pattern[i - 1] == "."):
            out.append(r"(?:.*\.)?")  # zero or more whole components
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : j]
                body = "^" + body[1:] if body.startswith("!") else body
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def _matcher(spec: LayerSpec, prefix: str = "", legacy: bool = False
             ) -> tuple[str, Callable[[str, str], bool]]:
    """Return ``(label, match(normalized_name, real_name) -> bool)`` for one layer spec.

    ``prefix``: the model's wrapper prefix, dropped from the start of a name or glob.
    ``legacy``: normalize the spec by its look alone (:func:`normalize_pattern`), for a spec
    written for a wrapped model used on another (tried only when it matches nothing as is).
    """
    def short(text: str) -> str:
        if legacy:
            return normalize_pattern(text)
        return text[len(prefix):] if prefix and text.startswith(prefix) else text

    if isinstance(spec, re.Pattern):
        return spec.pattern, lambda n, r: bool(spec.fullmatch(n) or spec.fullmatch(r))
    if not isinstance(spec, str):
        raise TypeError(f"layers: each layer must be a str (a name, glob or 're:' regex) or a "
                        f"re.Pattern, got {spec!r} of type {type(spec).__name__}")
    if spec.startswith("re:"):
        try:
            rx = re.compile(spec[3:])
        except re.error as err:
            raise ValueError(f"layers: {spec!r} is not a valid regular expression ({err})"
                             ) from err
        return spec[3:], lambda n, r: bool(rx.fullmatch(n) or rx.fullmatch(r))
    if any(c in spec for c in "*?["):
        try:
            raw, norm = _glob_to_regex(spec), _glob_to_regex(short(spec))
        except re.error as err:
            raise ValueError(f"layers: {spec!r} is not a valid glob ({err}; a '[...]' "
                             "character class needs ranges in order, e.g. '[0-3]')") from err
        return spec, lambda n, r: bool(norm.fullmatch(n) or raw.fullmatch(r))
    name = short(spec)
    return spec, lambda n, r: n == name or r == spec


def _as_list(layers: Layers) -> list[LayerSpec]:
    if isinstance(layers, (str, re.Pattern)):
        return [layers]
    if isinstance(layers, (bytes, Mapping)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be a name, a glob, a 're:' regex, a re.Pattern or a list "
                        f"of them, got {layers!r} of type {type(layers).__name__}")
    out = list(layers)
    if not out:
        raise ValueError("no layers given: pass a name, a glob, a 're:' regex, or a list of them")
    return out


def resolve_modules(model: nn.Module, layers: Layers, model_name: str = "model"
                    ) -> list[tuple[str, nn.Module]]:
    """Like :func:`resolve_layers` but returns ``(normalized_name, module)`` pairs."""
    table = named_layers(model)
    prefix = _wrapper_prefix(model)
    chosen: set[str] = set()
    for spec in _as_list(layers):
        label, match = _matcher(spec, prefix)
        # a name that reads as a glob ("h[0]", a ModuleDict key) chooses itself
        exact = [name for name, real, _ in table if isinstance(spec, str) and spec in (name, real)]
        hits = exact or [name for name, real, _ in table if match(name, real)]
        if not hits:  # a name written for a wrapped model (``module.``), used on another
            hits = [name for name, real, _ in table if _matcher(spec, legacy=True)[1](name, real)]
        if not hits:
            names = [name for name, _, _ in table]
            raise ValueError(_no_match(spec, label, names, f"the {model_name}'s {len(names)} "
                                       "layers", normalize_pattern(label),
                                       _alias(model, spec, table))
                             + " Use list_layers(model, batch) to see every name and its "
                             "output shape.")
        chosen.update(hits)
    return [(name, module) for name, _, module in table if name in chosen]


def _no_match(spec: LayerSpec, label: str, names: list[str], among: str, like: str,
              note: str = "") -> str:
    """The message for a spec that matched none of the layer ``names`` (``among`` says whose;
    the closest names are those most ``like`` it)."""
    close = difflib.get_close_matches(like, names, n=5, cutoff=0.5)
    # a "re:" string or a compiled pattern: shown as given, with the fullmatch rule
    pattern = isinstance(spec, re.Pattern)
    regex = pattern or (isinstance(spec, str) and spec.startswith("re:"))
    kind = "a regex" if pattern else "a 're:' regex"
    rule = f" ({kind} must match the whole name)" if regex else ""
    return (f"layer {spec if regex else label!r} matched none of {among}" + rule + note
            + f"; closest names: {close or names[:5]}.")


def resolve_names(names: Sequence[str], layers: Layers, owner: str = "the features"
                  ) -> list[str]:
    """Resolve layer specs against a list of layer names, such as saved features' layers.

    The same specs as :func:`resolve_layers` (exact names, globs, ``"re:"`` regexes,
    ``re.Pattern``), matched against ``names`` as they are (no wrapper prefix to remove); a
    spec equal to a name chooses that name, even one that reads as a glob (``"h[0]"``).

    Parameters
    ----------
    names : sequence of str
        The layer names to choose from.
    layers : str, re.Pattern or sequence of them
        One spec or a sequence of specs (see :func:`resolve_layers`).
    owner : str, default="the features"
        Whose names they are, for error messages ("matched none of the 3 layers of <owner>").

    Returns
    -------
    list of str
        The matched names, without duplicates, in the order of ``names``.

    Raises
    ------
    ValueError
        A spec matches no name (the message lists the closest ones), or is an invalid regex /
        glob.
    TypeError
        ``layers`` is not a spec or a sequence of specs.

    Examples
    --------
    >>> from alignment_callback.hooks.selection import resolve_names
    >>> resolve_names(["blocks.0", "blocks.1", "head"], ["head", "blocks.*"])
    ['blocks.0', 'blocks.1', 'head']
    """
    names = list(dict.fromkeys(str(name) for name in names))
    chosen: set[str] = set()
    for spec in _as_list(layers):
        label, match = _matcher(spec)
        hits = [spec] if spec in names else [name for name in names if match(name, name)]
        if not hits:
            raise ValueError(_no_match(spec, label, names, f"the {len(names)} layers of {owner}",
                                       label))
        chosen.update(hits)
    return [name for name in names if name in chosen]


def about_argument(error: ValueError | TypeError, argument: str) -> ValueError | TypeError:
    """``error`` itself (type and traceback kept), its message about ``argument``: the messages
    above speak of ``layers``, the argument of :func:`resolve_layers`."""
    message = str(error)
    message = (argument + message[len("layers"):] if message.startswith("layers")
               else f"{argument}: {message}")
    error.args = (message, *error.args[1:])
    return error


def _alias(model: nn.Module, spec: Any, table: list) -> str:
    """A note for a name that is a second attribute of a module listed under another name
    (``self.tied = self.inp``: ``named_modules`` lists each module once), else ""."""
    if not isinstance(spec, str) or spec.startswith("re:"):
        return ""
    try:
        module = model.get_submodule(spec)
    except AttributeError:
        return ""
    listed = next((name for name, _, m in table if m is module), None)
    return "" if listed is None else (f" ({spec!r} is another name of the module {listed!r}, "
                                      "which is listed once, under that name: use it)")


def resolve_layers(model: nn.Module, layers: Layers, model_name: str = "model") -> list[str]:
    """Resolve layer specs to normalized module names, in model (``named_modules``) order.

    Parameters
    ----------
    model : nn.Module
        The model, possibly wrapped by DDP / DataParallel (``module.``) or ``torch.compile``
        (``_orig_mod.``); those prefixes are removed from names.
    layers : str, re.Pattern or sequence of them
        One spec or a sequence of specs; each is

        * an exact module name (``"encoder.layer.3"``; ``"module.encoder.layer.3"`` also
          works on a wrapped model; a name that reads as a glob, such as the ``ModuleDict``
          key ``"h[0]"``, chooses that module),
        * a glob (``"encoder.layer.*.output"``): ``*`` and ``?`` stay within one dotted
          component, ``**`` spans several (a ``**.`` component none too: ``"**.fc"``
          matches ``fc`` and ``head.fc``), ``[...]`` is a character class,
        * a regex, as a ``"re:"``-prefixed string or a compiled ``re.Pattern``, which must
          match the whole name (``re.fullmatch``).
    model_name : str, default="model"
        How error messages call the model (the callback says ``"student model"`` or
        ``"reference model"``).

    Returns
    -------
    list of str
        The matched names, without duplicates, in the order of ``model.named_modules()``.

    Raises
    ------
    ValueError
        A spec matches no module (the message lists the closest valid names), or is an
        invalid regex / glob.
    TypeError
        ``layers`` is not a spec or a sequence of specs.

    Examples
    --------
    >>> from torch import nn
    >>> from alignment_callback.hooks import resolve_layers
    >>> model = nn.Sequential()
    >>> model.add_module("encoder", nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    >>> model.add_module("head", nn.Linear(4, 2))
    >>> resolve_layers(model, "encoder.*")
    ['encoder.0', 'encoder.1', 'encoder.2']
    >>> resolve_layers(model, ["head", r"re:encoder\\.[02]"])  # model order, not spec order
    ['encoder.0', 'encoder.2', 'head']
    """
    return [name for name, _ in resolve_modules(model, layers, model_name)]


def layer_names(model: nn.Module) -> Iterable[str]:
    """All normalized hookable layer names of ``model``, in model order."""
    return [name for name, _, _ in named_layers(model)]
