"""Factors at the scale of a 7B model: fits of disjoint layer groups merge into what one fit
of every layer gives (Factors.merge, `pyinf merge-factors`), a factors file's header is read
without its tensors, and the passes after a fit place only what preconditioning reads on the
device."""
import json
import warnings

import pytest
import torch

import pyinf
from pyinf.cli import run
from pyinf.factors import _FIELDS, FactorsHeader
from tests import seeds
from tests.files import flip_tensor_byte
from tests.models import MLPTask, RegressionDataset, TinyMLP


class GroupTask(MLPTask):
    def __init__(self, tracked):
        self.tracked = tracked

    def get_influence_tracked_modules(self):
        return self.tracked


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(seeds.offset(4))
    model = TinyMLP().double()
    return model, RegressionDataset(11, seed=5, dtype=torch.float64)


def _fit(model, data, tracked, fisher="true"):
    engine = pyinf.InfluenceEngine(model, GroupTask(tracked), progress=False)
    return engine, engine.fit_factors(data, fisher=fisher, batch_size=4, seed=7)


@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_merged_groups_are_the_fit_of_every_layer(setup, fisher):
    model, data = setup
    _, whole = _fit(model, data, ["fc1", "fc2", "head"], fisher)
    _, first = _fit(model, data, ["fc2"], fisher)
    _, second = _fit(model, data, ["head", "fc1"], fisher)
    merged = pyinf.Factors.merge([first, second])
    assert merged.module_names == ["fc2", "fc1", "head"]  # the parts in order, each in the model's order
    for name in whole.module_names:  # the same draws of the true Fisher: each layer's factors exactly
        for field in _FIELDS:
            assert torch.equal(getattr(merged[name], field), getattr(whole[name], field)), (name, field)
    assert merged.meta["n_tokens"] == whole.meta["n_tokens"]
    assert merged.meta["merged_from"] == [first.id, second.id]
    assert merged.id not in (first.id, second.id, whole.id)  # its own layers and record
    assert pyinf.Factors.merge([first, second]).id == merged.id  # and the same every time
    assert merged.meta["seconds"]["lambda_pass"] == pytest.approx(
        first.meta["seconds"]["lambda_pass"] + second.meta["seconds"]["lambda_pass"])
    # scores from the merged factors are those of the whole fit
    engine = pyinf.InfluenceEngine(model, GroupTask(["fc1", "fc2", "head"]), progress=False)
    queries = engine.prepare_queries(RegressionDataset(3, seed=6, dtype=torch.float64), merged, rank=2)
    want = engine.prepare_queries(RegressionDataset(3, seed=6, dtype=torch.float64), whole, rank=2)
    torch.testing.assert_close(engine.pairwise_scores(data, queries), engine.pairwise_scores(data, want),
                               rtol=0, atol=0)


def test_a_merge_of_other_fits_is_refused(setup):
    model, data = setup
    _, first = _fit(model, data, ["fc2"])
    _, second = _fit(model, data, ["head"])
    with pytest.raises(ValueError, match=r"part 2 \(\w+\) holds layers an earlier part holds too: \['fc2'\]"):
        pyinf.Factors.merge([first, second, first])
    _, other_fisher = _fit(model, data, ["head"], fisher="empirical")
    with pytest.raises(ValueError, match=r"part 1 \(\w+\) was fitted otherwise than part 0 \(fisher: 'empirical' in "
                                         r"part 1, 'true' in part 0\); merge fits of the same data and settings"):
        pyinf.Factors.merge([first, other_fisher])
    engine = pyinf.InfluenceEngine(model, GroupTask(["head"]), progress=False)
    fewer = engine.fit_factors(RegressionDataset(10, seed=5, dtype=torch.float64), fisher="true", batch_size=4,
                               seed=7)
    with pytest.raises(ValueError, match=r"n_examples: 10 in part 1, 11 in part 0"):
        pyinf.Factors.merge([first, fewer])
    with pytest.raises(TypeError, match="a non-empty sequence of Factors expected"):
        pyinf.Factors.merge([])
    # a part that records its fit's inputs (the CLI's) merges with one that does not (the API's):
    # only the settings both record are compared
    recorded = pyinf.Factors(dict(second.modules), dict(second.meta, fit_run={"documents": ["abc"], "modules": []}))
    assert pyinf.Factors.merge([first, recorded]).module_names == ["fc2", "head"]


