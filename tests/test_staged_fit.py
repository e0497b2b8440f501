"""The factor fit in saved stages (pyinf.staged_fit): one shard is bit for bit the plain
fit, a crash in the second pass resumes without repeating the first, shards (one after
another, or at once in threads) give the plain fit's factors, and files of another fit are
refused."""
import copy
import shutil
import threading

import pytest
import torch

import pyinf
from pyinf.factors import _FIELDS
from tests import seeds
from tests.files import flip_tensor_byte
from tests.models import MLPTask, RegressionDataset, TinyMLP


class CountingDataset(torch.utils.data.Dataset):
    """Counts reads; raises while `fail` is set (a crash in the middle of a pass)."""

    def __init__(self, base):
        self.base, self.reads, self.fail_at = base, 0, None

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError(f"simulated crash at document {i}")
        self.reads += 1
        return self.base[i]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(seeds.offset(0))
    model = TinyMLP().double()
    engine = pyinf.InfluenceEngine(model, MLPTask(), progress=False)
    return engine, RegressionDataset(13, seed=1, dtype=torch.float64)


def _quiet(msg):
    pass


def _assert_same_factors(got, want, exact):
    assert got.module_names == want.module_names
    for name in want.module_names:
        for field in _FIELDS:
            a, b = getattr(got[name], field), getattr(want[name], field)
            if exact:
                assert torch.equal(a, b), (name, field)
            else:  # sums in another order: float64 rounding, and eigenvectors up to their sign
                if field in ("q_a", "q_s"):
                    a, b = a.abs(), b.abs()
                torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_one_shard_is_the_plain_fit_bit_for_bit(setup, tmp_path, fisher):
    engine, train = setup
    want = engine.fit_factors(train, fisher=fisher, batch_size=4, seed=3)
    got = pyinf.fit_factors_staged(engine, train, tmp_path / "parts", fisher=fisher, batch_size=4, seed=3, log=_quiet)
    _assert_same_factors(got, want, exact=True)
    assert got.meta["n_examples"] == 13 and got.meta["n_tokens"] == want.meta["n_tokens"]
    assert got.id != want.id and not (tmp_path / "parts").exists()  # work files removed


def test_a_crash_in_the_second_pass_resumes_there(setup, tmp_path):
    engine, train = setup
    first_pass_crash = CountingDataset(train)
    first_pass_crash.fail_at = 9
    with pytest.raises(RuntimeError, match="simulated crash"):
        pyinf.fit_factors_staged(engine, first_pass_crash, tmp_path, fisher="empirical", batch_size=4, log=_quiet)
    assert not any(tmp_path.iterdir())  # nothing half-done is saved

    class CrashInSecondPass(CountingDataset):
        def __getitem__(self, i):
            if i == 0:
                self.passes = getattr(self, "passes", 0) + 1
            if getattr(self, "passes", 0) == 3 and i == 9:  # 1: the hash, 2: covariances, 3: Lambda
                raise RuntimeError("simulated crash in the Lambda pass")
            return super().__getitem__(i)

    with pytest.raises(RuntimeError, match="Lambda pass"):
        pyinf.fit_factors_staged(engine, CrashInSecondPass(train), tmp_path, fisher="empirical", batch_size=4,
                                 log=_quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["covariance-0-of-1.safetensors", "eigen.safetensors"]
    resumed = CountingDataset(train)
    log = []
    got = pyinf.fit_factors_staged(engine, resumed, tmp_path, fisher="empirical", batch_size=4, log=log.append)
    assert resumed.reads == 2 * 13  # the hash and the Lambda pass: the covariance pass is not repeated
    assert not any("covariance sums" in line for line in log)
    assert any("eigenvalue-correction sums" in line for line in log)
    _assert_same_factors(got, engine.fit_factors(train, fisher="empirical", batch_size=4), exact=True)


def test_shards_one_after_another_give_the_plain_fit(setup, tmp_path):
    engine, train = setup
    want = engine.fit_factors(train, fisher="empirical", batch_size=4)
    log = []
    kw = dict(fisher="empirical", batch_size=4, wait=False, log=log.append)
    assert pyinf.fit_factors_staged(engine, train, tmp_path, shard=(2, 3), **kw) is None
    assert "waits for the other shards' covariance sums" in log[-1]
    assert pyinf.fit_factors_staged(engine, train, tmp_path, shard=(1, 3), **kw) is None
    assert pyinf.fit_factors_staged(engine, train, tmp_path, shard=(0, 3), **kw) is None  # decomposes, Lambda 0
    assert "eigenvalue-correction sums" in log[-1]
    assert pyinf.fit_factors_staged(engine, train, tmp_path, shard=(2, 3), **kw) is None
    assert "shard 2/3 done" in log[-1]
    assert pyinf.fit_factors_staged(engine, train, tmp_path, shard=(1, 3), **kw) is None
    got = pyinf.fit_factors_staged(engine, train, tmp_path, shard=(0, 3), **kw)
    assert got.meta["shards"] == 3 and got.meta["n_examples"] == 13
    _assert_same_factors(got, want, exact=False)


def test_shards_at_once_wait_for_each_other(setup, tmp_path):
    engine, train = setup
    want = engine.fit_factors(train, fisher="empirical", batch_size=4)
    results, errors = {}, []

    def shard(k):
        try:  # one engine per thread: each installs its own hooks on its own model copy
            own = pyinf.InfluenceEngine(copy.deepcopy(engine.model), MLPTask(), progress=False)
            results[k] = pyinf.fit_factors_staged(own, train, tmp_path, shard=(k, 2), fisher="empirical",
                                                  batch_size=4, poll_seconds=0.02, timeout=120, log=_quiet)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=shard, args=(k,)) for k in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors and results[1] is None
    _assert_same_factors(results[0], want, exact=False)
    assert torch.backends.mha.get_fastpath_enabled()  # back on after the overlapping passes


