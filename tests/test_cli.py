"""The CLI on user inputs: a transformers config with random weights (byte tokens) and
JSONL files, fit then score, outputs checked against the Python API."""
import json

import pytest
import torch

import pyinf
from pyinf.cli import main


@pytest.fixture
def workdir(tmp_path):
    cfg = dict(model_type="gpt2", n_embd=16, n_layer=1, n_head=2, vocab_size=260, n_positions=64,
               bos_token_id=0, eos_token_id=0)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(cfg))
    train = ["the cat sat on the mat", "two plus three is five", "paris is in france", "x = 3 * 4 + 1"]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in train) + "\n")
    queries = [{"prompt": "where is paris? ", "completion": "france"}, {"prompt": "2+3=", "completion": "5"}]
    (tmp_path / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries))
    return tmp_path


def test_fit_then_score(workdir, capsys):
    common = ["--model", str(workdir / "model"), "--batch-size", "2", "--no-progress", "--track", "mlp"]
    assert main(["fit", *common, "--train", str(workdir / "train.jsonl"), "--out", str(workdir / "f.safetensors"),
                 "--fisher", "empirical", "--eigh-workers", "2"]) == 0
    factors = pyinf.Factors.load(workdir / "f.safetensors")
    assert factors.meta["eigh_workers"] == 2
    assert factors.module_names == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert main(["score", *common, "--factors", str(workdir / "f.safetensors"), "--train",
                 str(workdir / "train.jsonl"), "--queries", str(workdir / "queries.jsonl"), "--out",
                 str(workdir / "out"), "--rank", "4", "--top-k", "3", "--per-token"]) == 0
    tensors, meta = pyinf.storage.load(workdir / "out" / "scores.safetensors", "scores")
    assert tensors["scores"].shape == (4, 2) and torch.isfinite(tensors["scores"]).all()
    assert torch.allclose(tensors["per_token"].sum(1), tensors["scores"], rtol=1e-4, atol=1e-6)
    top = json.loads((workdir / "out" / "top.json").read_text())
    assert [t["query"] for t in top] == ["where is paris? france", "2+3=5"]
    for entry, q in zip(top, range(2)):
        scores = [row["score"] for row in entry["top"]]
        assert scores == sorted(scores, reverse=True)
        assert scores[0] == pytest.approx(float(tensors["scores"][:, q].max()), rel=1e-6)
    assert "query: 'where is paris? france'" in capsys.readouterr().out
    # the fused LM head gives the same scores
    assert main(["score", *common, "--fused-head", "--factors", str(workdir / "f.safetensors"), "--train",
                 str(workdir / "train.jsonl"), "--queries", str(workdir / "queries.jsonl"), "--out",
                 str(workdir / "fused"), "--rank", "4"]) == 0
    fused, _ = pyinf.storage.load(workdir / "fused" / "scores.safetensors", "scores")
    assert torch.allclose(fused["scores"], tensors["scores"], rtol=1e-4, atol=1e-6)
    # and so does activation checkpointing of the blocks
    assert main(["score", *common, "--checkpoint", "--factors", str(workdir / "f.safetensors"), "--train",
                 str(workdir / "train.jsonl"), "--queries", str(workdir / "queries.jsonl"), "--out",
                 str(workdir / "ckpt"), "--rank", "4"]) == 0
    ckpt, _ = pyinf.storage.load(workdir / "ckpt" / "scores.safetensors", "scores")
    assert torch.allclose(ckpt["scores"], tensors["scores"], rtol=1e-4, atol=1e-6)


def test_bad_inputs_are_named(workdir):
    (workdir / "bad.jsonl").write_text('{"text": "fine"}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: a record needs 'text'"):
        main(["fit", "--model", str(workdir / "model"), "--train", str(workdir / "bad.jsonl"),
              "--out", str(workdir / "f.safetensors"), "--no-progress"])
    assert not (workdir / "f.safetensors").exists()
    with pytest.raises(SystemExit, match="matches no trackable module"):
        main(["fit", "--model", str(workdir / "model"), "--train", str(workdir / "train.jsonl"),
              "--out", str(workdir / "f.safetensors"), "--track", "nothing-like-this", "--no-progress"])


def test_backends_lists_every_backend(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("torch", "triton", "native"))