def test_the_header_alone_names_the_factors(setup, tmp_path):
    model, data = setup
    _, factors = _fit(model, data, ["fc1", "head"])
    factors.save(tmp_path / "f.safetensors")
    header = pyinf.Factors.load_header(tmp_path / "f.safetensors")
    assert isinstance(header, FactorsHeader)
    assert header.id == factors.id and header.module_names == factors.module_names
    assert header.meta["seed"] == 7 and "modules" not in header.meta
    header.check_model(factors.specs)
    # a damaged header is refused; another kind of file too
    raw = bytearray((tmp_path / "f.safetensors").read_bytes())
    at = raw.index(b'"fisher\\": \\"true')
    raw[at + 13:at + 17] = b"fake"
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    with pytest.raises(pyinf.storage.CorruptFileError, match="metadata fails its checksum"):
        pyinf.Factors.load_header(tmp_path / "bad.safetensors")
    pyinf.storage.save(tmp_path / "other.safetensors", "scores", {"scores": torch.zeros(2, 2)}, {})
    with pytest.raises(pyinf.storage.CorruptFileError, match="holds pyinf 'scores', not 'factors'"):
        pyinf.Factors.load_header(tmp_path / "other.safetensors")


def test_preconditioners_move_without_the_covariances(setup):
    model, data = setup
    _, factors = _fit(model, data, ["fc1", "head"])
    placed = factors.preconditioners_on("meta", what="test")
    for name in factors.module_names:
        for field in ("q_a", "q_s", "lambdas", "a_eigvals", "s_eigvals"):
            assert getattr(placed[name], field).device.type == "meta", field
        for field in ("a_cov", "s_cov"):  # only the fit reads them
            assert getattr(placed[name], field) is getattr(factors[name], field)
    assert placed.preconditioners_on("meta", what="test") is placed  # there already


def test_preconditioners_that_would_crowd_the_gpu_stay_on_the_host(setup, monkeypatch):
    model, data = setup
    _, factors = _fit(model, data, ["fc1", "head"])
    need = sum(t.numel() * 8 for n in factors.module_names  # float64: the eigenbases, eigenvalues, Lambda
               for t in (factors[n].q_a, factors[n].q_s, factors[n].lambdas, factors[n].a_eigvals,
                         factors[n].s_eigvals))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * need - 2, 10 * need))
    with pytest.warns(UserWarning, match=r"pyinf self_influence: the factors' eigenbases and Lambda \(.* GiB\) would "
                                         r"take more than half of the GPU's free memory.*track fewer layers"):
        kept = factors.preconditioners_on("cuda", what="self_influence")
    assert kept.modules == factors.modules  # the same tensors, on the host
    # a later pass over the kept factors (self_influence_corpus's chunks) does not warn again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kept.preconditioners_on("cuda", what="self_influence") is kept
        # nor one over a subset of its layers (scoring.self_influence takes the tracked ones)
        assert kept.subset(["head"]).preconditioners_on("cuda", what="self_influence").modules == \
            {"head": factors["head"]}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * need, 10 * need))
    if torch.cuda.is_available():  # fits: moved
        assert factors.preconditioners_on("cuda", what="self_influence")["head"].q_a.is_cuda
    else:  # fits: moved, which a build without CUDA cannot do
        with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
            factors.preconditioners_on("cuda", what="self_influence")


