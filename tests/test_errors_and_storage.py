"""Bad input gets a clear error naming what is wrong; saved files round-trip and a
corrupt, truncated or mismatched file is refused; nothing half-written is left behind."""

import sys
import warnings

import pytest
import torch
from torch import nn

import pyinf
from pyinf import storage

from .models import MLPTask, RegressionDataset, TinyMLP, TokenDataset, tiny_gpt2


@pytest.fixture(scope="module")
def fitted():
    model = tiny_gpt2(seed=3)
    engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False)
    train, query = TokenDataset(6, seed=1), TokenDataset(2, seed=2, completion=2)
    factors = engine.fit_factors(train, batch_size=3)
    queries = engine.prepare_queries(query, factors, rank=3)
    return engine, factors, queries, train


def test_factors_and_queries_round_trip(fitted, tmp_path):
    engine, factors, queries, train = fitted
    factors.save(tmp_path / "f.safetensors")
    queries.save(tmp_path / "q.safetensors")
    f2 = pyinf.Factors.load(tmp_path / "f.safetensors")
    q2 = pyinf.Queries.load(tmp_path / "q.safetensors", factors=f2)
    assert f2.id == factors.id and f2.meta["fisher"] == "true"
    for name in factors.modules:
        assert torch.equal(f2[name].lambdas, factors[name].lambdas)
    assert torch.equal(engine.pairwise_scores(train, q2), engine.pairwise_scores(train, queries))
    assert [p.name for p in tmp_path.iterdir()] and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # the mode of a plain open() under the umask (shared results on a cluster), not mkstemp's 0600
    assert all(p.stat().st_mode & 0o777 == storage.FILE_MODE for p in tmp_path.iterdir())
    assert storage.FILE_MODE & 0o600 == 0o600


def test_text_files_are_written_whole(tmp_path, monkeypatch):
    storage.write_text_atomic(tmp_path / "top.json", "[1]")
    assert (tmp_path / "top.json").read_text() == "[1]" and len(list(tmp_path.iterdir())) == 1

    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tmp_path), "write_text", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.write_text_atomic(tmp_path / "top.json", "[2]")
    monkeypatch.undo()
    assert (tmp_path / "top.json").read_text() == "[1]" and len(list(tmp_path.iterdir())) == 1


def test_queries_against_other_factors_fail(fitted, tmp_path):
    engine, factors, queries, train = fitted
    other = engine.fit_factors(torch.utils.data.Subset(train, range(len(train) - 1)), batch_size=3)
    queries.save(tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match="prepared with factors"):
        pyinf.Queries.load(tmp_path / "q.safetensors", factors=other)


def test_a_fit_repeated_bit_for_bit_keeps_its_id(fitted, tmp_path):
    """The id follows the factors' content and settings (it was random): a `fit; score` script
    run again after a crash refits the same factors, and the queries and score chunks saved
    against the first fit still count. Another seed (true Fisher draws) is another fit."""
    engine, factors, queries, train = fitted
    again = engine.fit_factors(train, fisher=factors.meta["fisher"], batch_size=3, seed=factors.meta["seed"])
    assert again.id == factors.id
    queries.save(tmp_path / "q.safetensors")
    pyinf.Queries.load(tmp_path / "q.safetensors", factors=again)
    assert engine.fit_factors(train, fisher=factors.meta["fisher"], batch_size=3,
                              seed=factors.meta["seed"] + 1).id != factors.id


def test_factors_for_another_model_fail(fitted):
    _, factors, queries, train = fitted
    bigger = tiny_gpt2(seed=3, vocab=40)
    bigger.transformer.h[0].mlp.c_fc = type(bigger.transformer.h[0].mlp.c_fc)(32, 16)  # d_out 32 instead of 64
    other = pyinf.InfluenceEngine(bigger, pyinf.CausalLMTask(), progress=False)
    with pytest.raises(ValueError, match="transformer.h.0.mlp.c_fc"):
        other.self_influence(train, factors)
    mlp_engine = pyinf.InfluenceEngine(TinyMLP(), MLPTask(), progress=False)
    with pytest.raises(ValueError, match="do not match the model's tracked modules"):
        mlp_engine.pairwise_scores(RegressionDataset(3), queries)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "wrong_kind"])
