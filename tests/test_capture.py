"""Capture computes no weight gradient, leaves the model as it was, and handles Linear
subclasses, instance forwards, Conv1D, inputs without a sequence dimension or sequence-first,
and masks that fit no layer."""
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import pyinf
from pyinf.capture import Capture, CaptureError

from . import brute_force as bf
from . import seeds
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


# -- layer layouts, instance forwards and masks, against float64 brute force --------------

class _PairTask(pyinf.Task):
    """Summed squared error on (x, y) pairs of [T, d] documents."""

    def __init__(self, tracked=None):
        self.tracked = tracked

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        return 0.5 * ((model(x) - y) ** 2).sum()

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def get_influence_tracked_modules(self):
        return self.tracked


def _pairs(n, t, d_in, d_out, seed):
    g = torch.Generator().manual_seed(seeds.offset(seed))
    return [(torch.randn(t, d_in, generator=g, dtype=torch.float64),
             torch.randn(t, d_out, generator=g, dtype=torch.float64)) for _ in range(n)]


def _rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm()).item()


def _assert_matches_brute_force(model, task, train, query, batch_size):
    """Factors and scores from batches of `batch_size` equal float64 brute force from plain
    autograd on the unmodified model, one document at a time."""
    engine = pyinf.InfluenceEngine(model, task, progress=False)
    factors = engine.fit_factors(train, fisher="empirical", batch_size=batch_size)
    covs = bf.covariances(model, task, train, engine.modules, engine.specs)
    train_grads = bf.doc_gradients(model, task, train, engine.modules, engine.specs)
    query_grads = bf.doc_gradients(model, task, query, engine.modules, engine.specs, measurement=True)
    expected = torch.zeros(len(train), len(query), dtype=torch.float64)
    for name, f in factors.modules.items():
        assert _rel(f.a_cov, covs[name][0]) < 1e-10 and _rel(f.s_cov, covs[name][1]) < 1e-10, name
        dense = bf.dense_inverse(f.q_a, f.q_s, f.lambdas, bf.default_damping(f.lambdas))
        for j, qg in enumerate(query_grads):
            p = bf.unvec(dense @ bf.vec(qg[name]), f.spec.d_out, f.spec.d_in)
            for i, tg in enumerate(train_grads):
                expected[i, j] += (p * tg[name]).sum()
    queries = engine.prepare_queries(query, factors, rank=None, batch_size=batch_size)
    assert _rel(engine.pairwise_scores(train, queries, batch_size=batch_size), expected) < 1e-6


class _SeqFirstMLP(nn.Module):
    """Runs its layers on [T, B, d], as torch's nn.Transformer* layers do by default."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x.transpose(0, 1)))).transpose(0, 1)


class _TorchEncoder(nn.Module):
    def __init__(self, batch_first=False):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(8, 3)
        self.batch_first_layer = batch_first

    def forward(self, x):
        if self.batch_first_layer:
            return self.head(self.layer(x))
        return self.head(self.layer(x.transpose(0, 1)).transpose(0, 1))


@pytest.mark.parametrize("tokens", [5, 3])
def test_sequence_first_layers_match_brute_force(tokens):
    """[T, B, d] layer inputs are split into documents by their second dimension. With
    T == B (3 == 3) the shapes cannot tell: the model's batch_first=False says so."""
    model = _SeqFirstMLP().double()
    if tokens == 3:
        model.batch_first = False
    _assert_matches_brute_force(model, _PairTask(), _pairs(6, tokens, 4, 3, seed=1),
                                _pairs(2, tokens, 4, 3, seed=2), batch_size=3)


@pytest.mark.parametrize("tokens", [5, 3])
def test_torch_transformer_layer_matches_brute_force(tokens):
    """nn.TransformerEncoderLayer's own batch_first (on its self_attn) decides when T == B."""
    model = _TorchEncoder().double()
    task = _PairTask(["layer.linear1", "layer.linear2", "head"])
    _assert_matches_brute_force(model, task, _pairs(6, tokens, 8, 3, seed=1), _pairs(2, tokens, 8, 3, seed=2),
                                batch_size=3)


