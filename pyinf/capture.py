"""Capture of each tracked layer's inputs and output gradients, per batch, without ever
computing a weight gradient.

While a :class:`Capture` is active:

- every parameter of the model has ``requires_grad=False``, so autograd builds no weight
  gradient and does no backward work below the lowest tracked layer;
- each tracked stock ``nn.Linear`` / ``Conv1D`` runs through :class:`_TrackedLinear`, whose output
  requires grad through a shared zero-size "anchor" leaf, and whose backward computes only
  the input gradient (when something below needs it) and hands ``(acts, grads)`` of the
  layer to a consumer, then lets them go;
- a convolution, a Linear subclass with its own ``forward``, or a layer with a ``forward``
  set on the instance (accelerate's hooks, monkeypatched adapters), keeps it, and its output is wrapped
  in an identity function that does the same hand-off (like kronfluence, this relies on
  that forward's output being ``W x + b``, plus terms that do not depend on it).

Activations reach the consumer as ``[B, T, d_in]`` (with a trailing ones column when the
bias is tracked: then a strided view whose rows are padded to 16 elements, see
:func:`_append_ones`) and gradients as ``[B, T, d_out]``, in the model's dtype, whatever
the layer's own layout (pooled, flattened or sequence-first: see :meth:`Capture._as_tokens`;
a convolution's tokens are its output positions, its activations their input patches).
"""
from __future__ import annotations

import functools
import math
import warnings
import weakref
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import conv
from ._padding import padded_empty
from .modules import ModuleSpec, is_expert

# consumer(spec, acts [B,T,d_in], grads [B,T,d_out], mask [B,T] bool or None)
Consumer = Callable[[ModuleSpec, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], None]


class CaptureError(RuntimeError):
    pass