def test_files_of_another_fit_are_refused(setup, tmp_path):
    engine, train = setup
    kw = dict(batch_size=4, wait=False, log=_quiet)
    pyinf.fit_factors_staged(engine, train, tmp_path, shard=(1, 2), fisher="empirical", **kw)
    with pytest.raises(ValueError, match=r"belongs to another run \(fisher: 'empirical' there, 'true' now"):
        pyinf.fit_factors_staged(engine, train, tmp_path, shard=(1, 2), fisher="true", **kw)
    changed = RegressionDataset(13, seed=1, dtype=torch.float64)
    changed.y[12] += 1.0  # in shard 1's documents (6..12)
    with pytest.raises(ValueError, match="documents: "):
        pyinf.fit_factors_staged(engine, changed, tmp_path, shard=(1, 2), fisher="empirical", **kw)
    with pytest.raises(ValueError, match="holds none"):
        pyinf.fit_factors_staged(engine, RegressionDataset(2), tmp_path / "x", shard=(0, 3), **kw)
    with pytest.raises(ValueError, match="shard 2/2"):
        pyinf.fit_factors_staged(engine, train, tmp_path, shard=(2, 2), **kw)
    with pytest.raises(TimeoutError, match="covariance sums still missing"):
        pyinf.fit_factors_staged(engine, train, tmp_path, shard=(1, 2), fisher="empirical", batch_size=4,
                                 timeout=0.05, poll_seconds=0.01, log=_quiet)


def test_a_failed_save_keeps_the_work_files(setup, tmp_path):
    """`save` runs before the work files are removed: when it fails (here: the factors'
    directory is a file), the stages stay on disk and the rerun only assembles and saves."""
    engine, train = setup
    parts = tmp_path / "parts"
    (tmp_path / "notadir").write_text("a file, not a directory")

    def bad_save(factors):
        factors.save(tmp_path / "notadir" / "factors.safetensors")

    with pytest.raises((OSError, ValueError)):
        pyinf.fit_factors_staged(engine, train, parts, fisher="empirical", batch_size=4, log=_quiet, save=bad_save)
    assert sorted(p.name for p in parts.iterdir()) == ["covariance-0-of-1.safetensors", "eigen.safetensors",
                                                       "lambda-0-of-1.safetensors"]
    resumed, saved = CountingDataset(train), []
    got = pyinf.fit_factors_staged(engine, resumed, parts, fisher="empirical", batch_size=4, log=_quiet,
                                   save=lambda f: saved.append(f.save(tmp_path / "factors.safetensors")))
    assert resumed.reads == 13  # the documents' hash only: no pass is repeated
    assert not parts.exists() and saved and pyinf.Factors.load(saved[0]).id == got.id


