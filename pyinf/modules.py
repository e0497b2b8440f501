"""Which layers pyinf tracks, and their shapes in pyinf's convention.

A tracked layer is an ``nn.Linear`` (subclasses too), a Hugging Face ``Conv1D`` (GPT-2), or
an ``nn.Conv1d`` / ``nn.Conv2d`` with ``groups=1`` (a linear layer over its input patches,
:mod:`pyinf.conv`), seen as ``y = W x (+ b)`` with ``W`` of shape ``d_out x d_in``. When the
bias is tracked the activations get a trailing 1 (a homogeneous coordinate), so ``d_in`` counts it.
"""
from __future__ import annotations

import inspect
import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

from torch import nn

from . import conv


def _is_conv1d(module: nn.Module) -> bool:
    # Hugging Face's GPT-2 Conv1D: y = x @ W + b with W of shape [d_in, d_out]. Matched by
    # name and attributes so transformers need not be installed.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_trackable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module) or conv.is_patch_conv(module)


_TRACKABLE = "nn.Linear, Conv1D and nn.Conv1d / nn.Conv2d with groups=1 and their own forward"


@dataclass(frozen=True)
class ModuleSpec:
    """A tracked layer: its name in the model, weight shape ``d_out x d_in`` (``d_in``
    counts the bias column), and whether the weight is stored transposed (Conv1D). A
    convolution's ``d_in`` is its patch size, ``in_channels x kernel``."""

    name: str
    d_out: int
    d_in: int
    has_bias: bool
    transposed: bool

    def to_dict(self) -> Dict[str, object]:
        return dict(name=self.name, d_out=self.d_out, d_in=self.d_in, has_bias=self.has_bias,
                    transposed=self.transposed)


def spec_of(name: str, module: nn.Module) -> ModuleSpec:
    has_bias = getattr(module, "bias", None) is not None
    if _is_conv1d(module):
        d_in, d_out = module.weight.shape
        transposed = True
    elif conv.is_convolution(module):
        d_out, d_in = conv.weight_shape(module)
        transposed = False
    else:
        d_out, d_in = module.weight.shape
        transposed = False
    return ModuleSpec(name, int(d_out), int(d_in) + int(has_bias), has_bias, transposed)


def is_expert(name: str) -> bool:
    """Whether a module's name places it in a mixture-of-experts layer's experts (``experts.3``,
    ``experts.expert_1.wi``; a shared expert, which sees every token, is not): such a layer
    runs on the tokens routed to it, which cannot be told apart from other flattened rows."""
    return any(_EXPERT_PART.match(part) for part in name.split("."))


_EXPERT_PART = re.compile(r"^experts?(_?\d+)?$")


def _output_embedding_names(model: nn.Module) -> set:
    """Layers that play the output embedding: the model's own ``get_output_embeddings()``,
    any layer whose weight is shared with an ``nn.Embedding``, or one named ``lm_head``."""
    names = set()
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out_emb = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            out_emb = getter()
        except Exception:  # some models raise NotImplementedError
            out_emb = None
    for name, module in model.named_modules():
        if not is_trackable(module):
            continue
        if module is out_emb or id(module.weight) in embedding_weights or name.split(".")[-1] == "lm_head":
            names.add(name)
    return names


def _never_called(model: nn.Module) -> Dict[str, str]:
    """Linear layers whose owner uses their weight directly, never calling them: name -> owner.
    ``nn.MultiheadAttention`` reads ``out_proj.weight`` inside its functional forward, so
    hooks and forward replacements on ``out_proj`` never run; Hugging Face's Mamba mixer
    multiplies by ``dt_proj.weight`` itself on every path in transformers 5 (a mixer whose
    source calls ``self.dt_proj(`` somewhere, as transformers 4's plain path did, is left to
    the first batch to tell: :meth:`pyinf.capture.Capture._warn_uncalled`)."""
    def prefixed(name, child):
        return f"{name}.{child}" if name else child

    found = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            found[prefixed(name, "out_proj")] = type(m).__name__
        elif type(m).__name__.endswith("MambaMixer") and isinstance(getattr(m, "dt_proj", None), nn.Linear) \
                and not _source_calls(type(m), "self.dt_proj("):
            found[prefixed(name, "dt_proj")] = type(m).__name__
    return found


def _source_calls(cls: type, call: str) -> bool:
    """Whether ``cls``'s source holds ``call``; True when its source cannot be read."""
    try:
        return call in inspect.getsource(cls)
    except (OSError, TypeError):
        return True