def test_torch_transformer_layer_fast_path_is_off_during_passes():
    """In eval mode with no parameter needing a gradient (every pass), torch's batch-first
    encoder layer would take its fused fast path and never call the tracked linears; the
    passes turn it off (and back on after)."""
    model = _TorchEncoder(batch_first=True)
    task = _PairTask(["layer.linear1", "layer.linear2", "head"])
    train = [(a.float(), b.float()) for a, b in _pairs(6, 5, 8, 3, seed=1)]
    factors = pyinf.InfluenceEngine(model, task, progress=False).fit_factors(train, fisher="empirical", batch_size=3)
    assert factors.meta["n_tokens"] == {"head": 30, "layer.linear1": 30, "layer.linear2": 30}
    assert torch.backends.mha.get_fastpath_enabled()



def test_overlapping_passes_restore_the_attention_fast_path():
    """Passes in two threads (shards of a staged fit) overlap: A turns the fast path off, B
    finds it off, A ends, B ends. Each restoring what it found left it off for good (an
    order-dependent failure of the test above); the last pass out restores the first's."""
    from pyinf.runner import no_attention_fastpath

    mha = torch.backends.mha
    assert mha.get_fastpath_enabled()
    a, b = no_attention_fastpath(), no_attention_fastpath()
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert not mha.get_fastpath_enabled()  # B's pass is still running
    b.__exit__(None, None, None)
    assert mha.get_fastpath_enabled()
    # a setter that fails is not counted: the next pass still restores the setting
    from pyinf._process_setting import ProcessSetting

    state = {"value": True, "fail": True}

    def set_value(v):
        if state.pop("fail", False):
            raise RuntimeError("setter failed")
        state["value"] = v

    setting = ProcessSetting(lambda: state["value"], set_value)
    with pytest.raises(RuntimeError):
        with setting.changed(lambda before: False):
            pass
    with setting.changed(lambda before: False):
        assert state["value"] is False
    assert state["value"] is True

def test_layer_input_that_cannot_be_split_raises():
    """No dimension of [2, 6, d] holds the batch's 3 documents (nor a multiple of them): an
    error naming the module and the shape, not a reshape that mixes documents. Flattened rows
    that are not B*T for the mask's T (6 rows, a [3, 3] mask: e.g. padding removed) are taken
    as 2 rows per document, which the mask does not fit: the batch's end says so."""
    model = nn.Sequential(nn.Linear(4, 2))
    engine = pyinf.InfluenceEngine(model, MLPTask(), progress=False)
    with Capture(model, engine.modules, engine.specs, lambda *a: None) as capture:
        capture.begin_batch(0, 3, None)
        with pytest.raises(CaptureError, match=r"'0'.*\(2, 6, 4\)"):
            model(torch.randn(2, 6, 4)).sum().backward()
    with Capture(model, engine.modules, engine.specs, lambda *a: None) as capture:
        capture.begin_batch(0, 3, torch.ones(3, 3))
        model(torch.randn(6, 4)).sum().backward()
        with pytest.raises(CaptureError, match=r"mask of batch 0 has shape \(3, 3\) but module '0' has 2 token rows"):
            capture.end_batch()


class _PerChoice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):  # x [B, k, T, 4] -> the layer sees [B*k, T, 4]
        b, k, t, d = x.shape
        return self.fc(x.reshape(b * k, t, d)).reshape(b, k, t, -1).sum(1)


def _choices(n, k, tokens, seed):
    g = torch.Generator().manual_seed(seeds.offset(seed))
    return [(torch.randn(k, tokens, 4, generator=g, dtype=torch.float64),
             torch.randn(tokens, 3, generator=g, dtype=torch.float64)) for _ in range(n)]


def test_several_sequences_per_document_are_batch_major():
    """[B*k, T, d] inputs (k sequences per document, as multiple-choice models run them) are
    split batch-major: each document's scores sum its k sequences' (against brute force)."""
    data = _choices(6, 2, 5, seed=1)
    _assert_matches_brute_force(_PerChoice().double(), _PairTask(["fc"]), data, data[:2], batch_size=3)


def test_several_sequences_of_b_tokens_keep_the_layout_shown_earlier():
    """k sequences of T tokens per document with T == B in the last batch ([k*B, B, d], which
    k*B tokens sequence-first would also give): the layout the layer showed in batches whose
    shape fitted one reading only (here [4*2, 2, d] for 4 documents) holds, in this pass and
    in the later ones (the queries' batch of 2 is ambiguous too)."""
    data = _choices(6, 2, 2, seed=3)  # batches of 4 and 2 documents
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*sequence-first")
        _assert_matches_brute_force(_PerChoice().double(), _PairTask(["fc"]), data, data[:2], batch_size=4)