def test_a_shard_fitted_on_other_documents_is_refused(setup, tmp_path):
    """Shard 1 ran on another corpus of the same size: shard 0, summing every shard's files,
    refuses them by their documents' hash (covariance sums, and Lambda sums), never adds them in."""
    engine, train = setup
    other = RegressionDataset(13, seed=1, dtype=torch.float64)
    other.y[10] += 1.0  # one of shard 1's documents (6..12)
    kw = dict(fisher="empirical", batch_size=4, wait=False, log=_quiet)
    pyinf.fit_factors_staged(engine, other, tmp_path / "a", shard=(1, 2), **kw)
    with pytest.raises(ValueError, match=r"covariance-1-of-2.safetensors belongs to another run \(documents: "):
        pyinf.fit_factors_staged(engine, train, tmp_path / "a", shard=(0, 2), **kw)
    # the same in the second pass: shard 1's covariance sums were right, its Lambda sums are not
    pyinf.fit_factors_staged(engine, train, tmp_path / "b", shard=(1, 2), **kw)
    assert pyinf.fit_factors_staged(engine, train, tmp_path / "b", shard=(0, 2), **kw) is None  # decomposes
    # Lambda sums of the other corpus's shard 1 against this run's eigenbases
    assert pyinf.fit_factors_staged(engine, other, tmp_path / "b2", shard=(1, 2), **kw) is None
    for name in ("covariance-0-of-2.safetensors", "eigen.safetensors"):  # shard 0's documents are the same
        shutil.copy(tmp_path / "b" / name, tmp_path / "b2")
    assert pyinf.fit_factors_staged(engine, other, tmp_path / "b2", shard=(1, 2), **kw) is None
    shutil.copy(tmp_path / "b2" / "lambda-1-of-2.safetensors", tmp_path / "b")
    with pytest.raises(ValueError, match=r"lambda-1-of-2.safetensors belongs to another run \(documents: "):
        pyinf.fit_factors_staged(engine, train, tmp_path / "b", shard=(0, 2), **kw)


def _fit_until_the_save_fails(engine, train, work_dir):
    """A one-shard fit whose save of the factors fails: every stage file stays in ``work_dir``."""
    def bad_save(factors):
        raise OSError("disk full")

    with pytest.raises(OSError):
        pyinf.fit_factors_staged(engine, train, work_dir, fisher="empirical", batch_size=4, log=_quiet,
                                 save=bad_save)


def test_damaged_eigenbases_are_decomposed_again_and_keep_the_lambda_sums(setup, tmp_path):
    """The eigenbases' id follows the covariance sums: decomposed again after damage, they
    have the same id, so the Lambda sums already saved still count (no pass is repeated).
    The work directory goes at the end, with what a killed save left in it."""
    engine, train = setup
    _fit_until_the_save_fails(engine, train, tmp_path)
    eigen = tmp_path / "eigen.safetensors"
    raw = bytearray(eigen.read_bytes())
    raw[-20] ^= 0xFF  # a flipped byte in the tensors
    eigen.write_bytes(bytes(raw))
    (tmp_path / ".eigen.safetensors.k1ll3d.tmp").write_bytes(b"left by a process killed while saving")
    resumed, log = CountingDataset(train), []
    got = pyinf.fit_factors_staged(engine, resumed, tmp_path, fisher="empirical", batch_size=4, log=log.append)
    assert not tmp_path.exists()  # the stray temporary file went with the work files
    assert any("computing that stage again" in line for line in log)
    assert not any("eigenvalue-correction sums of" in line for line in log) and resumed.reads == 13
    _assert_same_factors(got, engine.fit_factors(train, fisher="empirical", batch_size=4), exact=True)


