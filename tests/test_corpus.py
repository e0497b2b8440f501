"""Resumable, sharded scoring of a corpus (pyinf.corpus) and the lazily read JSONL corpus:
chunked scores equal one pass's, an interrupted run resumes without rescoring what it
saved, shards join into the same matrix, and a directory of another run is refused."""
import json
import pickle
import random
import shutil

import numpy as np
import pytest
import torch

import pyinf
from pyinf import corpus
from pyinf.textdata import ByteTokenizer, JsonlTextDataset
from tests import seeds
from tests.models import MLPTask, RegressionDataset, TinyMLP


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(seeds.offset(0))
    model = TinyMLP().double()
    engine = pyinf.InfluenceEngine(model, MLPTask(), progress=False)
    train = RegressionDataset(11, seed=1, dtype=torch.float64)
    factors = engine.fit_factors(train, batch_size=4)
    queries = engine.prepare_queries(RegressionDataset(3, seed=2, dtype=torch.float64), factors, rank=2)
    return engine, train, queries, engine.pairwise_scores(train, queries, batch_size=4)


class CountingDataset(torch.utils.data.Dataset):
    """Counts reads; raises at document `fail_at` (a crash in the middle of a run)."""

    def __init__(self, base, fail_at=None):
        self.base, self.fail_at, self.reads = base, fail_at, []

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError(f"simulated crash at document {i}")
        self.reads.append(i)
        return self.base[i]


def _chunks(out):
    return sorted(p.name for p in (out / "scores-chunks").iterdir())


def test_chunks_give_the_scores_of_one_pass(setup, tmp_path):
    engine, train, queries, want = setup
    log = []
    got = pyinf.score_corpus(engine, train, queries, tmp_path, chunk_size=4, batch_size=3, log=log.append)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert _chunks(tmp_path) == ["0000000000-0000000004.safetensors", "0000000004-0000000008.safetensors",
                                 "0000000008-0000000011.safetensors"]
    saved, meta = pyinf.storage.load(tmp_path / "scores.safetensors", "scores")
    assert torch.equal(saved["scores"], got) and meta["run"]["queries"] == queries.fingerprint
    assert len(log) == 3 and all("docs/s" in line for line in log)
    # a second run checks each saved chunk's documents (one read each) and scores none
    again = CountingDataset(train)
    assert torch.equal(pyinf.score_corpus(engine, again, queries, tmp_path, chunk_size=4, log=log.append), got)
    assert sorted(again.reads) == list(range(11))


class OverflowingDataset(torch.utils.data.Dataset):
    """Documents ``bad`` hold an Inf: their loss is not finite (a document that overflows
    in bf16, say)."""

    def __init__(self, base, bad):
        self.base, self.bad = base, set(bad)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (torch.full_like(x, float("inf")), y) if i in self.bad else (x, y)

    def where(self, i):
        return f"corpus.jsonl:{i + 1}"


def test_a_document_that_fails_alone_gets_nan_and_the_run_goes_on(setup, tmp_path):
    """A non-finite loss or gradient stops a batch; the chunk is halved until the document
    that fails alone is found: its scores (and self-influence) are NaN, it is named, and every
    other document's values are those of a clean run."""
    engine, train, queries, want = setup
    data = OverflowingDataset(train, bad=[5, 6, 10])
    log = []
    got = pyinf.score_corpus(engine, data, queries, tmp_path, chunk_size=4, batch_size=3, log=log.append)
    assert got.isnan().all(1).nonzero().squeeze(1).tolist() == [5, 6, 10]
    keep = [n for n in range(11) if n not in (5, 6, 10)]
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-10, atol=1e-12)
    named = [line for line in log if "on its own" in line]
    assert [line.split(" gives")[0] for line in named] == [
        "pyinf: document 5 (corpus.jsonl:6)", "pyinf: document 6 (corpus.jsonl:7)", "pyinf: document 10 (corpus.jsonl:11)"]
    assert "loss of batch 0 is" in named[0] and named[0].endswith("its scores are NaN")
    assert any("3 documents gave a non-finite loss or gradient on their own" in line for line in log)
    _, meta = pyinf.storage.load(tmp_path / "scores.safetensors", "scores")
    assert meta["nan_documents"] == 3
    _, chunk = pyinf.storage.load(tmp_path / "scores-chunks" / "0000000004-0000000008.safetensors", "scores-chunk")
    assert chunk["nan_documents"] == [5, 6]
    assert corpus.top_documents(got, 11)[0][-3:] == [5, 6, 10]  # ranked last
    factors = engine.fit_factors(train, batch_size=4)
    values = pyinf.self_influence_corpus(engine, data, factors, tmp_path, chunk_size=4, log=lambda m: None)
    assert values.isnan().nonzero().squeeze(1).tolist() == [5, 6, 10]
    torch.testing.assert_close(values[keep], engine.self_influence(train, factors, batch_size=4)[keep],
                               rtol=1e-10, atol=1e-12)
    # more than 8 failing alone in a chunk is the model's fault, not the documents': raised, and
    # the chunk is not saved
    with pytest.raises(FloatingPointError, match="loss of batch 0") as raised:
        pyinf.score_corpus(engine, OverflowingDataset(train, bad=range(11)), queries, tmp_path / "all",
                           chunk_size=11, log=lambda m: None)
    assert "more than 8 documents of chunk 0..10 fail on their own" in "".join(raised.value.__notes__)
    assert not list((tmp_path / "all").rglob("*.safetensors"))
    # and so is a run where every document failed, in chunks too small to tell
    with pytest.raises(FloatingPointError, match="every document gave a non-finite loss or gradient on its own"):
        pyinf.score_corpus(engine, OverflowingDataset(train, bad=range(11)), queries, tmp_path / "small",
                           chunk_size=4, log=lambda m: None)
    assert not (tmp_path / "small" / "scores.safetensors").exists()