class _RoutedExperts(nn.Module):
    """A mixture-of-experts LM written as transformers 4.x wrote Mixtral's: nn.Linear experts
    called on the rows of the tokens routed to them (``expert(hidden[token_idx])``)."""

    def __init__(self, vocab=30, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.router = nn.Linear(d, 2, bias=False)
        self.experts = nn.ModuleList([nn.Linear(d, d) for _ in range(2)])
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        flat = h.reshape(-1, h.shape[-1])
        weight, choice = self.router(flat).softmax(-1).max(-1)
        out = flat
        for e, expert in enumerate(self.experts):
            rows = (choice == e).nonzero().squeeze(-1)
            if rows.numel():  # an expert no token is routed to does not run (as transformers' do)
                out = out.index_add(0, rows, weight[rows, None] * expert(flat[rows]))
        return self.head(out.reshape(h.shape))


def test_routed_experts_are_refused_in_batches_and_exact_one_document_at_a_time():
    """An expert's [routed rows, d] input was split into documents by a reshape whenever the
    row count was a multiple of B: silently mixed documents (0.5-1x relative error on
    unpadded documents). A module named as an expert (``experts.0``, ``experts.expert_1.wi``)
    whose flattened input is not the batch's tokens is refused, naming it; other modules keep
    the k-rows-per-document reading (pooled multiple choice, a number of choices that changes
    from batch to batch, layers at different stages with different k). One document per batch
    needs no split: exact against brute force."""
    torch.manual_seed(seeds.offset(20))
    model = _RoutedExperts().double()
    g = torch.Generator().manual_seed(seeds.offset(21))
    train = [{"input_ids": torch.randint(1, 30, (6,), generator=g)} for _ in range(8)]
    query = [{"input_ids": torch.randint(1, 30, (6,), generator=g)} for _ in range(2)]
    engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False)
    assert {"experts.0", "experts.1"} <= set(engine.modules)  # tracked by default
    with pytest.raises(CaptureError, match=r"module 'experts\.\d': .*it is a mixture-of-experts expert \(by its "
                                           r"name\) and sees \d+ rows, not the batch's tokens \(B\*T = 2\*6\)"):
        engine.fit_factors(train, fisher="empirical", batch_size=2)
    with Capture(model, engine.modules, engine.specs, lambda *a: None) as capture:
        capture.begin_batch(0, 2, torch.ones(2, 6))
        with pytest.raises(CaptureError, match="mixture-of-experts expert"):  # exactly B rows: no excuse either
            capture._as_tokens("experts.0", torch.randn(2, 8), capture._mask)
        assert capture._as_tokens("experts.0", torch.randn(12, 8), capture._mask).shape == (2, 6, 8)  # every token
        for batch, choices in enumerate((2, 3)):  # other layers: k rows per document, any k
            capture.begin_batch(batch, 2, torch.ones(2, 6))
            assert capture._as_tokens("router", torch.randn(2 * choices, 8), capture._mask).shape == (2, choices, 8)
            assert capture._as_tokens("head", torch.randn(8 * choices, 8), capture._mask).shape == (2, 4 * choices, 8)
    _assert_matches_brute_force(model, pyinf.CausalLMTask(), train, query, batch_size=1)


def test_a_query_no_token_of_which_reaches_an_expert():
    """One query at a time, an expert that none of a query's tokens is routed to has a zero
    gradient there (query preparation refused it: 'did not receive a gradient for every
    query'). Routing by the sign of a token's first embedding feature: the first query's
    tokens all go to expert 0."""
    torch.manual_seed(seeds.offset(22))
    model = _RoutedExperts().double()
    with torch.no_grad():
        model.router.weight.zero_()
        model.router.weight[1, 0] = 1.0  # expert 1 iff feature 0 > 0
        model.emb.weight[:15, 0] = -model.emb.weight[:15, 0].abs() - 0.1
        model.emb.weight[15:, 0] = model.emb.weight[15:, 0].abs() + 0.1
    g = torch.Generator().manual_seed(seeds.offset(23))
    train = [{"input_ids": torch.randint(1, 30, (6,), generator=g)} for _ in range(5)]
    query = [{"input_ids": torch.randint(1, 15, (5,), generator=g)}, {"input_ids": torch.randint(1, 30, (5,), generator=g)}]
    _assert_matches_brute_force(model, pyinf.CausalLMTask(), train, query, batch_size=1)


class _FusedExperts(nn.Module):
    """transformers 5's MixtralExperts: every expert's weights in one 3-D parameter."""

    def __init__(self, n_experts=3, d=4):
        super().__init__()
        self.up = nn.Parameter(torch.randn(n_experts, d, d))

    def forward(self, x, choice):
        return torch.einsum("btd,bted->bte", x, self.up[choice])