@pytest.mark.parametrize("stage", ["covariance-0-of-1", "lambda-0-of-1"])
def test_a_damaged_sum_is_computed_again_and_a_whole_one_kept(setup, tmp_path, stage):
    """A shard's saved sums count as done only when every tensor passes its checksum (read one
    at a time); a damaged file is computed again, a whole one is not."""
    engine, train = setup
    _fit_until_the_save_fails(engine, train, tmp_path)
    path = tmp_path / f"{stage}.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 0xFF  # a flipped byte in the tensors, not the header
    path.write_bytes(bytes(raw))
    resumed, log = CountingDataset(train), []
    got = pyinf.fit_factors_staged(engine, resumed, tmp_path, fisher="empirical", batch_size=4, log=log.append)
    assert any(f"{stage}.safetensors: tensor" in line and "computing that stage again" in line for line in log)
    # only the damaged stage's pass ran again (the same sums: the later stages still count)
    redone = "covariance sums of" if stage.startswith("covariance") else "eigenvalue-correction sums of"
    kept = "eigenvalue-correction sums of" if stage.startswith("covariance") else "covariance sums of"
    assert any(redone in line for line in log) and not any(kept in line for line in log)
    _assert_same_factors(got, engine.fit_factors(train, fisher="empirical", batch_size=4), exact=True)


@pytest.mark.parametrize("damaged", ["covariance-1-of-2", "lambda-1-of-2", "eigen"])
def test_a_damaged_file_of_another_shard_is_removed_for_its_owner_to_redo(setup, tmp_path, damaged):
    """Shards wait only for files to be there: a damaged file of another shard, kept, would stop
    the reading shard at the same place on every rerun (torchrun stops them all). It is removed,
    the error says so, and the shards run again give the plain fit; the other shards read only
    the eigenbases of the eigen file."""
    engine, train = setup
    want = engine.fit_factors(train, fisher="empirical", batch_size=4)
    kw = dict(fisher="empirical", batch_size=4, wait=False, log=_quiet)
    assert pyinf.fit_factors_staged(engine, train, tmp_path, shard=(1, 2), **kw) is None  # its covariance sums
    if damaged == "covariance-1-of-2":
        flip_tensor_byte(tmp_path / f"{damaged}.safetensors", "fc2::s_sum")
        reader = 0
    else:
        assert pyinf.fit_factors_staged(engine, train, tmp_path, shard=(0, 2), **kw) is None  # eigen, Lambda 0
        assert pyinf.fit_factors_staged(engine, train, tmp_path, shard=(1, 2), **kw) is None  # Lambda 1
        reader = 1 if damaged == "eigen" else 0
        if damaged == "eigen":
            # the other shards read only the eigenbases: damage elsewhere is not theirs to judge
            flip_tensor_byte(tmp_path / "eigen.safetensors", "fc2::a_cov")
            (tmp_path / "lambda-1-of-2.safetensors").unlink()  # (shard 1 reads the file again only then)
            assert pyinf.fit_factors_staged(engine, train, tmp_path, shard=(1, 2), **kw) is None
            (tmp_path / "lambda-1-of-2.safetensors").unlink()
            flip_tensor_byte(tmp_path / "eigen.safetensors", "fc2::a_cov")  # flipped back
        flip_tensor_byte(tmp_path / f"{damaged}.safetensors", "fc2::q_a" if damaged == "eigen" else "fc2::sum")
    with pytest.raises(pyinf.storage.CorruptFileError, match=rf"{damaged}.safetensors.*removed it: run the shards "
                                                               rf"again \(shard {1 if reader == 0 else 0}/2 computes"):
        pyinf.fit_factors_staged(engine, train, tmp_path, shard=(reader, 2), **kw)
    assert not (tmp_path / f"{damaged}.safetensors").exists()
    got = None
    for _ in range(3):  # the shards run again, in any order, until shard 0 writes the factors
        for k in (1, 0):
            got = pyinf.fit_factors_staged(engine, train, tmp_path, shard=(k, 2), **kw) or got
    _assert_same_factors(got, want, exact=False)