def test_corrupt_files_are_refused(fitted, tmp_path, damage):
    _, factors, queries, _ = fitted
    path = factors.save(tmp_path / "f.safetensors")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":
        data[-5] ^= 0xFF  # inside the last tensor's bytes
        path.write_bytes(bytes(data))
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    else:
        path = queries.save(tmp_path / "f.safetensors")
    with pytest.raises(storage.CorruptFileError):
        pyinf.Factors.load(path)
    # verify (one tensor at a time) refuses it alike, and its message is load's
    with pytest.raises(storage.CorruptFileError) as verified:
        storage.verify(path, "factors")
    if damage == "flip":
        assert "fails its checksum" in str(verified.value)


def test_verify_returns_the_metadata_of_a_whole_file(fitted, tmp_path):
    _, factors, _, _ = fitted
    path = factors.save(tmp_path / "f.safetensors")
    assert storage.verify(path, "factors") == storage.load(path, "factors")[1]


def test_failed_save_leaves_nothing(fitted, tmp_path, monkeypatch):
    _, factors, _, _ = fitted

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(storage, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        factors.save(tmp_path / "f.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no pyinf factors file"):
        pyinf.Factors.load("/nonexistent/f.safetensors")


class _NaNGradModel(nn.Module):
    """Finite loss, but sqrt at 0 sends an infinite gradient into fc1 for rows of zeros."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 1)

    def forward(self, x):
        return self.fc2(torch.sqrt(torch.relu(self.fc1(x)) * (x.abs().sum(-1, keepdim=True) > 0)))


class _RegressionTask(pyinf.Task):
    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        return ((model(x) - y) ** 2).sum()

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


def test_nonfinite_gradient_names_module_and_batch():
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    x[4] = 0  # batch 2 with batch_size 2
    data = torch.utils.data.TensorDataset(x, y)
    model = _NaNGradModel()
    with torch.no_grad():  # active ReLUs at x = 0 (with every bias <= 0, 1 seed in 16, no NaN got through)
        model.fc1.bias.fill_(0.5)
    engine = pyinf.InfluenceEngine(model, _RegressionTask(), progress=False)
    with pytest.raises(FloatingPointError, match=r"module 'fc1' in batch 2"):
        engine.fit_factors(data, batch_size=2)


def test_nonfinite_loss_names_batch():
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    y[3] = float("nan")
    data = torch.utils.data.TensorDataset(x, y)
    engine = pyinf.InfluenceEngine(TinyMLP(), MLPTask(), progress=False)
    with pytest.raises(FloatingPointError, match="batch 1"):
        engine.fit_factors(data, batch_size=2, fisher="empirical")


def test_a_task_that_post_processes_per_sample_gradients_is_refused():
    """kronfluence's per-sample-gradient hook cannot apply in pyinf (no per-sample gradient is
    formed): such a task would be scored as if it had none (relative error 0.23 in a review)."""
    class PostProcessed(MLPTask):
        enable_post_process_per_sample_gradient = True

        def post_process_per_sample_gradient(self, module_name, gradient):
            return 3.0 * gradient

    with pytest.raises(ValueError, match="PostProcessed sets enable_post_process_per_sample_gradient"):
        pyinf.InfluenceEngine(TinyMLP(), PostProcessed())


def test_a_task_class_or_another_object_is_no_task():
    with pytest.raises(TypeError, match=r"got the class MLPTask: pass MLPTask\(\)"):
        pyinf.InfluenceEngine(TinyMLP(), MLPTask)
    with pytest.raises(TypeError, match="task must be a pyinf.Task .* got dict"):
        pyinf.InfluenceEngine(TinyMLP(), {"loss": "mse"})


def test_empty_dataset_and_model_without_layers():
    engine = pyinf.InfluenceEngine(TinyMLP(), MLPTask(), progress=False)
    with pytest.raises(ValueError, match="empty"):
        engine.fit_factors(RegressionDataset(0))
    with pytest.raises(ValueError, match="no trackable layer"):
        pyinf.InfluenceEngine(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.ReLU()), MLPTask())
    with pytest.raises(ValueError, match="not in the model"):
        pyinf.InfluenceEngine(TinyMLP(), pyinf.CausalLMTask(tracked_modules=["fc9"]))
    with pytest.raises(ValueError, match="is a ReLU"):
        pyinf.InfluenceEngine(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), pyinf.CausalLMTask(tracked_modules=["1"]))


def test_bad_arguments():
    engine = pyinf.InfluenceEngine(TinyMLP(), MLPTask(), progress=False)
    data = RegressionDataset(4)
    with pytest.raises(ValueError, match="fisher must be"):
        engine.fit_factors(data, fisher="fake")
    with pytest.raises(ValueError, match="batch_size"):
        engine.fit_factors(data, batch_size=0)
    with pytest.raises(TypeError, match="Dataset"):
        engine.fit_factors(42)
    factors = engine.fit_factors(data)
    with pytest.raises(ValueError, match="rank"):
        engine.prepare_queries(data, factors, rank=0)
    with pytest.raises(ValueError, match="damping"):
        engine.prepare_queries(data, factors, damping=-1.0)
    with pytest.raises(ValueError, match="unknown backend"):
        pyinf.InfluenceEngine(TinyMLP(), MLPTask(), backend="cuda")
    # swapped arguments are named, not an AttributeError from deep inside
    queries = engine.prepare_queries(data, factors, rank=1)
    with pytest.raises(TypeError, match="pairwise_scores: 'queries' must be a pyinf Queries, got Factors"):
        engine.pairwise_scores(data, factors)
    with pytest.raises(TypeError, match="self_influence: 'factors' must be a pyinf Factors, got Queries"):
        engine.self_influence(data, queries)
    with pytest.raises(TypeError, match="prepare_queries: 'factors' must be a pyinf Factors, got Queries"):
        engine.prepare_queries(data, queries)
    with pytest.raises(TypeError, match="score_corpus: 'queries' must be a pyinf Queries, got Factors"):
        pyinf.score_corpus(engine, data, factors, "unused")
    with pytest.raises(TypeError, match="self_influence_corpus: 'factors' must be a pyinf Factors, got Queries"):
        pyinf.self_influence_corpus(engine, data, queries, "unused")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        engine.prepare_queries(data, factors, rank=True)
    with pytest.raises(ValueError, match="query_batch_size must be a positive integer"):
        engine.pairwise_scores(data, queries, query_batch_size=True)
    with pytest.raises(TypeError, match="seed must be an integer"):
        engine.fit_factors(data, seed=None)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="'damping' must be a finite non-negative number"):
            engine.prepare_queries(data, factors, damping=bad)


def test_pad_collate_names_a_field_of_another_length():
    from pyinf.task import pad_collate

    good = {"input_ids": [1, 2, 3], "labels": [1, 2, 3]}
    with pytest.raises(ValueError, match="example 1 of the batch has 5 input_ids but 3 labels"):
        pad_collate([good, {"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3]}])
    with pytest.raises(ValueError, match="example 0 of the batch has 3 input_ids but 2 attention_mask"):
        pad_collate([dict(good, attention_mask=[1, 1])])
    # examples that are no CausalLMTask examples (a TensorDataset's tuples, other keys)
    with pytest.raises(TypeError, match="example 1 of the batch is a tuple, not a dict with 'input_ids'"):
        pad_collate([good, (torch.tensor([1, 2]),)])
    with pytest.raises(TypeError, match=r"example 0 of the batch is a dict with keys \['ids'\]"):
        pad_collate([{"ids": [1, 2]}])


@pytest.mark.parametrize("fused_head", [False, True])
def test_true_fisher_on_non_finite_logits_names_the_batch(fused_head):
    """No label can be drawn from NaN logits: the rows draw from a uniform distribution
    instead (no failure inside multinomial), their loss is NaN, and the pass stops on it."""
    model = tiny_gpt2(seed=3)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(fused_head=fused_head), progress=False)
    with pytest.raises(FloatingPointError, match=r"the loss of batch 0 is nan") as info:
        engine.fit_factors(TokenDataset(4, seed=1), batch_size=2)
    assert "covariance" in "".join(getattr(info.value, "__notes__", []))


def test_loss_that_ignores_tracked_layers():
    class Detached(MLPTask):
        def compute_train_loss(self, batch, model, sample=False):
            return model(batch[0]).detach().sum() * 0 + batch[1].sum()

    engine = pyinf.InfluenceEngine(TinyMLP(), Detached(), progress=False)
    with pytest.raises(RuntimeError, match="does not depend on any tracked module"):
        engine.fit_factors(RegressionDataset(3))


def _alter_first_measurement(raw: bytes) -> bytes:
    """A saved queries file with one digit of its first measurement changed in the header."""
    key = b'measurements\\": ['  # the pyinf metadata is a JSON string inside safetensors' JSON header
    i = raw.index(key) + len(key)
    digit = next(j for j in range(i, i + 40) if raw[j:j + 1].isdigit())
    return raw[:digit] + bytes([ord("9") if raw[digit] != ord("9") else ord("8")]) + raw[digit + 1:]


def test_altered_metadata_is_refused(fitted, tmp_path):
    """The metadata has its own checksum: a query's measurement changed in the header (the
    tensors intact) is refused."""
    engine, factors, queries, train = fitted
    path = tmp_path / "q.safetensors"
    queries.save(path)
    path.write_bytes(_alter_first_measurement(path.read_bytes()))
    with pytest.raises(storage.CorruptFileError, match="its metadata fails its checksum"):
        pyinf.Queries.load(path, factors=factors)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11+")
def test_a_model_error_is_noted_with_its_batch_and_documents(fitted):
    """A model's own error (a token id past the vocabulary, in document 4) names no batch:
    the pass adds a note with the pass, the batch and its documents; a loader's error too."""
    engine, factors, queries, train = fitted
    bad = TokenDataset(6, seed=1)
    bad.items[4]["input_ids"][1] = 10_000
    with pytest.raises(IndexError) as info:
        engine.fit_factors(bad, batch_size=2)
    assert "pyinf: covariances: in batch 2 (documents 4 to 5 in the loader's order)" in info.value.__notes__

    class Failing(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            if i == 3:
                raise KeyError("record 3 is missing")
            return train[i]

    with pytest.raises(KeyError) as info:
        engine.self_influence(Failing(), factors, batch_size=2)
    assert info.value.__notes__ == ["pyinf: self-influence: in loading batch 1"]


def test_a_damaged_checksum_key_does_not_switch_the_check_off(fitted, tmp_path):
    """A flipped byte in the name of the metadata checksum's own key, plus an altered value:
    the file still records a layout, so it must have had a checksum: refused."""
    engine, factors, queries, train = fitted
    path = tmp_path / "q.safetensors"
    queries.save(path)
    path.write_bytes(_alter_first_measurement(path.read_bytes().replace(b"meta_crc32", b"meta_crc3X", 1)))
    with pytest.raises(storage.CorruptFileError, match="its metadata fails its checksum"):
        pyinf.Queries.load(path, factors=factors)


def test_a_failed_write_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    """safetensors' own errors (a full disk: SafetensorError) name no file: the save says
    which, as an OSError, and no file (nor temporary file) is left."""
    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr(storage, "save_file", full_disk)
    with pytest.raises(OSError, match=r"could not write .*x\.safetensors: .*No space left"):
        storage.save(tmp_path / "x.safetensors", "scores", {"scores": torch.zeros(2)}, {})
    assert list(tmp_path.iterdir()) == []


def test_a_streamed_save_is_the_file_save_writes(tmp_path, monkeypatch):
    """save_streamed (for files too large to hold: merged 7B factors) writes, one tensor at a
    time, a file that load reads and checks as save's, with the same metadata, in every dtype
    and shape (bf16 bytes, a scalar, an empty tensor); a tensor that is not what its layout
    says, or a full disk, leaves nothing."""
    tensors = {"a": torch.randn(3, 5, dtype=torch.float64), "b": torch.randn(7).bfloat16(), "c": torch.randn(2, 3),
               "h": torch.randn(5).half(), "s": torch.tensor(3.0), "z": torch.zeros(0, 4), "i": torch.arange(5)}
    layout = {k: (t.dtype, tuple(t.shape), storage._crc(t)) for k, t in tensors.items()}
    asked = []
    storage.save_streamed(tmp_path / "x.safetensors", "test", layout, lambda k: asked.append(k) or tensors[k], {"n": 1})
    assert sorted(asked) == sorted(tensors)  # each produced once
    got, meta = storage.load(tmp_path / "x.safetensors", "test")
    assert all(torch.equal(got[k], t) for k, t in tensors.items())
    storage.save(tmp_path / "y.safetensors", "test", tensors, {"n": 1})
    assert meta == storage.load_meta(tmp_path / "y.safetensors", "test")
    for wrong, why in ((lambda k: tensors[k] + (k == "c"), "tensor 'c' does not match its given checksum"),
                       (lambda k: tensors[k].double() if k == "c" else tensors[k],
                        r"tensor 'c' is torch.float64 \(2, 3\), its layout says torch.float32 \(2, 3\)")):
        with pytest.raises(ValueError, match=rf"could not write .*w.safetensors: {why}"):
            storage.save_streamed(tmp_path / "w.safetensors", "test", layout, wrong, {})

    def full_disk(k):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=r"could not write .*w.safetensors: No space left on device"):
        storage.save_streamed(tmp_path / "w.safetensors", "test", layout, full_disk, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors", "y.safetensors"]


def test_run_meta_with_tuples_numpy_scalars_and_info_keys(fitted, tmp_path, capsys):
    """A run's settings are compared as they read back from JSON (a tuple is a list there),
    numpy seeds and dampings are saved as numbers, and `pyinf info` shows a file whose
    run_meta has keys of its own names (path, bytes, tensors)."""
    np = pytest.importorskip("numpy")
    engine, factors, queries, train = fitted
    run_meta = {"window": (0, 512), "path": "somewhere"}
    first = pyinf.score_corpus(engine, train, queries, tmp_path / "out", chunk_size=4, run_meta=run_meta,
                               log=lambda *_: None)
    again = pyinf.score_corpus(engine, train, queries, tmp_path / "out", chunk_size=4, run_meta=run_meta,
                               log=lambda *_: None)
    assert torch.equal(first, again)
    from pyinf.cli import main

    assert main(["info", str(next((tmp_path / "out" / "scores-chunks").iterdir()))]) == 0
    assert '"path":' in capsys.readouterr().out
    f = engine.fit_factors(train, batch_size=3, seed=np.int64(2))
    f.save(tmp_path / "f.safetensors")
    q = engine.prepare_queries(TokenDataset(2, seed=2, completion=2), f, rank=2, damping=np.float32(0.01))
    q.save(tmp_path / "q.safetensors")
    assert pyinf.Queries.load(tmp_path / "q.safetensors", factors=f).meta["damping_arg"] == pytest.approx(0.01)


def test_a_tracked_layer_never_called_is_named_as_such():
    """A registered Linear the forward never runs (a spare head) is tracked by default; the
    fit says it was never called, not that it saw only padding."""
    class WithSpare(TinyMLP):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(3, 3)

    engine = pyinf.InfluenceEngine(WithSpare(), MLPTask(), progress=False)
    with pytest.raises(RuntimeError, match=r"module 'spare' received no gradient in the factor pass: the model's "
                                           r"forward does not run it .*does not reach the loss"):
        engine.fit_factors(RegressionDataset(4), batch_size=2)


def test_an_iterable_dataset_loader_keeps_its_own_order_without_a_warning():
    data = RegressionDataset(4)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(data)

    from pyinf.data import make_loader

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader = make_loader(torch.utils.data.DataLoader(Stream(), batch_size=2), batch_size=2)
    got = torch.cat([x for x, _ in loader])
    assert torch.equal(got, torch.stack([data[i][0] for i in range(4)]))  # the stream's own order
    # and every pass runs on it (its len() raises TypeError): the same numbers as the dataset's
    engine = pyinf.InfluenceEngine(TinyMLP(), MLPTask(), progress=False)
    stream = torch.utils.data.DataLoader(Stream(), batch_size=2)
    factors, expected = engine.fit_factors(data, batch_size=2), engine.fit_factors(stream)
    for name in factors.modules:
        assert torch.equal(factors[name].lambdas, expected[name].lambdas)
    queries = engine.prepare_queries(data, factors, rank=2)  # (MLPTask's measurements read queries by index)
    assert torch.equal(engine.pairwise_scores(stream, queries), engine.pairwise_scores(data, queries, batch_size=2))


def test_layers_that_never_run_and_shared_weights():
    """nn.MultiheadAttention reads out_proj's weight directly: left out of default tracking,
    refused by name. Two tracked layers sharing a weight warn (their cross terms are left out).
    A DataLoader with a reordering batch sampler warns that scores follow its order."""
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12)
    from pyinf.modules import find_tracked_modules

    assert "self_attn.out_proj" not in find_tracked_modules(layer)
    with pytest.raises(ValueError, match="'self_attn.out_proj' is never called: its MultiheadAttention uses"):
        find_tracked_modules(layer, ["self_attn.out_proj"])
    # Hugging Face's Mamba mixers multiply by dt_proj's weight themselves (a fit would fail
    # only after its whole first pass)
    from transformers import MambaConfig, MambaForCausalLM
    mamba = MambaForCausalLM(MambaConfig(vocab_size=20, hidden_size=8, state_size=2, num_hidden_layers=1, expand=2))
    assert "backbone.layers.0.mixer.dt_proj" not in find_tracked_modules(mamba)
    assert "backbone.layers.0.mixer.x_proj" in find_tracked_modules(mamba)
    with pytest.raises(ValueError, match="'backbone.layers.0.mixer.dt_proj' is never called: its MambaMixer uses"):
        find_tracked_modules(mamba, ["backbone.layers.0.mixer.dt_proj"])
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    with pytest.warns(UserWarning, match=r"tracked layers \['0', '2'\] share one weight"):
        find_tracked_modules(model)

    class Reversed(torch.utils.data.BatchSampler):
        def __iter__(self):
            return reversed(list(super().__iter__()))

    from pyinf.data import make_loader

    data = RegressionDataset(6, seed=1)
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=Reversed(torch.utils.data.SequentialSampler(data), batch_size=2, drop_last=False))
    with pytest.warns(UserWarning, match="does not iterate in order"):
        make_loader(loader, batch_size=2, what="training data")