def test_merge_factors_command(tmp_path, capsys, monkeypatch):
    cfg = dict(model_type="gpt2", n_embd=16, n_layer=2, n_head=2, vocab_size=260, n_positions=64,
               bos_token_id=0, eos_token_id=0)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(cfg))
    texts = ["the cat sat on the mat", "two plus three is five", "paris is in france", "x = 3 * 4 + 1"]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "queries.jsonl").write_text(json.dumps({"prompt": "where is paris? ", "completion": "france"}))
    common = ["--model", str(tmp_path / "model"), "--batch-size", "2", "--no-progress"]
    fit = ["fit", *common, "--train", str(tmp_path / "train.jsonl"), "--fisher", "true"]
    for group, track in (("a", r"h\.0\.mlp"), ("b", r"h\.1\.mlp"), ("all", "mlp")):
        assert run([*fit, "--track", track, "--out", str(tmp_path / f"{group}.safetensors")]) == 0
    merged = str(tmp_path / "merged.safetensors")
    assert run(["merge-factors", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                "--out", merged]) == 0
    assert "merged the factors of 4 modules from 2 fits" in capsys.readouterr().out
    # the merge records no fit of its own (a fit of part 0's layers into it is not skipped);
    # run again (a script resumed after a crash) it has nothing to do; other parts: refused
    assert "fit_run" not in pyinf.Factors.load_header(merged).meta
    assert run(["merge-factors", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                "--out", merged]) == 0
    assert "already holds the merge of these factors" in capsys.readouterr().out
    with pytest.raises(ValueError, match="merged.safetensors exists and is no merge of these factors: give another "
                                         "--out, or --force"):
        run(["merge-factors", str(tmp_path / "a.safetensors"), "--out", merged])
    # parts fitted on other data, or with other tokenisation settings, are refused by name
    (tmp_path / "other.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[::-1]))
    assert run(["fit", *common, "--train", str(tmp_path / "other.jsonl"), "--fisher", "true", "--track", r"h\.1\.mlp",
                "--out", str(tmp_path / "b-other.safetensors")]) == 0
    with pytest.raises(ValueError, match=r"part 1 \(\w+\) was fitted otherwise than part 0 \(fit_run.documents: "):
        run(["merge-factors", str(tmp_path / "a.safetensors"), str(tmp_path / "b-other.safetensors"),
             "--out", str(tmp_path / "x.safetensors")])
    assert run([*fit, "--track", r"h\.1\.mlp", "--max-length", "16", "--out", str(tmp_path / "b16.safetensors")]) == 0
    with pytest.raises(ValueError, match=r"fit_run.max_length: 16 in part 1, 64 in part 0"):
        run(["merge-factors", str(tmp_path / "a.safetensors"), str(tmp_path / "b16.safetensors"),
             "--out", str(tmp_path / "x.safetensors")])
    assert not (tmp_path / "x.safetensors").exists()
    # the merged factors score as those of one fit of every layer
    score = ["score", *common, "--train", str(tmp_path / "train.jsonl"), "--queries",
             str(tmp_path / "queries.jsonl"), "--rank", "4"]
    assert run([*score, "--factors", merged, "--out", str(tmp_path / "m")]) == 0
    assert run([*score, "--factors", str(tmp_path / "all.safetensors"), "--out", str(tmp_path / "w")]) == 0
    got, _ = pyinf.storage.load(tmp_path / "m" / "scores.safetensors", "scores")
    want, _ = pyinf.storage.load(tmp_path / "w" / "scores.safetensors", "scores")
    torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-5, atol=1e-8)
    # score --prepared reads the factors' header only (each shard of a 7B run would otherwise
    # read and checksum ~120 GB to learn an id)
    prepared = str(tmp_path / "q.safetensors")
    assert run(["prepare", *common, "--factors", merged, "--queries", str(tmp_path / "queries.jsonl"),
                "--rank", "4", "--out", prepared]) == 0

    def no_tensors(path):
        raise AssertionError("score --prepared read the factors' tensors")

    monkeypatch.setattr(pyinf.Factors, "load", staticmethod(no_tensors))
    assert run([*score, "--factors", merged, "--prepared", prepared, "--out", str(tmp_path / "p")]) == 0
    got, _ = pyinf.storage.load(tmp_path / "p" / "scores.safetensors", "scores")
    torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-5, atol=1e-8)


def test_merge_files_is_the_merge_saved(setup, tmp_path):
    """Merging saved parts file to file (one tensor in memory at a time: a 7B model's MLP
    factors are ~123 GB) writes the file Factors.merge(...).save would, with the same id; a
    damaged part stops it and leaves nothing at the output."""
    model, data = setup
    _, first = _fit(model, data, ["fc2"])
    _, second = _fit(model, data, ["fc1", "head"])
    paths = [first.save(tmp_path / "a.safetensors"), second.save(tmp_path / "b.safetensors")]
    header = pyinf.Factors.merge_files(paths, tmp_path / "streamed.safetensors")
    want = pyinf.Factors.merge([first, second])
    want.save(tmp_path / "saved.safetensors")
    assert header.id == want.id and header.module_names == want.module_names
    got = pyinf.Factors.load(tmp_path / "streamed.safetensors")
    assert got.meta == pyinf.Factors.load(tmp_path / "saved.safetensors").meta
    for name in want.module_names:
        for field in _FIELDS:
            assert torch.equal(getattr(got[name], field), getattr(want[name], field)), (name, field)
    from safetensors.torch import load_file  # and safetensors itself reads it
    assert torch.equal(load_file(tmp_path / "streamed.safetensors")["fc2::q_s"], want["fc2"].q_s)
    # a part saved before pyinf recorded its tensors' layout (and the metadata's checksum) merges as well
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(paths[0]), framework="pt") as f:
        header = json.loads(f.metadata()["pyinf"])
        old = {k: f.get_tensor(k) for k in f.keys()}
    for key in ("layout", "meta_crc32"):
        header.pop(key)
    save_file(old, str(tmp_path / "old.safetensors"), metadata={"pyinf": json.dumps(header)})
    assert pyinf.Factors.merge_files([tmp_path / "old.safetensors", paths[1]], tmp_path / "o.safetensors").id == want.id
    assert pyinf.Factors.load(tmp_path / "o.safetensors").meta == got.meta
    for name in ("old.safetensors", "o.safetensors"):
        (tmp_path / name).unlink()
    # the same checks as Factors.merge
    with pytest.raises(ValueError, match=r"Factors.merge_files: part 1 \(\w+\) holds layers an earlier part"):
        pyinf.Factors.merge_files([paths[0], paths[0]], tmp_path / "x.safetensors")
    # a part damaged in a tensor stops the merge, after the id's samples or during the copy
    for key in ("fc1::lambdas", "head::a_cov"):
        damaged = second.save(tmp_path / "d.safetensors")
        flip_tensor_byte(damaged, key)
        with pytest.raises(pyinf.storage.CorruptFileError, match=f"d.safetensors: tensor '{key}' fails its checksum"):
            pyinf.Factors.merge_files([paths[0], damaged], tmp_path / "x.safetensors")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "d.safetensors",
                                                                 "saved.safetensors", "streamed.safetensors"]