def find_tracked_modules(model: nn.Module, names: Optional[List[str]] = None) -> Dict[str, nn.Module]:
    """The modules to track, in the model's own order. ``names=None`` means every
    trackable layer (:func:`is_trackable`) except the output embedding and layers whose
    forward never runs (``nn.MultiheadAttention.out_proj``)."""
    by_name = dict(model.named_modules())
    never_called = _never_called(model)
    if names is None:
        skip = _output_embedding_names(model) | set(never_called)
        tracked = {n: m for n, m in by_name.items() if is_trackable(m) and n not in skip}
        if not tracked:
            raise ValueError(f"{type(model).__name__} has no trackable layer ({_TRACKABLE}; the output "
                             f"embedding excluded)")
        _warn_shared_weights(tracked)
        _warn_untrackable(model)
        return tracked
    if len(names) == 0:
        raise ValueError("the task's tracked module list is empty")
    tracked = {}
    for n in names:
        if n not in by_name:
            alias = dict(model.named_modules(remove_duplicate=False)).get(n)
            if alias is not None:  # a module registered under several names: named_modules() gives its first
                first = next(k for k, m in by_name.items() if m is alias)
                raise ValueError(f"tracked module {n!r} is the module {first!r} under a second name: track it as "
                                 f"{first!r} (once: its calls under every name are summed)")
            near = [k for k in by_name if k.endswith(n.split(".")[-1])][:5]
            raise ValueError(f"tracked module {n!r} is not in the model" + (f"; similar names: {near}" if near else ""))
        if not is_trackable(by_name[n]):
            module = by_name[n]
            why = (f" with groups={module.groups} (a grouped convolution's gradient is one block per group)"
                   if conv.is_convolution(module) and getattr(module, "groups", 1) != 1 else
                   " with a forward of its own (its patches cannot be read from its attributes)"
                   if isinstance(module, (nn.Conv1d, nn.Conv2d)) else
                   f" (kronfluence's wrapper: its prepare_model replaced the layer; give pyinf the model as it was "
                   f"before, or name the wrapped layer, '{n}.original_module')"
                   if type(module).__module__.startswith("kronfluence.") else "")
            raise ValueError(f"tracked module {n!r} is a {type(module).__name__}{why}; pyinf tracks {_TRACKABLE}")
        if n in never_called:
            raise ValueError(f"tracked module {n!r} is never called: its {never_called[n]} uses its weight "
                             f"directly, so no input or output gradient of it can be captured")
        tracked[n] = by_name[n]
    order = {n: i for i, n in enumerate(by_name)}
    tracked = dict(sorted(tracked.items(), key=lambda kv: order[kv[0]]))
    _warn_shared_weights(tracked)
    return tracked


def _warn_shared_weights(tracked: Dict[str, nn.Module]) -> None:
    by_weight: Dict[int, List[str]] = {}
    for n, m in tracked.items():
        by_weight.setdefault(id(m.weight), []).append(n)
    for group in (g for g in by_weight.values() if len(g) > 1):
        warnings.warn(f"pyinf: tracked layers {group} share one weight; each is scored as a layer of its own, "
                      f"so the cross terms between their gradients are left out (as in kronfluence)", stacklevel=4)


def _warn_untrackable(model: nn.Module) -> None:
    """Weight layers that pyinf's default choice leaves out although a user (or kronfluence,
    which tracks them) would count them: convolutions other than Conv1d / Conv2d with groups=1
    (grouped, transposed, 3-D, or with a forward of their own), and mixture-of-experts layers that keep
    all experts' weights in one 3-D parameter (transformers 5's Mixtral, Qwen2-MoE, ...), with
    no Linear layer per expert. A user should know that their share of the influence is missing."""
    def listed(names):
        return f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"

    convs = [name for name, m in model.named_modules() if conv.is_convolution(m) and not conv.is_patch_conv(m)]
    if convs:
        warnings.warn(f"pyinf: {len(convs)} convolution layers ({listed(convs)}) are not tracked (pyinf tracks "
                      f"{_TRACKABLE}), so their influence is left out", stacklevel=4)
    fused = [name for name, m in model.named_modules()
             if is_expert(name) and any(p.dim() >= 3 for p in m.parameters(recurse=False))]
    if fused:
        warnings.warn(f"pyinf: {len(fused)} mixture-of-experts layers keep their experts' weights fused in 3-D "
                      f"parameters ({listed(fused)}), not in nn.Linear layers: pyinf does not track them, so the "
                      f"experts' influence is left out", stacklevel=4)