class _Site:
    """Per tracked module state for one batch.

    A layer called several times in one forward (weights shared across depth, as ALBERT's,
    or a recurrent cell) has one weight gradient, the sum over its calls of ``g a^T``: its
    calls' inputs and output gradients are kept as their backwards run and handed over
    together, their tokens joined (``[B, calls x T, d]``), once the last one has run (or at
    the batch's end, for a call whose output did not reach the loss: its gradient is 0)."""

    def __init__(self, capture: "Capture", spec: ModuleSpec):
        self.capture = capture
        self.spec = spec
        self.calls = 0
        self.pending: List[tuple] = []  # (input, output gradient) of this batch's calls, backward order

    def on_forward(self) -> None:
        if _in_backward() or not torch.is_grad_enabled():
            # activation checkpointing recomputing the block (pyinf.checkpoint), or a call under
            # no_grad (a task's check, a target computed without gradient), which has no
            # backward and so is not captured: not a call that counts
            return
        self.calls += 1

    def on_backward(self, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        self.pending.append((x, grad_out))
        if len(self.pending) >= self.calls:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            calls, self.pending = self.pending[::-1], []  # in the forward's order
            self.capture._deliver(self.spec, calls)


def _append_ones(acts: torch.Tensor) -> torch.Tensor:
    """[B, T, d] -> [B, T, d + 1] with a ones column (the bias's input), with rows padded
    for the kernels (:mod:`pyinf._padding`)."""
    b, t, d = acts.shape
    out = padded_empty(b, t, d + 1, dtype=acts.dtype, device=acts.device)
    out[..., :d] = acts
    out[..., d] = 1
    return out


def _in_backward() -> bool:
    """True while autograd runs a backward on this thread: a tracked layer's forward seen then
    is a recomputation by non-reentrant activation checkpointing, which rebuilds the tensors
    the original layer saved (its backward, which captures, runs once, with them)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class _TrackedLinear(torch.autograd.Function):
    """``y = x W^T + b`` whose backward returns only the input gradient and hands the layer's
    input and output gradient to the capture site."""

    @staticmethod
    def forward(ctx, x, weight, bias, anchor, site):
        del anchor  # only there to make the output require grad
        ctx.site = site
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        ctx.site.on_backward(x, grad_out)
        return grad_x, None, None, None, None


class _TrackedIdentity(torch.autograd.Function):
    """Identity on a custom layer's output; backward hands the layer's saved input and the
    output gradient to the capture site."""

    @staticmethod
    def forward(ctx, out, anchor, x, site):
        del anchor
        ctx.site = site
        ctx.save_for_backward(x)
        # a copy, not out.view_as(out): autograd forbids modifying a custom Function's view
        # output in place, and models do (Falcon: `mlp_output += attention_output` on its
        # FalconLinear's output). Only custom-forward layers take this path; `out` is freed
        # once the copy is made, so it costs one elementwise pass and no lasting memory.
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        ctx.site.on_backward(x, grad_out)
        return grad_out, None, None, None


def _stock_forward(module: nn.Module) -> bool:
    """True when the layer computes exactly a stock Linear or Conv1D, so its forward can be
    replaced by :class:`_TrackedLinear` without changing what it computes."""
    if "forward" in module.__dict__:
        # A forward set on the instance (accelerate's add_hook_to_module, a monkeypatched
        # adapter) is what the model computes: keep it, on the identity path.
        return False
    cls = type(module)
    if cls.__name__ == "Conv1D":
        return True
    return cls.forward is nn.Linear.forward


def _declared_batch_first(by_name: Dict[str, nn.Module], name: str) -> Optional[bool]:
    """The layout that the nearest enclosing module declares for the layer's inputs: its
    ``batch_first`` flag (nn.Transformer, nn.MultiheadAttention, or any module of the model
    with a bool ``batch_first``; nn.TransformerEncoderLayer / DecoderLayer keep theirs on
    ``self_attn``). None when no enclosing module declares one."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        parent = by_name.get(".".join(parts[:i]))
        flag = getattr(parent, "batch_first", None)
        if flag is None and isinstance(getattr(parent, "self_attn", None), nn.MultiheadAttention):
            flag = parent.self_attn.batch_first
        if isinstance(flag, bool):
            return flag
    return None


# The site of the capture now running, per tracked module, and one forward wrapper per
# module that lives as long as the module. The wrapper is the same object in every pass,
# so a model compiled by torch.compile (``InfluenceEngine(compile=True)``) keeps its
# compiled code from pass to pass instead of recompiling on a new bound function.
# Per layer, whether its input was batch-first/batch-major in the first batch whose shape
# fitted one reading only: a layout is the model's, so it holds for every later pass.
_LAYOUT_SEEN: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
_ACTIVE_SITES: "weakref.WeakKeyDictionary[nn.Module, _Site]" = weakref.WeakKeyDictionary()
_WARNED_ONCE: set = set()  # (model class, what) said once (Capture._warn_once)
_FORWARDS: "weakref.WeakKeyDictionary[nn.Module, functools.partial]" = weakref.WeakKeyDictionary()


@torch.compiler.disable  # under torch.compile: a graph break, run eagerly, nothing traced inside
def _linear_forward(module, x):
    site = _ACTIVE_SITES[module]
    site.on_forward()
    anchor = site.capture.anchor
    if site.spec.transposed:  # Conv1D stores W as [d_in, d_out]
        return _TrackedLinear.apply(x, module.weight.t(), module.bias, anchor, site)
    return _TrackedLinear.apply(x, module.weight, module.bias, anchor, site)


def _stable_forward(module: nn.Module) -> functools.partial:
    forward = _FORWARDS.get(module)
    if forward is None:
        forward = _FORWARDS[module] = functools.partial(_linear_forward, module)
    return forward


class Capture:
    """Context manager that tracks ``modules`` of ``model`` and sends each batch's per-layer
    activations and output gradients to ``consumer`` during ``loss.backward()``.

    Call :meth:`begin_batch` before each forward with the batch's mask ``[B, T]`` (or None)
    and the number of documents in it; after backward call :meth:`end_batch`, which raises
    if the mask fitted no layer, or the loss or a tracked gradient was NaN/Inf (naming module
    and batch).
    """

    def __init__(self, model: nn.Module, modules: Dict[str, nn.Module], specs: Dict[str, ModuleSpec],
                 consumer: Consumer):
        self.model = model
        self.modules = modules
        self.specs = specs
        self.consumer = consumer
        self.sites = {name: _Site(self, specs[name]) for name in modules}
        by_name = dict(model.named_modules())
        self._batch_first = {name: _declared_batch_first(by_name, name) for name in modules}
        self._warned_layout = False
        self._saved_requires_grad: Dict[nn.Parameter, bool] = {}
        self._handles: List[object] = []
        self._mask = None  # [B, T] bool, a dict of those by module name, or None
        self._mask_used: set = set()  # layers of the batch that the mask applied to
        self._mask_missed: List[tuple] = []  # (name, token rows) of per-token layers it did not fit
        self._n_docs = 0
        self._experts = {n for n in modules if is_expert(n)}
        self._batch_index = -1
        self._grad_sums: List[tuple] = []  # (name, the sum of its output gradient) this batch
        # (name, squared norm of its output gradient on padding, and on every position): a
        # pass's first batch only (_check_padding_has_no_gradient)
        self._padding_norms: List[tuple] = []
        self.anchor: Optional[torch.Tensor] = None

    # -- installation -------------------------------------------------------------------
    def __enter__(self) -> "Capture":
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        self.anchor = torch.zeros((), device=device, requires_grad=True)
        for p in self.model.parameters():
            self._saved_requires_grad[p] = p.requires_grad
            p.requires_grad_(False)
        try:
            for name, module in self.modules.items():
                site = self.sites[name]
                # before _stock_forward: another capture's tracked forward is an instance forward too
                if module in _ACTIVE_SITES:
                    raise CaptureError(f"module {name!r} is already tracked by another active capture")
                stock = _stock_forward(module)
                _ACTIVE_SITES[module] = site
                if stock:
                    module.forward = _stable_forward(module)
                else:
                    self._handles.append(module.register_forward_hook(
                        functools.partial(self._identity_hook, site), with_kwargs=True))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _identity_hook(self, site, module, args, kwargs, output):
        site.on_forward()
        x = args[0] if args else next(iter(kwargs.values()))
        if not isinstance(output, torch.Tensor):
            raise CaptureError(f"module {site.spec.name!r} returned {type(output).__name__}, not a tensor")
        return _TrackedIdentity.apply(output, self.anchor, x.detach(), site)

    def __exit__(self, exc_type, exc, tb) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name, module in self.modules.items():
            if _ACTIVE_SITES.get(module) is not self.sites[name]:
                continue  # not installed by this capture (it failed before reaching this module)
            del _ACTIVE_SITES[module]
            ours = _FORWARDS.get(module)
            if ours is not None and module.__dict__.get("forward") is ours:
                del module.__dict__["forward"]  # an instance forward of the model's own stays
        for p, flag in self._saved_requires_grad.items():
            p.requires_grad_(flag)
        self._saved_requires_grad.clear()

    # -- per batch ----------------------------------------------------------------------
    def begin_batch(self, batch_index: int, n_docs: int, mask) -> None:
        """`mask`: ``[B, T]`` for every layer, a dict of such masks by module name (layers
        not named in it get none), or None. Layers with one row per document (on pooled
        features) take no mask; :meth:`end_batch` raises if a mask fitted no layer that runs
        per token."""
        self._batch_index = batch_index
        self._n_docs = n_docs
        if isinstance(mask, dict):
            self._mask = {name: self._checked_mask(m, f" for module {name!r}")
                          for name, m in mask.items() if m is not None}
        else:
            self._mask = None if mask is None else self._checked_mask(mask, "")
        self._mask_used.clear()
        self._mask_missed.clear()
        self._grad_sums.clear()
        self._padding_norms.clear()
        for site in self.sites.values():
            site.calls = 0
            site.pending = []

    def _checked_mask(self, mask, where: str) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != self._n_docs:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise CaptureError(f"the attention mask{where} must have shape [B, T] = [{self._n_docs}, tokens] "
                               f"in batch {self._batch_index}, got {shape}")
        return mask != 0

    def end_batch(self, loss: Optional[torch.Tensor] = None) -> None:
        """Raises if the batch's mask fitted none of the layers that run per token (or, given
        by module name, not its own layer): padding would otherwise count as real tokens. Then
        if the batch's `loss` (given) or a tracked output gradient held NaN or Inf, the loss
        first (a NaN loss makes NaN gradients). The values checked stay on the device until
        here and come to the host together: one device-to-host read (a wait for the GPU) per
        batch, not one per layer or per check."""
        for site in self.sites.values():  # calls of shared layers whose output did not reach the loss
            site.flush()
        if self._batch_index == 0:
            self._warn_uncalled()
        if self._mask_missed and (isinstance(self._mask, dict) or not self._mask_used):
            name, rows = self._mask_missed[0]
            mask = self._mask[name] if isinstance(self._mask, dict) else self._mask
            raise CaptureError(
                f"the attention mask of batch {self._batch_index} has shape {tuple(mask.shape)} but module "
                f"{name!r} has {rows} token rows per document; a mask must be [B, T] with the T of the "
                f"layers it applies to (give a dict of masks by module name when layers see different sequences)"
            )
        # (an expert sees the tokens routed to it, not a sequence: no mask of its own is due)
        unmasked = [(n, rows) for n, rows in self._mask_missed if n not in self._experts]
        if unmasked and self._batch_index == 0:
            name, rows = unmasked[0]
            self._warn_once("unmasked", f"pyinf: module {name!r} has {rows} rows per document where the attention "
                            f"mask has {self._mask.shape[1]}: its positions take no mask, so padding counts in its "
                            f"covariances and gradients (a 'valid' or strided convolution over the tokens); give "
                            f"get_attention_mask a dict of masks by module name, one for its positions")
        values = ([loss.detach().reshape(())] if loss is not None else []) + [s for _, s in self._grad_sums]
        values += [v for _, pad, total in self._padding_norms for v in (pad, total)]
        if not values:
            return
        device = values[0].device
        host = torch.stack([v.to(device=device, dtype=torch.float64) for v in values]).cpu().tolist()
        if self._padding_norms:
            norms = host[len(host) - 2 * len(self._padding_norms):]
            del host[len(host) - 2 * len(self._padding_norms):]
            self._check_padding_has_no_gradient(norms)
        if loss is not None:
            value = host.pop(0)
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss of batch {self._batch_index} is {value}")
        for (name, _), total in zip(self._grad_sums, host):
            if not math.isfinite(total):
                raise FloatingPointError(
                    f"NaN or Inf in the output gradient of module {name!r} in batch {self._batch_index} "
                    f"(or finite values whose sum passes float32's range, 3.4e38)"
                )

    def _warn_once(self, what: str, message: str) -> None:
        """``message`` as a warning, once per model class and ``what``."""
        if (type(self.model), what) not in _WARNED_ONCE:
            _WARNED_ONCE.add((type(self.model), what))
            warnings.warn(message, stacklevel=3)

    def _warn_batch_major(self, name: str, k: int) -> None:
        self._warn_once("batch-major", f"pyinf: module {name!r} sees {k} inputs per document: they are read "
                        f"batch-major (each document's {k} together, as multiple-choice models and frame-by-frame "
                        f"encoders order them); inputs joined by torch.cat([a, b]) over the batch are ordered "
                        f"view-major and would be split wrongly: interleave them (torch.stack([a, b], 1)"
                        f".flatten(0, 1))")

    def _warn_uncalled(self) -> None:
        """A tracked layer the first batch never called (not an expert, which a batch's tokens
        may skip) is likely never called (its owner reads its weight directly) or a spare one:
        said now, where the fit would otherwise stop on it only after its whole first pass."""
        uncalled = [n for n, site in self.sites.items() if site.calls == 0 and n not in self._experts]
        if uncalled:
            self._warn_once(f"uncalled {uncalled}", f"pyinf: tracked modules {uncalled[:5]}"
                            f"{' ...' if len(uncalled) > 5 else ''} were not called in the first batch: a layer its "
                            f"owner reads the weight of directly (F.linear(x, m.weight)), or a spare one, has no "
                            f"gradient to capture, and a fit stops on it after its pass; leave such layers out of "
                            f"the tracked modules")

    def _check_padding_has_no_gradient(self, norms: List[float]) -> None:
        """Warns (once per model class) when the loss reaches positions the mask marks as
        padding: pyinf leaves them out of every gradient, covariance and score, so that a
        document's scores do not depend on the padding its batch gave it; a task whose loss
        counts them (labels on padding, a pooling over every position) then gets scores that
        are not those of its own gradients (kronfluence's, which count them, differ)."""
        for (name, _, _), pad, total in zip(self._padding_norms, norms[0::2], norms[1::2]):
            if total > 0 and pad > 1e-8 * total:
                self._warn_once("padding", f"pyinf: the loss reaches positions the attention mask marks as padding (module "
                              f"{name!r}: {100 * math.sqrt(pad / total):.2g}% of its output gradient's norm in batch "
                              f"{self._batch_index}). pyinf leaves padding out of every gradient, so that a "
                              f"document's scores do not depend on its batch's padding; where the task's loss is "
                              f"meant to count those positions (labels on padding, a pooling over every position), "
                              f"the scores are not those of its own gradients (kronfluence's count them): give "
                              f"padding no loss, or return no mask from get_attention_mask. (A model whose padding "
                              f"reaches its real tokens, as a left-padded Mamba scan, shows this too: pad on the "
                              f"right.)")
                break  # one layer named is enough

    def _as_tokens(self, name: str, t: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """[B, T, d] view of a layer's input or output gradient, B the batch's documents.

        - ``[B, d]``: one row per document (pooled features);
        - ``[B*T, d]``: batch and sequence flattened, batch-major; with a mask, T must be its T;
        - ``[B, T, ..., d]``: batch-first; ``[T, B, ..., d]``: sequence-first (torch's
          nn.Transformer* layers by default), transposed to batch-first.

        When the shapes fit both a batch-first or batch-major reading and a sequence-first one
        (``[B, B, d]``, or ``[k*B, B, d]``: k sequences of B tokens per document, or k*B tokens
        sequence-first), the layout is, in this order: the one an enclosing module declares
        (``batch_first``, :func:`_declared_batch_first`); the one this layer showed in an
        earlier batch (of any pass) whose shape fitted one reading only; else batch-first for
        ``[B, B, d]`` and sequence-first, with a warning, for ``[k*B, B, d]``. A model that runs
        a layer sequence-first outside torch's transformer modules should say so with a
        ``batch_first`` attribute on a module around it.
        """
        b = self._n_docs

        def fail(why: str) -> CaptureError:
            return CaptureError(f"module {name!r}: cannot split a tensor of shape {tuple(t.shape)} into the "
                                f"batch's {b} documents: {why}")

        if t.dim() == 2:
            if name in self._experts and b > 1 and (mask is None or t.shape[0] != b * mask.shape[1]):
                # the rows of the tokens routed to it, which a reshape would deal out to the
                # documents by count (with or without k rows per document: silently wrong)
                raise fail(f"it is a mixture-of-experts expert (by its name) and sees {t.shape[0]} rows, not the "
                           f"batch's tokens{f' (B*T = {b}*{mask.shape[1]})' if mask is not None else ''}: the "
                           f"tokens routed to it cannot be split into documents; leave the experts out of the "
                           f"tracked modules, or use batches of one document")
            if t.shape[0] == b:
                return t.unsqueeze(1)
            if t.shape[0] % b:
                raise fail("its rows are not a multiple of B" + (
                    f" (nor B*T = {b}*{mask.shape[1]} for the mask's T: a layer on unpadded tokens, or on those "
                    f"routed to it by a mixture-of-experts router, cannot be split)" if mask is not None else ""))
            # batch-major: B*T token rows (the mask then applies), or k rows per document (k
            # sequences per document, e.g. multiple choice: the mask does not fit and is not applied)
            return t.reshape(b, -1, t.shape[-1])
        if t.dim() < 2:
            raise fail("a layer's input needs a feature dimension")
        # batch-first [B, T, ..., d] and batch-major [B*k, T, ..., d] (k sequences per document,
        # e.g. multiple choice) are both read by a reshape; sequence-first [T, B, ..., d] by a transpose
        batch_major, seq_first = t.shape[0] % b == 0, t.shape[1] == b
        if b == 1:  # one document: both readings give the same rows
            return t.reshape(1, -1, t.shape[-1])
        if batch_major and seq_first:
            batch_major = self._ambiguous_layout_is_batch_major(name, t)
        elif batch_major or seq_first:
            _LAYOUT_SEEN.setdefault(self.modules[name], batch_major)
        if batch_major:
            if t.shape[0] > b:
                self._warn_batch_major(name, t.shape[0] // b)
            return t.reshape(b, -1, t.shape[-1])
        if seq_first:
            return t.transpose(0, 1).reshape(b, -1, t.shape[-1])
        raise fail("neither batch-first [B, T, ..., d], batch-major [B*k, T, ..., d] nor sequence-first "
                   "[T, B, ..., d]")

    def _ambiguous_layout_is_batch_major(self, name: str, t: torch.Tensor) -> bool:
        """The layout of a ``[k*B, B, ..., d]`` tensor (k >= 1): see :meth:`_as_tokens`."""
        declared = self._batch_first[name]
        if declared is not None:
            return declared
        seen = _LAYOUT_SEEN.get(self.modules[name])
        if seen is not None:
            return seen
        # (a mask cannot tell: [B, k*B] fits k sequences of B tokens as well as k*B tokens)
        if t.shape[0] == t.shape[1]:  # T == B: batch-first, the common layout
            return True
        if not self._warned_layout:  # once per pass
            self._warned_layout = True
            warnings.warn(f"pyinf: module {name!r} sees a [{t.shape[0]}, {t.shape[1]}, ...] input in a batch of "
                          f"{t.shape[1]} documents: sequence-first (T = {t.shape[0]}) is assumed, not "
                          f"{t.shape[0] // t.shape[1]} sequences of {t.shape[1]} tokens per document; set a "
                          f"batch_first attribute on a module around it to say which", stacklevel=2)
        return False

    def _conv_as_tokens(self, name: str, module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
        """A convolution's input patches ``[B, positions, d_in]`` and output gradient
        ``[B, positions, d_out]`` (:mod:`pyinf.conv`): its tokens are its output positions."""
        dims = 3 if isinstance(module, nn.Conv1d) else 4
        b = self._n_docs
        if x.dim() != dims or x.shape[0] % b:
            raise CaptureError(f"module {name!r}: cannot split its input of shape {tuple(x.shape)} into the batch's "
                               f"{b} documents: a {type(module).__name__}'s input must be batched, [B, channels, "
                               f"{'length' if dims == 3 else 'height, width'}], or hold k inputs per document "
                               f"batch-major ([B*k, ...]: video frames); leave it out of the tracked modules where "
                               f"documents have different numbers of inputs (images per document)")
        # k inputs per document (batch-major): its positions are all of theirs
        if x.shape[0] > b:
            self._warn_batch_major(name, x.shape[0] // b)
        acts = conv.patches(module, x, ones=self.specs[name].has_bias)  # with its bias's ones column
        grads = conv.positions(grad_out)
        return acts.reshape(b, -1, acts.shape[-1]), grads.reshape(b, -1, grads.shape[-1])

    def _tokens_of(self, name: str, x: torch.Tensor, grad_out: torch.Tensor, mask):
        """One call's ``(acts [B, T, d_in], grads [B, T, d_out])``, ``d_in`` with the bias's ones column."""
        module = self.modules[name]
        if conv.is_patch_conv(module):  # its patches come with the bias's ones column
            acts, grads = self._conv_as_tokens(name, module, x.detach(), grad_out.detach())
        else:
            acts, grads = self._as_tokens(name, x.detach(), mask), self._as_tokens(name, grad_out.detach(), mask)
            if self.specs[name].has_bias:
                acts = _append_ones(acts)
        if acts.shape[1] != grads.shape[1]:
            raise CaptureError(f"module {name!r}: input has {acts.shape[1]} token rows but the output "
                               f"gradient has {grads.shape[1]}")
        return acts, grads

    def _deliver(self, spec: ModuleSpec, calls: List[tuple]) -> None:
        """Hands the layer's ``(input, output gradient)`` of each of its calls in this batch (one
        but for shared layers, :class:`_Site`) to the consumer, as tokens."""
        mask = self._mask.get(spec.name) if isinstance(self._mask, dict) else self._mask
        pairs = [self._tokens_of(spec.name, x, g, mask) for x, g in calls]
        acts, grads = pairs[0]
        if len(pairs) > 1:  # the calls' tokens side by side: the weight gradient sums over them all
            acts, grads = torch.cat([a for a, _ in pairs], 1), torch.cat([g for _, g in pairs], 1)
            if mask is not None and all(a.shape[1] == mask.shape[1] for a, _ in pairs):
                mask = mask.repeat(1, len(pairs))  # each call's tokens are the batch's
        # NaN or Inf anywhere makes the sum NaN or Inf: one reduction that reads the gradient
        # once (torch.isfinite(grads).all() made ~5 full-size passes and temporaries). In fp32:
        # on a GPU a bf16/fp16 -> fp32 sum is one pass, where an fp64 sum would first copy the
        # whole tensor to fp64. Read on the host at end_batch.
        acc = torch.float64 if grads.dtype == torch.float64 else torch.float32
        self._grad_sums.append((spec.name, grads.sum(dtype=acc)))
        if mask is not None:
            if tuple(mask.shape) == tuple(acts.shape[:2]):
                self._mask_used.add(spec.name)
                if self._batch_index == 0 and (type(self.model), "padding") not in _WARNED_ONCE:
                    # a document at a time: an fp32 copy of the whole batch's gradient would be
                    # a 0.7 GB temporary at a 7B MLP's size (B=8, T=2048)
                    squares = torch.stack([g.float().square().sum(-1) for g in grads])  # [B, T]
                    self._padding_norms.append((spec.name, squares.masked_fill(mask, 0).sum(), squares.sum()))
            else:
                if acts.shape[1] > 1:  # one row per document (pooled features) has nothing to mask
                    self._mask_missed.append((spec.name, acts.shape[1]))
                mask = None
        self.consumer(spec, acts, grads, mask)