def test_tensor_of_another_dtype_or_shape_is_refused(tmp_path):
    """A tensor's bytes reinterpreted (another dtype or shape, the same bytes and so the same
    CRC) is caught by the recorded layout."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    x = torch.randn(2, 4)
    storage.save(path, "test", {"x": x}, {})
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    for other, what in ((x.view(torch.int32), r"int32 \(2, 4\)"), (x.reshape(4, 2), r"float32 \(4, 2\)")):
        save_file({"x": other.contiguous()}, str(path), metadata=header)
        with pytest.raises(storage.CorruptFileError, match=rf"tensor 'x' is torch.{what}, its metadata says float32"):
            storage.load(path, "test")


def test_a_shared_module_named_by_its_second_name():
    """A module registered twice (ModuleList([lin, lin])) is known by its first name; its
    second name is explained, not reported as missing."""
    from pyinf.modules import find_tracked_modules

    lin = nn.Linear(3, 3)
    model = nn.Module()
    model.blocks = nn.ModuleList([lin, lin])
    with pytest.raises(ValueError, match=r"'blocks.1' is the module 'blocks.0' under a second name"):
        find_tracked_modules(model, ["blocks.1"])


def test_a_layer_without_gradients_is_named_instead_of_scoring_nan():
    """Factors fitted where no token carried a loss (every label -100) have S = Lambda = 0 and
    a default damping of 0: queries came out NaN (no warning), or a rank-limited preparation
    failed in torch's SVD. The fit warns, naming the layer, and using such factors, or a
    damping of 0 where Lambda has zero entries, is refused, naming the module."""
    model = tiny_gpt2(seed=3)
    engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False)
    train, query = TokenDataset(4, seed=1, completion=0), TokenDataset(2, seed=2, completion=2)
    for item in train.items:
        item["labels"][:] = -100
    with pytest.warns(UserWarning, match=r"module '[^']+' received only zero output gradients .*every label -100"):
        factors = engine.fit_factors(train, batch_size=2, fisher="empirical")
    for rank in (None, 2):
        with pytest.raises(ValueError, match=r"module '[^']+': Lambda \+ damping is 0 .*every entry is 0.*positive damping"):
            engine.prepare_queries(query, factors, rank=rank)
    with pytest.raises(ValueError, match=r"Lambda \+ damping is 0"):
        engine.self_influence(train, factors)
    queries = engine.prepare_queries(query, factors, rank=2, damping=1e-3)  # a positive damping works
    assert torch.isfinite(engine.pairwise_scores(train, queries)).all()
    # some zero entries: the default damping is positive, damping=0 is refused
    f = next(iter(factors.modules.values()))
    f.lambdas = torch.rand_like(f.lambdas)
    f.lambdas[0, 0] = 0
    assert f.damping() > 0
    with pytest.raises(ValueError, match=r"1 of \d+ entries are 0"):
        f.damping(0.0)
    for bad in (float("inf"), float("nan"), -1.0, True):
        with pytest.raises(ValueError, match="finite non-negative"):
            f.damping(bad)
    f.lambdas[0, 1] = float("nan")
    with pytest.raises(ValueError, match="Lambda holds NaN or infinite values"):
        f.damping(1.0)