def test_an_interrupted_run_resumes_where_it_stopped(setup, tmp_path):
    engine, train, queries, want = setup
    crashing = CountingDataset(train, fail_at=9)
    with pytest.raises(RuntimeError, match="simulated crash at document 9"):
        pyinf.score_corpus(engine, crashing, queries, tmp_path, chunk_size=3, log=lambda m: None)
    assert _chunks(tmp_path) == ["0000000000-0000000003.safetensors", "0000000003-0000000006.safetensors",
                                 "0000000006-0000000009.safetensors"]  # nothing half-written for the 4th
    assert not (tmp_path / "scores.safetensors").exists()
    resumed = CountingDataset(train)
    log = []
    got = pyinf.score_corpus(engine, resumed, queries, tmp_path, chunk_size=3, log=log.append)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # saved chunks are only re-hashed (reads of the examples), scored chunks are read twice (hash + pass)
    scored = [i for i in set(resumed.reads) if resumed.reads.count(i) > 1]
    assert sorted(scored) == [9, 10]
    assert "3 of 4 chunks already done" in log[0]


def test_shards_join_into_the_same_scores(setup, tmp_path):
    engine, train, queries, want = setup
    log = []
    parts = [pyinf.score_corpus(engine, train, queries, tmp_path, chunk_size=2, shard=(k, 3), log=log.append)
             for k in (2, 0, 1)]
    assert parts[0] is None and parts[1] is None  # the last shard to finish joins
    torch.testing.assert_close(parts[2], want, rtol=1e-10, atol=1e-12)
    assert len(_chunks(tmp_path)) == 6
    # the chunk grid does not depend on the shard count: resuming with 2 shards reuses them all
    (tmp_path / "scores.safetensors").unlink()
    reads = CountingDataset(train)
    assert torch.equal(pyinf.score_corpus(engine, reads, queries, tmp_path, chunk_size=2, shard=(1, 2),
                                          log=log.append), parts[2])
    # hashes only, no pass: its own documents to skip its chunks, the others' to check the
    # chunks it joins against their documents too (each document read once)
    assert sorted(reads.reads) == list(range(11))


def test_joining_checks_the_other_shards_chunks_against_their_documents(setup, tmp_path):
    """A shard that ran on another corpus of the same size (the same run otherwise) leaves
    chunks whose documents differ: the shard that joins refuses them instead of mixing them in."""
    engine, train, queries, _ = setup
    other = RegressionDataset(11, seed=7, dtype=torch.float64)
    assert pyinf.score_corpus(engine, other, queries, tmp_path, chunk_size=4, shard=(1, 2),
                              log=lambda m: None) is None
    with pytest.raises(ValueError, match="belongs to another run.*documents"):
        pyinf.score_corpus(engine, train, queries, tmp_path, chunk_size=4, shard=(0, 2), log=lambda m: None)
    assert not (tmp_path / "scores.safetensors").exists()


def test_shard_ranges_split_the_chunks_evenly():
    ranges = corpus.chunk_ranges(10, 3)
    assert ranges == [(0, 3), (3, 6), (6, 9), (9, 10)]
    shards = [corpus.shard_ranges(ranges, (k, 3)) for k in range(3)]
    assert sum(shards, []) == ranges and sorted(len(s) for s in shards) == [1, 1, 2]
    assert sum((corpus.shard_ranges(ranges, (k, 8)) for k in range(8)), []) == ranges  # more shards than chunks
    assert corpus.parse_shard("2/8") == (2, 8)
    for bad in ("8/8", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="shard"):
            corpus.parse_shard(bad)
    with pytest.raises(ValueError, match="chunk_size"):
        corpus.chunk_ranges(10, 0)


