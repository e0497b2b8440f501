"""Capture computes no weight gradient, leaves the model as it was, and handles Linear
subclasses, Conv1D and inputs without a sequence dimension."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyinf
from pyinf.capture import Capture

from .models import MLPTask, TinyMLP, TokenDataset, tiny_gpt2


class _RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # a transposed view of a weight is no gradient
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def test_no_weight_gradient_is_computed():
    """During a capture pass the backward never produces a tensor shaped like a tracked
    weight, no parameter gets a .grad, and requires_grad flags come back afterwards."""
    torch.manual_seed(0)
    model = TinyMLP(d_in=11, hidden=13, d_out=3)  # 13x11, 4x13, 3x4 weights: unique shapes
    model.fc1.weight.requires_grad_(False)  # a user's own frozen parameter must stay frozen
    engine = pyinf.InfluenceEngine(model, MLPTask(), progress=False)
    batch = (torch.randn(6, 11), torch.randn(6, 3))
    seen = []

    def consumer(spec, acts, grads, mask):
        seen.append((spec.name, tuple(acts.shape), tuple(grads.shape)))

    with Capture(model, engine.modules, engine.specs, consumer) as capture:
        capture.begin_batch(0, 6, None)
        loss = MLPTask().compute_train_loss(batch, model)
        with _RecordShapes() as rec:
            loss.backward()
        capture.end_batch()
    weight_shapes = {tuple(m.weight.shape) for m in engine.modules.values()}
    assert not [s for s in rec.shapes if s[1] in weight_shapes], "a weight-shaped gradient was computed"
    assert all(p.grad is None for p in model.parameters())
    assert not model.fc1.weight.requires_grad and model.fc2.weight.requires_grad
    assert "forward" not in model.fc1.__dict__  # the model is exactly as before
    assert sorted(seen) == sorted([("fc1", (6, 1, 12), (6, 1, 13)), ("fc2", (6, 1, 13), (6, 1, 4)),
                                   ("head", (6, 1, 5), (6, 1, 3))])


def test_lowest_layer_gets_no_input_gradient():
    """Nothing below the lowest tracked layer needs a gradient, so its input gradient
    (an extra GEMM) is skipped."""
    model = tiny_gpt2()
    engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(tracked_modules=["transformer.h.1.mlp.c_fc"]),
                                   progress=False)
    c_fc = model.transformer.h[1].mlp.c_fc
    d_in = c_fc.weight.shape[0]
    batch = pyinf.pad_collate([TokenDataset(2, seed=1)[i] for i in range(2)])
    with Capture(model, engine.modules, engine.specs, lambda *a: None) as capture:
        capture.begin_batch(0, 2, batch["attention_mask"])
        loss = pyinf.CausalLMTask().compute_train_loss(batch, model)
        with _RecordShapes() as rec:
            loss.backward()
    # Exactly one matmul produces a hidden-sized gradient: the output embedding's, above the
    # tracked layer. c_fc's own input gradient, and everything below it (block 1's attention,
    # block 0, the embeddings), never runs.
    hidden_mm = [s for s in rec.shapes if s[1] and s[1][-1] == d_in and "mm" in s[0]]
    assert len(hidden_mm) == 1, hidden_mm
    assert not [s for s in rec.shapes if "embedding" in s[0]]


def test_scores_do_not_touch_model_state():
    model = tiny_gpt2()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False)
    data = TokenDataset(4)
    factors = engine.fit_factors(data)
    engine.self_influence(data, factors)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