class _FusedMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(4, 3)
        self.experts = _FusedExperts()
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.experts(x, self.router(x).argmax(-1)))


def test_fused_experts_are_said_to_be_left_out():
    with pytest.warns(UserWarning, match=r"1 mixture-of-experts layers keep their experts' weights fused in 3-D "
                                         r"parameters \(experts\).*influence is left out"):
        engine = pyinf.InfluenceEngine(_FusedMoE(), _PairTask(), progress=False)
    assert list(engine.modules) == ["router", "out"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named layers: the user chose what is tracked
        pyinf.InfluenceEngine(_FusedMoE(), _PairTask(tracked=["out"]), progress=False)


class _ConvThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 1)
        self.depthwise = nn.Conv1d(4, 4, 3, padding=1, groups=4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.depthwise(self.conv(x.transpose(1, 2))).transpose(1, 2))


def test_convolutions_of_groups_are_said_to_be_left_out():
    """Conv1d / Conv2d with groups=1 are tracked (linear layers over patches); a grouped
    convolution is not, and a user comparing with kronfluence should know it."""
    with pytest.warns(UserWarning, match=r"1 convolution layers \(depthwise\) are not tracked"):
        engine = pyinf.InfluenceEngine(_ConvThenLinear(), _PairTask(), progress=False)
    assert list(engine.modules) == ["conv", "fc"]
    with pytest.raises(ValueError, match=r"tracked module 'depthwise' is a Conv1d with groups=4 \(a grouped "
                                         r"convolution's gradient is one block per group\); pyinf tracks nn.Linear"):
        pyinf.InfluenceEngine(_ConvThenLinear(), _PairTask(tracked=["depthwise"]), progress=False)


def test_a_convolution_on_unbatched_input_is_named():
    """A convolution's input must carry the batch's documents: [B, C, L] for Conv1d."""
    model = nn.Sequential(nn.Conv1d(3, 2, 2), nn.Flatten(0), nn.Linear(8, 1))
    data = [(torch.randn(3, 5), torch.randn(1)) for _ in range(2)]

    class Unbatched(_PairTask):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            return ((model(x[0]) - y[0]) ** 2).sum()

    engine = pyinf.InfluenceEngine(model, Unbatched(tracked=["0"]), progress=False)
    with pytest.raises(pyinf.capture.CaptureError, match=r"module '0': cannot split its input of shape \(3, 5\) "
                                                         r"into the batch's 1 documents: a Conv1d's input must be "
                                                         r"batched, \[B, channels, length\]"):
        engine.fit_factors(data, batch_size=1)


def test_expert_names():
    from pyinf.modules import is_expert as _is_expert

    assert all(_is_expert(n) for n in ("moe.experts.0", "mlp.experts.expert_1.wi", "ffn.expert3.fc", "experts"))
    assert not any(_is_expert(n) for n in ("mlp.shared_expert.gate_proj", "mlp.shared_experts.up", "expert_gate",
                                           "mlp.experts_router", "mlp.fc1"))


def test_one_document_per_batch_is_never_ambiguous():
    """A batch of one document: [T, 1, d] reads the same either way, so no warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*sequence-first")
        _assert_matches_brute_force(_SeqFirstMLP().double(), _PairTask(), _pairs(3, 4, 4, 3, seed=1),
                                    _pairs(2, 4, 4, 3, seed=2), batch_size=1)


def test_an_undecidable_layout_is_declared_or_warned():
    """Every batch [k*B, B, d]: the model's batch_first attribute decides; without one,
    sequence-first is assumed with a warning that says how to declare it."""
    data = _choices(4, 2, 2, seed=4)
    declared = _PerChoice().double()
    declared.batch_first = True
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*sequence-first")
        _assert_matches_brute_force(declared, _PairTask(["fc"]), data, data[:2], batch_size=2)
    engine = pyinf.InfluenceEngine(_PerChoice().double(), _PairTask(["fc"]), progress=False)
    with pytest.warns(UserWarning, match=r"module 'fc' sees a \[4, 2, \.\.\.\] input in a batch of 2 documents: "
                                         r"sequence-first \(T = 4\) is assumed.*batch_first attribute"):
        engine.fit_factors(data, fisher="empirical", batch_size=2)


class _Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _accelerate_style_hook(module):
    """What accelerate's add_hook_to_module does: an instance forward around the old one."""
    old_forward = module.forward

    def forward(*args, **kwargs):
        forward.calls += 1
        args = tuple(a.clone() for a in args)  # stands for moving inputs to the execution device
        return old_forward(*args, **kwargs).clone()

    forward.calls = 0

    module.forward = forward
    return forward