def test_shard_auto_takes_the_launchers_rank():
    """--shard auto: the rank and process count torchrun, srun or mpirun give a process; the
    default device follows the local rank where the process sees several GPUs."""
    from pyinf.cli import default_device

    assert corpus.parse_shard("auto", {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}) == (3, 8)
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}
    assert corpus.parse_shard("auto", srun) == (5, 16)
    assert corpus.parse_shard("auto", {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}) == (0, 2)
    assert corpus.parse_shard("auto", {"PMI_RANK": "1", "PMI_SIZE": "3"}) == (1, 3)
    # torchrun's variables win over the srun that started torchrun
    assert corpus.parse_shard("auto", {"RANK": "1", "WORLD_SIZE": "2", **srun}) == (1, 2)
    # a batch script is no srun step (SLURM_PROCID=0 of SLURM_NTASKS there): shard 0 of N alone would look done
    with pytest.raises(ValueError, match="shard 'auto' takes K/N from a launcher's environment .* none is set"):
        corpus.parse_shard("auto", {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"})
    with pytest.raises(ValueError, match="shard 'auto' takes K/N from a launcher's environment .* none is set"):
        corpus.parse_shard("auto", {})
    with pytest.raises(ValueError, match="shard 4/4"):
        corpus.parse_shard("auto", {"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="RANK='1', WORLD_SIZE='4', LOCAL_RANK='x': not all integers"):
        corpus.parse_shard("auto", {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "x"})
    assert corpus.launcher_rank({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2"}) == (2, 4, 2)
    launched = {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2"}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: False)
        assert default_device(launched) == "cpu"
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "device_count", lambda: 4)
        assert default_device(launched) == "cuda:2" and default_device({}) == "cuda"
        with pytest.raises(ValueError, match="local rank is 5, but it sees 4 GPUs: give --device"):
            default_device(dict(launched, LOCAL_RANK="5"))
        m.setattr(torch.cuda, "device_count", lambda: 1)  # srun --gpus-per-task=1: its one GPU
        assert default_device(dict(launched, LOCAL_RANK="5")) == "cuda"


def test_a_directory_of_another_run_is_refused(setup, tmp_path):
    engine, train, queries, _ = setup
    pyinf.score_corpus(engine, train, queries, tmp_path, chunk_size=4, shard=(0, 3), log=lambda m: None)
    other_queries = engine.prepare_queries(RegressionDataset(3, seed=5, dtype=torch.float64),
                                           engine.fit_factors(train, batch_size=4), rank=2)
    with pytest.raises(ValueError, match=r"belongs to another run \(queries: "):
        pyinf.score_corpus(engine, train, other_queries, tmp_path, chunk_size=4, log=lambda m: None)
    changed = RegressionDataset(11, seed=1, dtype=torch.float64)
    changed.x[2] += 1.0  # a document of the saved chunk 0..3 is not what it was
    with pytest.raises(ValueError, match="documents: "):
        pyinf.score_corpus(engine, changed, queries, tmp_path, chunk_size=4, log=lambda m: None)
    with pytest.raises(ValueError, match="label: "):
        pyinf.score_corpus(engine, train, queries, tmp_path, chunk_size=4, run_meta={"label": "b"},
                           log=lambda m: None)
    with torch.no_grad():
        engine.model.fc1.weight[0, 0] += 1.0  # another model
    try:
        with pytest.raises(ValueError, match="model: "):
            pyinf.score_corpus(engine, train, queries, tmp_path, chunk_size=4, log=lambda m: None)
    finally:
        with torch.no_grad():
            engine.model.fc1.weight[0, 0] -= 1.0


class _FirstLayerOnly(MLPTask):
    def get_influence_tracked_modules(self):
        return ["fc1"]


def test_a_finished_run_answers_only_for_its_own_settings(setup, tmp_path):
    """A finished directory was returned for queries or factors of other layers (the chunks
    were skipped as done before any layer check); chunks of another chunk size lay unused
    beside a run that scored everything again; chunks deleted after the join made it score
    everything again."""
    engine, train, queries, want = setup
    pyinf.score_corpus(engine, train, queries, tmp_path / "s", chunk_size=4, log=lambda m: None)
    fewer = pyinf.InfluenceEngine(engine.model, _FirstLayerOnly(), progress=False)
    with pytest.raises(ValueError, match="these queries"):
        pyinf.score_corpus(fewer, train, queries, tmp_path / "s", chunk_size=4, log=lambda m: None)
    factors = engine.fit_factors(train, batch_size=4)
    pyinf.self_influence_corpus(engine, train, factors, tmp_path / "si", chunk_size=4, log=lambda m: None)
    # factors of more layers serve fewer (they are per layer), but not this directory's run
    with pytest.raises(ValueError, match=r"self_influence.safetensors holds the self_influence of another run "
                                         r"\(layers: None there, '1 layer, [0-9a-f]+' now\)"):
        pyinf.self_influence_corpus(fewer, train, factors, tmp_path / "si", chunk_size=4, log=lambda m: None)
    with pytest.raises(ValueError, match=r"scores-chunks holds chunks that are not on this run's grid of "
                                         r"3-document chunks over 11 documents \(e.g. 0000000000-0000000004"
                                         r".safetensors, chunks of 4 documents\)"):
        (tmp_path / "s" / "scores.safetensors").unlink()
        pyinf.score_corpus(engine, train, queries, tmp_path / "s", chunk_size=3, log=lambda m: None)
    pyinf.score_corpus(engine, train, queries, tmp_path / "s", chunk_size=4, log=lambda m: None)  # joined again
    shutil.rmtree(tmp_path / "s" / "scores-chunks")
    log = []
    got = pyinf.score_corpus(engine, train, queries, tmp_path / "s", chunk_size=4,
                             log=log.append)
    assert torch.equal(got, pyinf.storage.load(tmp_path / "s" / "scores.safetensors", "scores")[0]["scores"])
    assert log == [f"pyinf: {tmp_path / 's' / 'scores.safetensors'} holds this run's scores, complete: "
                   "nothing to compute"]


def test_the_join_removes_what_killed_saves_left(setup, tmp_path):
    """A process killed while saving a chunk (or the joined result) leaves its temporary file;
    the join removes those not written to lately (a save in progress elsewhere keeps its own)."""
    import os
    import time

    engine, train, queries, want = setup
    chunks = tmp_path / "scores-chunks"
    chunks.mkdir()
    stale, fresh = chunks / ".0000000000-0000000004.safetensors.abc123.tmp", chunks / ".x.safetensors.def.tmp"
    # and in the output directory, a join killed while writing the joined scores (another
    # program's temporaries there are not pyinf's to remove)
    stale_join, fresh_join = tmp_path / ".scores.safetensors.q1w2.tmp", tmp_path / ".scores.safetensors.e3r4.tmp"
    foreign = tmp_path / ".notes.txt.x1.tmp"
    foreign.write_bytes(b"someone else's")
    os.utime(foreign, (time.time() - 3600,) * 2)
    stale.write_bytes(b"half a chunk")
    stale_join.write_bytes(b"half the scores")
    fresh.write_bytes(b"being written")
    fresh_join.write_bytes(b"being written")
    hour_ago = time.time() - 3600
    for path in (stale, stale_join):
        os.utime(path, (hour_ago, hour_ago))
    got = pyinf.score_corpus(engine, train, queries, tmp_path, chunk_size=4, log=lambda m: None)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert not stale.exists() and not stale_join.exists() and fresh.exists() and fresh_join.exists()
    assert foreign.exists()


def test_a_damaged_chunk_is_scored_again(setup, tmp_path):
    engine, train, queries, want = setup
    pyinf.score_corpus(engine, train, queries, tmp_path, chunk_size=5, log=lambda m: None)
    (tmp_path / "scores.safetensors").unlink()
    damaged = tmp_path / "scores-chunks" / "0000000005-0000000010.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-7])
    log = []
    got = pyinf.score_corpus(engine, train, queries, tmp_path, chunk_size=5, log=log.append)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert any("0000000005-0000000010" in line and "again" in line for line in log)


def test_self_influence_in_chunks_resumes_and_shards(setup, tmp_path):
    engine, train, queries, _ = setup
    factors = engine.fit_factors(train, batch_size=4)
    want = engine.self_influence(train, factors, batch_size=3)
    log = []
    parts = [pyinf.self_influence_corpus(engine, train, factors, tmp_path, chunk_size=3, shard=(k, 2),
                                         log=log.append) for k in (1, 0)]
    assert parts[0] is None
    torch.testing.assert_close(parts[1], want, rtol=1e-10, atol=1e-12)
    saved, meta = pyinf.storage.load(tmp_path / "self_influence.safetensors", "self_influence")
    assert torch.equal(saved["self_influence"], parts[1]) and meta["factors_id"] == factors.id
    # pairwise scores and self-influence share the directory without mixing
    pyinf.score_corpus(engine, train, queries, tmp_path, chunk_size=3, log=log.append)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["scores-chunks", "self_influence-chunks"]
    with pytest.raises(ValueError, match="damping: None there, 0.5 now"):
        pyinf.self_influence_corpus(engine, train, factors, tmp_path, damping=0.5, chunk_size=3, log=log.append)


def test_the_joined_scores_are_never_returned_for_other_documents(setup, tmp_path):
    """scores.safetensors records a hash of every document: a rerun after a document changed
    (even one outside the rerun shard's chunks) or on another corpus of the same size does not
    get the old joined scores back."""
    engine, train, queries, want = setup
    pyinf.score_corpus(engine, train, queries, tmp_path, chunk_size=4, log=lambda m: None)
    changed = RegressionDataset(11, seed=1, dtype=torch.float64)
    changed.x[0] += torch.randn(5, dtype=torch.float64)  # in shard 0's chunk, not in shard 1's
    with pytest.raises(ValueError, match=r"scores.safetensors holds the scores of another run \(documents: "):
        pyinf.score_corpus(engine, changed, queries, tmp_path, chunk_size=4, shard=(1, 2), log=lambda m: None)
    # the chunks gone (a finished run needs none), the joined file neither stands in for
    # another corpus nor is silently replaced by its scores
    shutil.rmtree(tmp_path / "scores-chunks")
    other = RegressionDataset(11, seed=int(torch.randint(100, 10**6, ())), dtype=torch.float64)
    before = (tmp_path / "scores.safetensors").read_bytes()
    with pytest.raises(ValueError, match="another run.*delete .*scores.safetensors"):
        pyinf.score_corpus(engine, other, queries, tmp_path, chunk_size=4, log=lambda m: None)
    assert (tmp_path / "scores.safetensors").read_bytes() == before
    (tmp_path / "scores.safetensors").unlink()  # the remedy it names
    got = pyinf.score_corpus(engine, other, queries, tmp_path, chunk_size=4, log=lambda m: None)
    torch.testing.assert_close(got, engine.pairwise_scores(other, queries, batch_size=4), rtol=1e-10, atol=1e-12)
    # ... and a rerun on the same documents reuses it: hashes only, no pass
    reads = CountingDataset(other)
    assert torch.equal(pyinf.score_corpus(engine, reads, queries, tmp_path, chunk_size=4, shard=(1, 2),
                                          log=lambda m: None), got)
    assert sorted(reads.reads) == list(range(11))


def test_joined_self_influence_is_never_returned_for_other_documents(setup, tmp_path):
    engine, train, _, _ = setup
    factors = engine.fit_factors(train, batch_size=4)
    pyinf.self_influence_corpus(engine, train, factors, tmp_path, chunk_size=4, log=lambda m: None)
    shutil.rmtree(tmp_path / "self_influence-chunks")
    other = RegressionDataset(11, seed=int(torch.randint(100, 10**6, ())), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"self_influence.safetensors holds the self_influence of another run "
                                         r"\(documents: "):
        pyinf.self_influence_corpus(engine, other, factors, tmp_path, chunk_size=4, log=lambda m: None)
    (tmp_path / "self_influence.safetensors").unlink()
    got = pyinf.self_influence_corpus(engine, other, factors, tmp_path, chunk_size=4, log=lambda m: None)
    torch.testing.assert_close(got, engine.self_influence(other, factors, batch_size=4), rtol=1e-10, atol=1e-12)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _hash(*items):
    return corpus.documents_hash(ListDataset(list(items)), 0, len(items))


def test_documents_hash_reads_every_byte():
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    long = rng.integers(0, 50_000, 1500)
    edited = long.copy()
    edited[700] += 1  # inside what numpy's repr leaves out ("[a, b, c, ..., x, y, z]")
    assert _hash({"input_ids": long}) != _hash({"input_ids": edited})
    assert _hash(long) == _hash(long.copy()) and _hash(long) != _hash(long.astype(np.int32))
    assert _hash(long.reshape(3, 500)) != _hash(long.reshape(500, 3))
    assert _hash(np.float32(1.5)) != _hash(np.float64(1.5))
    objects = np.array([long, edited[:3]], dtype=object)  # ragged: its bytes would be pointers
    assert _hash(objects) == _hash(np.array([long.copy(), edited[:3].copy()], dtype=object))
    assert _hash(objects) != _hash(np.array([edited, edited[:3]], dtype=object))
    # python values: where one ends is part of the hash
    assert _hash([12, 3]) != _hash([1, 23]) and _hash([[1], [2, 3]]) != _hash([[1, 2], [3]])
    assert _hash({"a": "b", "n": 1}) != _hash({"a": "b", "n": 1.0}) != _hash({"a": "b", "n": True})
    plain = {"text": "ünï", "raw": b"\x00", "n": 3, "f": 0.1, "ok": False, "none": None, "ids": (1, [2.5])}
    assert _hash(plain) == _hash(dict(plain)) and _hash(plain) != _hash(dict(plain, raw=b"\x01"))
    with pytest.raises(TypeError, match=r"cannot hash a document holding a .*\.Opaque"):
        _hash({"x": Opaque()})


class Opaque:
    pass


def test_a_dataloader_is_scored_as_its_dataset_with_its_collate(setup, tmp_path):
    """The engine takes a DataLoader; so does a corpus run: chunks are ranges of its dataset,
    each batched and collated as the loader would (here a collate the task needs)."""
    engine, _, queries, _ = setup
    data = RegressionDataset(7, seed=int(torch.randint(100, 10**6, ())), dtype=torch.float64)
    wrapped = ListDataset([{"xy": data[i]} for i in range(len(data))])

    def collate(items):  # the task reads (x, y); default_collate would give {"xy": [x, y]}
        return tuple(torch.stack([it["xy"][j] for it in items]) for j in (0, 1))

    loader = torch.utils.data.DataLoader(wrapped, batch_size=2, collate_fn=collate)
    want = engine.pairwise_scores(data, queries, batch_size=3)
    got = pyinf.score_corpus(engine, loader, queries, tmp_path, chunk_size=3, log=lambda m: None)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert _chunks(tmp_path) == ["0000000000-0000000003.safetensors", "0000000003-0000000006.safetensors",
                                 "0000000006-0000000007.safetensors"]
    factors = engine.fit_factors(data, batch_size=4)
    torch.testing.assert_close(
        pyinf.self_influence_corpus(engine, loader, factors, tmp_path, chunk_size=3, log=lambda m: None),
        engine.self_influence(data, factors, batch_size=3), rtol=1e-10, atol=1e-12)
    top, per_token = corpus.top_token_scores(engine, loader, queries, got, 2)
    for q, docs in enumerate(top):
        torch.testing.assert_close(per_token[q].sum(1), want[docs, q], rtol=1e-10, atol=1e-12)
    shuffled = torch.utils.data.DataLoader(wrapped, batch_size=2, collate_fn=collate, shuffle=True)
    with pytest.raises(ValueError, match="score_corpus indexes the documents.*or the Dataset itself"):
        pyinf.score_corpus(engine, shuffled, queries, tmp_path / "s", log=lambda m: None)


def test_token_scores_of_the_top_documents_only(setup):
    engine, train, queries, scores = setup
    reads = CountingDataset(train)
    top, per_token = corpus.top_token_scores(engine, reads, queries, scores, 2, batch_size=3)
    assert top == [scores[:, q].topk(2).indices.tolist() for q in range(3)]
    documents = sorted(set(sum(top, [])))
    assert sorted(reads.reads) == documents  # those, once each, nothing else
    assert per_token.shape == (3, 2, 1)  # [queries, k, T]: the MLP's "documents" are single rows
    for q in range(3):
        torch.testing.assert_close(per_token[q].sum(1), scores[top[q], q], rtol=1e-10, atol=1e-12)
    # the lowest, in passes of one document: the same values
    low, per_token = corpus.top_token_scores(engine, train, queries, scores, 3, lowest=True, batch_size=3)
    assert low == [scores[:, q].topk(3, largest=False).indices.tolist() for q in range(3)]
    by_one = corpus.token_scores_of(engine, train, queries, low, docs_per_pass=1)
    torch.testing.assert_close(by_one, per_token, rtol=0, atol=0)
    for q in range(3):
        torch.testing.assert_close(per_token[q].sum(1), scores[low[q], q], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="one list per query \\(3\\), all of one length"):
        corpus.token_scores_of(engine, train, queries, [[0], [1, 2], [3]])
    with pytest.raises(ValueError, match="docs_per_pass must be a positive integer, got 0"):
        corpus.token_scores_of(engine, train, queries, low, docs_per_pass=0)


def test_top_documents_order_ties_and_nan():
    scores = torch.randn(500, 4, dtype=torch.float64)
    assert corpus.top_documents(scores, 50) == [scores[:, q].argsort(descending=True)[:50].tolist() for q in range(4)]
    assert corpus.top_documents(scores, 7, lowest=True) == [scores[:, q].argsort()[:7].tolist() for q in range(4)]
    # ties in document order, NaN last (highest and lowest alike); k checked
    tied = torch.tensor([[0.0, 1.0], [float("nan"), 1.0], [0.0, 2.0], [0.0, float("nan")]])
    assert corpus.top_documents(tied, 3) == [[0, 2, 3], [2, 0, 1]]
    assert corpus.top_documents(tied, 4, lowest=True) == [[0, 2, 3, 1], [0, 1, 2, 3]]
    assert corpus.top_documents(tied, 9) == [[0, 2, 3, 1], [2, 0, 1, 3]]  # k capped at the documents
    assert corpus.top_documents(tied.half(), 3) == [[0, 2, 3], [2, 0, 1]]
    assert corpus.top_documents(tied, 0) == [[], []]
    # NaN after -inf too (and after +inf for the lowest)
    inf = float("inf")
    odd = torch.tensor([[1.0], [float("nan")], [-inf], [inf], [2.0], [float("nan")]])
    assert corpus.top_documents(odd, 6) == [[3, 4, 0, 2, 1, 5]]
    assert corpus.top_documents(odd, 6, lowest=True) == [[2, 0, 4, 3, 1, 5]]
    assert corpus.top_documents(odd, 5) == [[3, 4, 0, 2, 1]]
    # many ties at the k-th value: still k, in document order
    assert corpus.top_documents(torch.zeros(6, 1), 2) == [[0, 1]]
    with pytest.raises(ValueError, match="k must be a non-negative integer, got -1"):
        corpus.top_documents(tied, -1)
    with pytest.raises(ValueError, match="scores must be \\[documents, queries\\], got \\(4,\\)"):
        corpus.top_documents(tied[:, 0], 1)


def test_queries_fingerprint_follows_content(setup, tmp_path):
    _, _, queries, _ = setup
    queries.save(tmp_path / "q.safetensors")
    loaded = pyinf.Queries.load(tmp_path / "q.safetensors")
    assert loaded.fingerprint == queries.fingerprint
    assert loaded.to("cpu")._fingerprint == loaded.fingerprint  # moving keeps the content, and the hash
    name = loaded.module_names[0]
    loaded.tensors[name]["left"] = loaded.tensors[name]["left"].clone()
    loaded.tensors[name]["left"][0, 0, 0] += 1e-12
    loaded._fingerprint = None
    assert loaded.fingerprint != queries.fingerprint


# --------------------------------------------------------------------------- JSONL corpus


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_jsonl_documents_are_read_when_asked(tmp_path):
    path = _write(tmp_path / "c.jsonl", [json.dumps({"text": "first document"}), "",
                                          json.dumps({"prompt": "q? ", "completion": "yes"}),
                                          json.dumps({"text": "ünïcode ✓"})])
    ds = JsonlTextDataset(path, ByteTokenizer(300), max_length=8)
    assert len(ds) == 3 and ds.where(1) == f"{path}:3"
    assert ds[0]["input_ids"].tolist() == list(b"first do")
    assert ds[1]["labels"].tolist() == [-100, -100, -100] + list(b"yes")
    assert ds.text(2) == "ünïcode ✓" and ds[-1]["input_ids"].shape == (8,)
    with pytest.raises(IndexError, match="holds 3"):
        ds[3]
    # the offsets, not the texts, are what the dataset keeps; it travels to worker processes
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[2]["input_ids"], ds[2]["input_ids"])
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert [len(x["input_ids"]) for x in loader] == [8, 6, 8]


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "c.jsonl:2: not valid JSON"),
    ('{"oops": 1}', "c.jsonl:2: a record needs 'text'"),
    ('{"text": 5}', "c.jsonl:2: 'text' must be a string"),
    ('["text"]', "c.jsonl:2: a record needs 'text'"),
    ('{"text": ""}', "c.jsonl:2: 'text' is empty"),
    ('{"prompt": "2+2=", "completion": ""}', "c.jsonl:2: 'completion' is empty"),
    ('{"text": "a lone \\udc80 surrogate"}', "c.jsonl:2: 'text' is not valid Unicode"),
])
def test_a_bad_jsonl_line_is_named_before_any_compute(tmp_path, line, message):
    path = _write(tmp_path / "c.jsonl", [json.dumps({"text": "fine"}), line])
    with pytest.raises(ValueError, match=message):
        JsonlTextDataset(path, ByteTokenizer(300))


def test_an_empty_or_too_short_document_is_named(tmp_path):
    with pytest.raises(ValueError, match="holds no document"):
        JsonlTextDataset(_write(tmp_path / "e.jsonl", ["", "  "]), ByteTokenizer(300))
    # a query of one token carries no measurement: refused, naming its line
    ds = JsonlTextDataset(_write(tmp_path / "s.jsonl", [json.dumps({"text": "ok!"}), json.dumps({"text": "x"})]),
                          ByteTokenizer(300), queries=True)
    with pytest.raises(ValueError, match=r"s.jsonl:2: too short to carry a loss after tokenisation \(1 tokens\)"):
        ds[1]
    # nor does a query whose completion is cut away
    ds = JsonlTextDataset(_write(tmp_path / "q.jsonl", [json.dumps({"prompt": "abc", "completion": "d"})]),
                          ByteTokenizer(300), max_length=3)
    with pytest.raises(ValueError, match=r"q.jsonl:1: prompt \(3 tokens\) and completion \(1\) exceed max_length=3"):
        ds[0]


def test_a_one_token_document_scores_zero(tmp_path):
    """A training document of one token predicts nothing: its influence is exactly 0, and it
    is scored as such with a warning naming its line (an error stopped a corpus run at the
    same chunk on every rerun); the other documents' scores are unchanged."""
    from tests.models import tiny_gpt2

    texts = ["the cat sat", "x", "two plus three", "y", "paris"]
    ds = JsonlTextDataset(_write(tmp_path / "s.jsonl", [json.dumps({"text": t}) for t in texts]), ByteTokenizer(300))
    with pytest.warns(UserWarning, match=r"s.jsonl:2 is one token after tokenisation: it predicts nothing"):
        item = ds[1]
    assert item["input_ids"].tolist() == [ord("x")] and item["labels"].tolist() == [-100]
    kept = JsonlTextDataset(_write(tmp_path / "k.jsonl", [json.dumps({"text": t}) for t in texts[::2]]),
                            ByteTokenizer(300))
    queries_ds = JsonlTextDataset(_write(tmp_path / "q.jsonl", [json.dumps({"prompt": "where? ", "completion": "paris"})]),
                                  ByteTokenizer(300))
    model = tiny_gpt2(seed=3, dtype=torch.float64, vocab=300)
    engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False)
    with pytest.warns(UserWarning, match="one token after tokenisation"):
        factors = engine.fit_factors(ds, fisher="empirical", batch_size=2)
        queries = engine.prepare_queries(queries_ds, factors, rank=2)
        scores = engine.pairwise_scores(ds, queries, batch_size=2)
    assert scores[1].tolist() == [0.0] and scores[3].tolist() == [0.0]
    torch.testing.assert_close(scores[::2], engine.pairwise_scores(kept, queries, batch_size=2), rtol=1e-5, atol=1e-9)
    # each named once (however many passes read it), the first ten
    warned = JsonlTextDataset(_write(tmp_path / "m.jsonl", [json.dumps({"text": "z"})] * 12), ByteTokenizer(300))
    with pytest.warns(UserWarning) as record:
        for i in [0, 0, 1, 0, *range(12), *range(12)]:
            warned[i]
    assert [str(r.message).split(" is one token")[0].rsplit(":", 1)[1] for r in record] == [str(n) for n in
                                                                                            range(1, 11)]
    assert "further ones are not named" in str(record[-1].message)


def test_documents_hash_takes_mappings_and_sequences():
    """Tokenizer outputs (Hugging Face's BatchEncoding is a UserDict, not a dict) and tuples
    hash like the dicts and lists they stand for, every value counted."""
    from collections import UserDict

    doc = {"input_ids": [5, 6, 7], "attention_mask": (1, 1, 1)}
    assert _hash(UserDict(doc)) == _hash(doc)
    assert _hash(UserDict(doc)) != _hash(UserDict(dict(doc, input_ids=[5, 6, 8])))
    assert _hash({"input_ids": (5, 6)}) == _hash({"input_ids": [5, 6]}) != _hash({"input_ids": [5, 6, 0]})


def test_lists_of_numbers_hash_as_element_by_element(monkeypatch):
    """Token lists take a fast path (one join); it hashes the very bytes of the general path,
    so chunks saved before it still belong to their run, and lists that differ in any value or
    type (True against 1, 1.0 against 1, -0.0 against 0.0) still hash apart."""
    rng = random.Random(seeds.offset(31))
    docs = [[rng.randrange(-2**40, 2**40) for _ in range(rng.randrange(1, 300))],
            [1.5, float("nan"), float("inf"), -0.0, 2, 10**30], [True, 1, 0], [[1, 2], [3]], [], (4, 5.0)]
    fast = [_hash(d) for d in docs]
    monkeypatch.setattr(corpus, "_PLAIN_NUMBERS", frozenset())  # the element-by-element path only
    assert [_hash(d) for d in docs] == fast
    monkeypatch.undo()
    assert len({_hash([1, 0]), _hash([True, 0]), _hash([1.0, 0]), _hash([1, 0.0]), _hash([1, -0.0])}) == 5
    assert _hash([12, 3]) != _hash([1, 23])