def test_factors_load_without_covariances_or_other_layers(setup, tmp_path):
    """Preparing queries and self-influence read no covariances: loading without them (and
    with only some layers) gives the same results, and such factors cannot be saved as whole."""
    model, data = setup
    engine, factors = _fit(model, data, ["fc1", "fc2", "head"])
    path = factors.save(tmp_path / "f.safetensors")
    light = pyinf.Factors.load(path, covariances=False)
    assert light.id == factors.id and all(light[n].a_cov is None and light[n].s_cov is None for n in light.modules)
    queries = RegressionDataset(3, seed=6, dtype=torch.float64)
    full = engine.prepare_queries(queries, factors, rank=2)
    torch.testing.assert_close(engine.pairwise_scores(data, engine.prepare_queries(queries, light, rank=2)),
                               engine.pairwise_scores(data, full), rtol=0, atol=0)
    torch.testing.assert_close(engine.self_influence(data, light), engine.self_influence(data, factors), rtol=0, atol=0)
    assert light.to("cpu")["fc1"].a_cov is None
    with pytest.raises(ValueError, match="loaded without their covariances"):
        light.save(tmp_path / "g.safetensors")
    two = pyinf.Factors.load(path, modules=["head", "fc1"])
    assert two.module_names == ["fc1", "head"] and torch.equal(two["head"].a_cov, factors["head"].a_cov)
    with pytest.raises(ValueError, match=r"f.safetensors holds no factors for \['fc9'\]"):
        pyinf.Factors.load(path, modules=["fc1", "fc9"])
    # the tensors read are checked as ever; those not read are not read
    flip_tensor_byte(path, "head::lambdas")
    with pytest.raises(pyinf.storage.CorruptFileError, match="'head::lambdas' fails its checksum"):
        pyinf.Factors.load(path, covariances=False)
    assert pyinf.Factors.load(path, modules=["fc1"]).module_names == ["fc1"]
    path = factors.save(tmp_path / "f2.safetensors")
    flip_tensor_byte(path, "fc1::a_cov")
    assert pyinf.Factors.load(path, covariances=False).id == factors.id
    with pytest.raises(pyinf.storage.CorruptFileError, match="'fc1::a_cov' fails its checksum"):
        pyinf.Factors.load(path)


@pytest.mark.parametrize("workers", [1, 2])
def test_eigendecompositions_in_groups_are_those_of_one_call(setup, monkeypatch, workers):
    """The fit decomposes its layers in groups bounded by their float64 eigenvectors' bytes (its
    peak memory beyond the sums): the factors are those of one call, bit for bit."""
    import pyinf.factors as factors_mod

    model, data = setup
    engine = pyinf.InfluenceEngine(model, GroupTask(["fc1", "fc2", "head"]), progress=False)
    whole = engine.fit_factors(data, fisher="empirical", batch_size=4, eigh_workers=workers)
    calls = []
    real = factors_mod.eigendecompose
    monkeypatch.setattr(factors_mod, "eigendecompose",
                        lambda matrices, workers: calls.append(len(matrices)) or real(matrices, workers=workers))
    monkeypatch.setattr(factors_mod, "_EIGH_GROUP_BYTES", 8 * (6 * 6 + 7 * 7))  # fc1's A and S: one layer a group
    grouped = engine.fit_factors(data, fisher="empirical", batch_size=4, eigh_workers=workers)
    assert calls == [2, 2, 2]
    assert grouped.id == whole.id
    for name in whole.module_names:
        for field in _FIELDS:
            assert torch.equal(getattr(grouped[name], field), getattr(whole[name], field)), (name, field)