def _additive_adapter(module, rank=2):
    """A monkeypatched LoRA-style adapter: y = W x + b + B A x."""
    old_forward = module.forward
    a = torch.randn(rank, module.in_features, dtype=module.weight.dtype)
    b = torch.randn(module.out_features, rank, dtype=module.weight.dtype)

    def forward(x):
        forward.calls += 1
        return old_forward(x) + x @ a.T @ b.T

    forward.calls = 0

    module.forward = forward
    return forward


@pytest.mark.parametrize("patch", [_accelerate_style_hook, _additive_adapter])
def test_instance_forward_is_kept_and_matches_brute_force(patch):
    """A stock Linear with a forward set on the instance keeps it during a capture (the
    identity path), which is exact when that forward's output is W x + b plus terms that do
    not depend on it; after the capture the instance forward is back."""
    model = _Regression().double()
    own = patch(model.fc1)
    task = _PairTask()
    train, query = _pairs(6, 1, 4, 3, seed=1), _pairs(2, 1, 4, 3, seed=2)
    engine = pyinf.InfluenceEngine(model, task, progress=False)
    with Capture(model, engine.modules, engine.specs, lambda *a: None) as capture:
        capture.begin_batch(0, 6, None)
        task.compute_train_loss(torch.utils.data.default_collate(train), model).backward()
    assert own.calls == 1 and model.fc1.forward is own and "forward" not in model.fc2.__dict__
    _assert_matches_brute_force(model, task, train, query, batch_size=3)


class _OwnForwardLinear(nn.Linear):
    """A Linear subclass with its own forward (transformers' FalconLinear): the identity path."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class _ResidualInPlace(_Regression):
    """Adds to a tracked layer's output in place, as Falcon does (`mlp_output += attention_output`)."""

    def __init__(self):
        super().__init__()
        self.fc1 = _OwnForwardLinear(4, 6)
        self.skip = nn.Linear(4, 6)

    def forward(self, x):
        h = self.fc1(x)
        h += self.skip(x)
        return self.fc2(torch.tanh(h))


def test_output_of_a_custom_forward_can_be_modified_in_place():
    """The identity path's output is a tensor of its own, not a view that autograd forbids
    modifying in place; the gradient its hook sees is the one of the layer's own output."""
    model = _ResidualInPlace().double()
    train, query = _pairs(6, 1, 4, 3, seed=3), _pairs(2, 1, 4, 3, seed=4)
    _assert_matches_brute_force(model, _PairTask(), train, query, batch_size=3)


def test_instance_forward_computes_the_same_loss_inside_a_capture():
    """Whatever the instance forward computes is what the capture pass computes."""
    model = _Regression().double()
    stock = model.fc1.forward
    model.fc1.forward = lambda x: stock(x) * 3.0 + 0.5
    engine = pyinf.InfluenceEngine(model, _PairTask(), progress=False)
    x, y = torch.randn(4, 1, 4, dtype=torch.float64), torch.randn(4, 1, 3, dtype=torch.float64)
    outside = _PairTask().compute_train_loss((x, y), model).item()
    with Capture(model, engine.modules, engine.specs, lambda *a: None) as capture:
        capture.begin_batch(0, 4, None)
        assert _PairTask().compute_train_loss((x, y), model).item() == outside


class _ShiftedMask(pyinf.CausalLMTask):
    def get_attention_mask(self, batch):
        return batch["attention_mask"][:, 1:]  # [B, T - 1]: fits no layer


class _BroadcastMask(pyinf.CausalLMTask):
    def get_attention_mask(self, batch):
        return batch["attention_mask"][:, None, :]  # [B, 1, T]


@pytest.mark.parametrize("task", [_ShiftedMask(), _BroadcastMask()], ids=["shifted", "broadcast"])
def test_mask_that_fits_no_layer_raises(task):
    """A mask of another shape than [B, T] of the layers is an error, not silently dropped
    (padding would count as real tokens)."""
    engine = pyinf.InfluenceEngine(tiny_gpt2(), task, progress=False)
    with pytest.raises(CaptureError, match="attention mask"):
        engine.fit_factors(TokenDataset(4, seed=1), batch_size=4)


class _PooledClassifier(nn.Module):
    """A per-token layer, mean-pooled over the real tokens, then a head on [B, d]."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 6)
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.fc(self.embed(input_ids)))
        m = attention_mask[..., None].to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


class _ClassifyTask(pyinf.CausalLMTask):
    def __init__(self, tracked):
        super().__init__()
        self.tracked = tracked

    def compute_train_loss(self, batch, model, sample=False):
        logits = model(batch["input_ids"], batch["attention_mask"])
        return torch.nn.functional.cross_entropy(logits, batch["input_ids"][:, 0] % 3, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def compute_measurement_per_example(self, batch, model):
        return None

    def get_influence_tracked_modules(self):
        return self.tracked


@pytest.mark.parametrize("tracked", [["fc", "head"], ["head"]])
def test_pooled_layers_take_no_mask(tracked):
    """A layer on pooled features ([B, d], one row per document) has nothing to mask: with
    the per-token layer it runs beside, or alone, the [B, T] mask is no error, and the
    per-token layer counts only real tokens."""
    model = _PooledClassifier().double()
    engine = pyinf.InfluenceEngine(model, _ClassifyTask(tracked), progress=False)
    data = TokenDataset(6, seed=1)
    factors = engine.fit_factors(data, fisher="empirical", batch_size=3)
    assert factors.meta["n_tokens"]["head"] == len(data)
    if "fc" in tracked:
        assert factors.meta["n_tokens"]["fc"] == sum(len(item["input_ids"]) for item in data)
    queries = engine.prepare_queries(TokenDataset(2, seed=2), factors, rank=None)
    one_by_one = engine.pairwise_scores(data, queries, batch_size=1)
    assert _rel(engine.pairwise_scores(data, queries, batch_size=3), one_by_one) < 1e-10


class _MaskedPairTask(_PairTask):
    """(x, y, mask) documents: the mask is [B, T]."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y, _ = batch
        return 0.5 * ((model(x) - y) ** 2).sum()

    def get_attention_mask(self, batch):
        return batch[2]


def test_a_layer_the_mask_does_not_fit_beside_one_it_fits_is_said():
    """A text CNN: a per-token Linear (the [B, T] mask fits it) then a 'valid' Conv1d over the
    tokens, whose T - 2 positions take no mask: padding counts there, and the user is told."""
    class TextCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 6)
            self.conv = nn.Conv1d(6, 3, 3)

        def forward(self, x):
            return self.conv(self.embed(x).transpose(1, 2)).amax(-1)

    data = [(torch.randn(7, 4), torch.randn(3), torch.ones(7, dtype=torch.bool)) for _ in range(4)]
    engine = pyinf.InfluenceEngine(TextCNN(), _MaskedPairTask(), progress=False)
    with pytest.warns(UserWarning, match=r"module 'conv' has 5 rows per document where the attention mask has 7: "
                                         r"its positions take no mask"):
        engine.fit_factors(data, batch_size=2)


def test_several_inputs_per_document_are_said_to_be_read_batch_major():
    """[B*k, ...] inputs are split as k per document, batch-major: said once, with how to order
    inputs joined by torch.cat over the batch."""
    class Pairs(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(4, 4)

        def forward(self, x):  # x: [B, 2, T, 4]
            b = x.shape[0]
            return self.enc(x.flatten(0, 1)).reshape(b, 2, -1, 4).sum(1)

    data = [(torch.randn(2, 3, 4), torch.randn(3, 4)) for _ in range(4)]
    engine = pyinf.InfluenceEngine(Pairs(), _PairTask(), progress=False)
    with pytest.warns(UserWarning, match=r"module 'enc' sees 2 inputs per document: they are read batch-major"):
        engine.fit_factors(data, batch_size=2)


def test_a_convolution_with_a_forward_of_its_own_is_left_out():
    """A Conv2d subclass that pads in its own forward (timm's Conv2dSame) computes with other
    patches than its attributes give: left out by default (warned), refused by name."""
    class Conv2dSame(nn.Conv2d):
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))

    model = nn.Sequential(Conv2dSame(2, 3, 3), nn.Flatten(1), nn.Linear(3 * 4 * 4, 2))
    with pytest.warns(UserWarning, match=r"1 convolution layers \(0\) are not tracked"):
        engine = pyinf.InfluenceEngine(model, _PairTask(), progress=False)
    assert list(engine.modules) == ["2"]
    with pytest.raises(ValueError, match=r"tracked module '0' is a Conv2dSame with a forward of its own"):
        pyinf.InfluenceEngine(model, _PairTask(tracked=["0"]), progress=False)
