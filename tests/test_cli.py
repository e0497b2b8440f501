"""The CLI on user inputs: a transformers config with random weights (byte tokens) and
JSONL files, fit then score, outputs checked against the Python API."""
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

import pyinf
from pyinf.cli import EXIT_RUN_AGAIN, main, run


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
    assert run(["fit", *common, "--train", str(workdir / "train.jsonl"), "--out", str(workdir / "f.safetensors"),
                "--fisher", "empirical", "--eigh-workers", "2"]) == 0
    factors = pyinf.Factors.load(workdir / "f.safetensors")
    assert factors.meta["eigh_workers"] == 2
    assert factors.module_names == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    # a blank line (documents count non-blank lines) and ids on some records: top.json names both
    texts = [json.loads(line)["text"] for line in (workdir / "train.jsonl").read_text().splitlines()]
    records = [dict(text=t, **({"doc_id": f"d{i}"} if i % 2 else {})) for i, t in enumerate(texts)]
    (workdir / "train.jsonl").write_text(json.dumps(records[0]) + "\n\n" + "".join(json.dumps(r) + "\n"
                                                                                    for r in records[1:]))
    assert run(["score", *common, "--factors", str(workdir / "f.safetensors"), "--train",
                str(workdir / "train.jsonl"), "--queries", str(workdir / "queries.jsonl"), "--out",
                str(workdir / "out"), "--rank", "4", "--top-k", "3", "--bottom-k", "2", "--per-token",
                "--id-key", "doc_id"]) == 0
    tensors, meta = pyinf.storage.load(workdir / "out" / "scores.safetensors", "scores")
    assert tensors["scores"].shape == (4, 2) and torch.isfinite(tensors["scores"]).all()
    top = json.loads((workdir / "out" / "top.json").read_text())
    assert [t["query"] for t in top] == ["where is paris? france", "2+3=5"]
    for entry, q in zip(top, range(2)):
        column = tensors["scores"][:, q]
        assert [row["index"] for row in entry["top"]] == column.topk(3).indices.tolist()
        assert [row["index"] for row in entry["bottom"]] == column.topk(2, largest=False).indices.tolist()
        assert [row["score"] for row in entry["top"]] == pytest.approx(column.topk(3).values.tolist(), rel=1e-6)
        for row in entry["top"] + entry["bottom"]:
            n = row["index"]
            assert row["line"] == (1 if n == 0 else n + 2) and row["text"] == texts[n]
            assert row.get("id") == (f"d{n}" if n % 2 else None)
    # per-token scores of the listed documents only, each for its own query: they sum to the
    # documents' scores, and top.json names each one's most influential tokens (shown on the
    # token they predict; the most negative for the bottom documents)
    tokens, _ = pyinf.storage.load(workdir / "out" / "tokens.safetensors", "query-token-scores")
    for side, k in (("top", 3), ("bottom", 2)):
        docs, per_token = tokens[f"{side}_documents"], tokens[f"{side}_per_token"]
        assert docs.tolist() == [[row["index"] for row in entry[side]] for entry in top]
        assert per_token.shape[:2] == (2, k)
        for q in range(2):
            assert torch.allclose(per_token[q].sum(1), tensors["scores"][docs[q], q], rtol=1e-4, atol=1e-6)
    row = top[0]["top"][0]
    per_token = tokens["top_per_token"][0, 0]
    best = row["tokens"][0]
    assert best["score"] == pytest.approx(float(per_token.max()), rel=1e-6) and best["score"] > 0
    assert best["token"] == row["text"][best["position"]]  # byte tokens: position = character
    assert float(per_token[best["position"] - 1]) == pytest.approx(best["score"], rel=1e-6)
    worst = top[0]["bottom"][0]["tokens"][0]
    assert worst["score"] == pytest.approx(float(tokens["bottom_per_token"][0, 0].min()), rel=1e-6)
    assert worst["score"] < 0
    assert "query: 'where is paris? france'" in capsys.readouterr().out
    # a run killed while saving top.json left its temporary; the next run removes it once it
    # is old (not other programs' temporaries)
    import time

    stale, foreign = workdir / "out" / ".top.json.k1.tmp", workdir / "out" / ".mine.txt.k2.tmp"
    for path in (stale, foreign):
        path.write_text("half")
        os.utime(path, (time.time() - 3600,) * 2)
    # rerun without --per-token: the finished scores are reused, and the old token scores,
    # which this top.json no longer names, are gone
    assert run(["score", *common, "--factors", str(workdir / "f.safetensors"), "--train",
                str(workdir / "train.jsonl"), "--queries", str(workdir / "queries.jsonl"), "--out",
                str(workdir / "out"), "--rank", "4", "--top-k", "3"]) == 0
    assert not (workdir / "out" / "tokens.safetensors").exists()
    assert not stale.exists() and foreign.exists()
    assert "tokens" not in json.loads((workdir / "out" / "top.json").read_text())[0]["top"][0]
    # the fused LM head gives the same scores
    assert run(["score", *common, "--fused-head", "--factors", str(workdir / "f.safetensors"), "--train",
                str(workdir / "train.jsonl"), "--queries", str(workdir / "queries.jsonl"), "--out",
                str(workdir / "fused"), "--rank", "4"]) == 0
    fused, _ = pyinf.storage.load(workdir / "fused" / "scores.safetensors", "scores")
    assert torch.allclose(fused["scores"], tensors["scores"], rtol=1e-4, atol=1e-6)
    # and so does activation checkpointing of the blocks
    assert run(["score", *common, "--checkpoint", "--factors", str(workdir / "f.safetensors"), "--train",
                str(workdir / "train.jsonl"), "--queries", str(workdir / "queries.jsonl"), "--out",
                str(workdir / "ckpt"), "--rank", "4"]) == 0
    ckpt, _ = pyinf.storage.load(workdir / "ckpt" / "scores.safetensors", "scores")
    assert torch.allclose(ckpt["scores"], tensors["scores"], rtol=1e-4, atol=1e-6)


def test_bad_inputs_are_named(workdir):
    (workdir / "bad.jsonl").write_text('{"text": "fine"}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: a record needs 'text'"):
        run(["fit", "--model", str(workdir / "model"), "--train", str(workdir / "bad.jsonl"),
             "--out", str(workdir / "f.safetensors"), "--no-progress"])
    assert not (workdir / "f.safetensors").exists()
    with pytest.raises(ValueError, match="matches no trackable module"):
        run(["fit", "--model", str(workdir / "model"), "--train", str(workdir / "train.jsonl"),
             "--out", str(workdir / "f.safetensors"), "--track", "nothing-like-this", "--no-progress"])


def test_weights_in_another_format_are_refused_not_replaced_by_random_ones(workdir):
    """A model directory whose weights from_pretrained cannot read here (TensorFlow's) was
    taken as config-only and scored with random weights."""
    from pyinf.textdata import load_model

    (workdir / "model" / "tf_model.h5").write_bytes(b"\x89HDF\r\n")
    with pytest.raises(ValueError, match=r"holds weights pyinf cannot load \(tf_model.h5\)"):
        load_model(str(workdir / "model"))
    model, _ = load_model(str(workdir / "model" / "config.json"), seed=1)  # the config alone: random weights
    assert model.config.n_embd == 16


def test_a_tokenizer_added_since_is_another_run(workdir):
    """The runs record the tokenizer: a model directory given one after a run (same weights,
    other token ids) was continued with the old queries and chunks (scores off by up to 200)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    common = ["--model", str(workdir / "model"), "--batch-size", "2", "--no-progress", "--track", "mlp"]
    factors = str(workdir / "f.safetensors")
    assert run(["fit", *common, "--train", str(workdir / "train.jsonl"), "--out", factors, "--fisher",
                "empirical"]) == 0
    score = ["score", *common, "--factors", factors, "--train", str(workdir / "train.jsonl"), "--queries",
             str(workdir / "queries.jsonl"), "--rank", "2", "--out", str(workdir / "out")]
    self_inf = ["self-influence", *common, "--factors", factors, "--train", str(workdir / "train.jsonl"),
                "--out", str(workdir / "si")]
    assert run(score) == 0 and run(self_inf) == 0
    words = {w: i for i, w in enumerate(["[UNK]", "the", "cat", "is", "paris", "france", "5"])}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[UNK]").save_pretrained(workdir / "model")
    with pytest.raises(ValueError, match=r"holds scores of other queries \(tokenizer: '[0-9a-f]+' there"):
        run(score)
    with pytest.raises(ValueError, match=r"self_influence.safetensors holds the self_influence of another run "
                                         r"\(tokenizer: '[0-9a-f]+' there"):
        run(self_inf)


def test_the_command_says_what_is_wrong_in_one_line(workdir, capsys, monkeypatch):
    """`pyinf` (main) prints a user's mistake as one line and exits 1; PYINF_TRACEBACK=1 raises."""
    (workdir / "bad.jsonl").write_text('{"text": "fine"}\n{"oops": 1}\n')
    bad = ["fit", "--model", str(workdir / "model"), "--train", str(workdir / "bad.jsonl"),
           "--out", str(workdir / "f.safetensors"), "--no-progress"]
    assert main(bad) == 1
    err = capsys.readouterr().err
    assert "pyinf: error: " in err and "bad.jsonl:2: a record needs 'text'" in err and "Traceback" not in err
    assert main(["info", str(workdir / "nothing-here.safetensors")]) == 1
    assert "pyinf: error: " in capsys.readouterr().err
    assert main(["fit", *bad[1:3], "--train", str(workdir / "train.jsonl"), "--out", str(workdir / "g.safetensors"),
                 "--track", "(", "--no-progress"]) == 1
    with monkeypatch.context() as m:  # no transformers (pip install without the [hf] extra)
        m.setitem(sys.modules, "transformers", None)
        assert main(["fit", *bad[1:3], "--train", str(workdir / "train.jsonl"), "--out",
                     str(workdir / "g.safetensors"), "--no-progress"]) == 1
    assert "needs Hugging Face transformers" in capsys.readouterr().err
    import warnings

    shown = []

    def command(args):  # how the command's warnings are shown: one line, without Python's source line
        shown.append(warnings.formatwarning("pyinf: something to know", UserWarning, "engine.py", 12))
        return 0

    python_format = warnings.formatwarning
    with monkeypatch.context() as m:
        m.setattr("pyinf.cli.cmd_backends", command)
        assert main(["backends"]) == 0
    assert shown == ["pyinf: warning: something to know\n"] and warnings.formatwarning is python_format

    def interrupted(args):  # Ctrl-C: a line, not a traceback, and the shell's status for SIGINT
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("pyinf.cli.cmd_backends", interrupted)
        assert main(["backends"]) == 130
    err = capsys.readouterr().err
    assert "pyinf: interrupted; rerun the same command" in err and "Traceback" not in err

    def preempted(args):  # SIGTERM (Slurm's preemption) while a file is being saved
        import signal
        import time

        with pyinf.storage.atomic_path(workdir / "big.safetensors") as tmp:
            Path(tmp).write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode
        raise AssertionError("SIGTERM did not stop the command")

    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        m.setattr("pyinf.cli.cmd_backends", preempted)
        assert main(["backends"]) == 143
    assert "pyinf: terminated (SIGTERM); rerun the same command" in capsys.readouterr().err
    assert list(workdir.glob(".big.safetensors.*")) == [] and not (workdir / "big.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # put back
    monkeypatch.setenv("PYINF_TRACEBACK", "1")
    with pytest.raises(ValueError, match="a record needs 'text'"):
        main(bad)


def test_later_commands_track_the_factors_layers(workdir):
    """Factors fitted on --track's layers: prepare, score and self-influence track those same
    layers without being told again."""
    common = ["--model", str(workdir / "model"), "--batch-size", "2", "--no-progress"]
    factors = str(workdir / "f.safetensors")
    assert run(["fit", *common, "--track", "mlp", "--train", str(workdir / "train.jsonl"), "--out", factors,
                "--fisher", "empirical"]) == 0
    assert run(["self-influence", *common, "--factors", factors, "--train", str(workdir / "train.jsonl"),
                "--out", str(workdir / "si")]) == 0
    assert run(["prepare", *common, "--factors", factors, "--queries", str(workdir / "queries.jsonl"),
                "--out", str(workdir / "q.safetensors"), "--rank", "2"]) == 0
    assert sorted(pyinf.Queries.load(workdir / "q.safetensors").module_names) == sorted(
        pyinf.Factors.load(factors).module_names)
    # run again (a script resumed after a crash): the saved queries stay, bit for bit (chunks
    # scored against them record their fingerprint); other settings replace them
    saved = (workdir / "q.safetensors").read_bytes()
    prepare = ["prepare", *common, "--factors", factors, "--queries", str(workdir / "queries.jsonl"),
               "--out", str(workdir / "q.safetensors")]
    assert run([*prepare, "--rank", "2"]) == 0
    assert (workdir / "q.safetensors").read_bytes() == saved
    assert run([*prepare, "--rank", "3"]) == 0
    assert pyinf.Queries.load(workdir / "q.safetensors").rank == 3
    # --track picks a subset of the fitted layers (EK-FAC's factors are per layer); a
    # self-influence directory then holds the values of one set of layers only
    one = sorted(pyinf.Factors.load(factors).module_names)[0]
    assert run(["prepare", *common, "--factors", factors, "--queries", str(workdir / "queries.jsonl"),
                "--out", str(workdir / "q1.safetensors"), "--rank", "2", "--track", f"^{one}$"]) == 0
    assert pyinf.Queries.load(workdir / "q1.safetensors").module_names == [one]
    # scoring with them tracks their layer without being told again
    assert run(["score", *common, "--factors", factors, "--train", str(workdir / "train.jsonl"), "--queries",
                str(workdir / "queries.jsonl"), "--prepared", str(workdir / "q1.safetensors"), "--out",
                str(workdir / "s1")]) == 0
    with pytest.raises(ValueError, match=r"holds the self_influence of another run \(layers: None there, "
                                         r"'1 layer, [0-9a-f]+' now"):
        run(["self-influence", *common, "--factors", factors, "--train", str(workdir / "train.jsonl"),
             "--out", str(workdir / "si"), "--track", f"^{one}$"])
    with pytest.raises(ValueError, match="these factors do not match the model's tracked modules: missing"):
        run(["prepare", *common, "--factors", factors, "--queries", str(workdir / "queries.jsonl"),
             "--out", str(workdir / "q2.safetensors"), "--track", "attn"])
    with pytest.raises(ValueError, match=r"--track 'nothing' matches no trackable module .*output embedding"):
        run(["prepare", *common, "--factors", factors, "--queries", str(workdir / "queries.jsonl"),
             "--out", str(workdir / "q2.safetensors"), "--track", "nothing"])


def test_backends_lists_every_backend(capsys):
    assert run(["backends"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("torch", "triton", "native"))
    if "native  available" in out:  # what the native build holds: its CUDA architectures, the Hopper kernel
        assert "CUDA kernels for" in out or "CPU kernels only" in out


def test_score_resumes_and_shards_join(workdir, capsys):
    common = ["--model", str(workdir / "model"), "--batch-size", "2", "--no-progress", "--track", "mlp"]
    # a longer corpus, so that there are several chunks
    texts = [f"document {i}: " + "abcdefgh"[i % 8] * (3 + i % 5) for i in range(9)]
    (workdir / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    factors = str(workdir / "f.safetensors")
    assert run(["fit", *common, "--train", str(workdir / "train.jsonl"), "--out", factors,
                "--fisher", "empirical"]) == 0
    score = ["score", *common, "--factors", factors, "--train", str(workdir / "train.jsonl"), "--queries",
             str(workdir / "queries.jsonl"), "--rank", "4", "--chunk-size", "2"]
    assert run([*score, "--out", str(workdir / "whole")]) == 0
    whole, _ = pyinf.storage.load(workdir / "whole" / "scores.safetensors", "scores")
    assert whole["scores"].shape == (9, 2)
    capsys.readouterr()
    # a rerun into the same directory reuses its queries and chunks
    assert run([*score, "--out", str(workdir / "whole")]) == 0
    err = capsys.readouterr().err
    assert "reusing the queries" in err and "scores.safetensors holds this run's scores, complete" in err
    # so does it with the chunks deleted after the join (they are not needed any more)
    import shutil

    shutil.rmtree(workdir / "whole" / "scores-chunks")
    assert run([*score, "--out", str(workdir / "whole")]) == 0
    assert "holds this run's scores, complete" in capsys.readouterr().err
    # shards need queries prepared once, then share one directory
    with pytest.raises(ValueError, match="--shard needs --prepared"):
        run([*score, "--out", str(workdir / "sharded"), "--shard", "0/2"])
    prepared = str(workdir / "q.safetensors")
    assert run(["prepare", *common, "--factors", factors, "--queries", str(workdir / "queries.jsonl"),
                "--rank", "4", "--out", prepared]) == 0
    assert run([*score, "--out", str(workdir / "sharded"), "--prepared", prepared, "--shard", "1/2"]) == 0
    assert "chunks of other shards are still missing" in capsys.readouterr().out
    assert not (workdir / "sharded" / "scores.safetensors").exists()
    assert run([*score, "--out", str(workdir / "sharded"), "--prepared", prepared, "--shard", "0/2",
                "--query-batch-size", "1"]) == 0
    sharded, _ = pyinf.storage.load(workdir / "sharded" / "scores.safetensors", "scores")
    torch.testing.assert_close(sharded["scores"], whole["scores"], rtol=1e-5, atol=1e-7)
    assert json.loads((workdir / "sharded" / "top.json").read_text())[0]["top"]
    with pytest.raises(SystemExit):
        run([*score, "--out", str(workdir / "bad"), "--shard", "2/2"])
    assert "shard 2/2" in capsys.readouterr().err
    # another --seed draws other random weights: the factors are refused for them (the CLI does
    # not mix two models), and with --allow-other-weights, the prepared queries still are
    with pytest.raises(ValueError, match=r"f.safetensors was fitted with other weights than .*model's \(fingerprint "
                                         r"\w+ there, \w+ here; a config-only --model draws its weights from --seed "
                                         r"\(1 here, 0 in the fit\)\).*pass --allow-other-weights"):
        run([*score, "--seed", "1", "--out", str(workdir / "sharded"), "--prepared", prepared])
    with pytest.raises(ValueError, match=r"prepared with another model \(seed: 0 there, 1 here; weights: fingerprint"):
        run([*score, "--seed", "1", "--out", str(workdir / "sharded"), "--prepared", prepared,
             "--allow-other-weights"])
    with pytest.raises(ValueError, match=r"fitted with other weights"):
        run(["self-influence", *common, "--seed", "1", "--factors", factors, "--train", str(workdir / "train.jsonl"),
             "--out", str(workdir / "self")])
    # the same weights read from another path (another mount on another machine) are the same model

    shutil.copytree(workdir / "model", workdir / "model-elsewhere")
    elsewhere = [a if a != str(workdir / "model") else str(workdir / "model-elsewhere") for a in score]
    assert run([*elsewhere, "--out", str(workdir / "elsewhere"), "--prepared", prepared]) == 0
    capsys.readouterr()
    assert run([*elsewhere, "--out", str(workdir / "whole")]) == 0  # and so does a run resumed from there
    assert "reusing the queries" in capsys.readouterr().err
    # a shard reading them from there joins the others' run (the weights decide, not their path)
    assert run([*elsewhere, "--out", str(workdir / "sharded"), "--prepared", prepared, "--shard", "1/2"]) == 0
    # a setting of the prepared queries given otherwise is refused, not ignored; the same one is fine
    with pytest.raises(ValueError, match=r"prepared with other settings than --rank 1 \(prepared: 4\)"):
        run([*score, "--out", str(workdir / "sharded"), "--prepared", prepared, "--rank", "1"])
    assert run([*score, "--out", str(workdir / "sharded"), "--prepared", prepared, "--rank", "4"]) == 0
    # queries saved by the Python API carry no CLI source: their own rank and SVD are compared
    api = pyinf.Queries.load(prepared)
    api.meta.pop("source")
    api.save(workdir / "api.safetensors")
    with pytest.raises(ValueError, match=r"other settings than --svd 'randomized' \(prepared: 'full'\)"):
        run([*score, "--out", str(workdir / "sharded"), "--prepared", str(workdir / "api.safetensors"),
             "--svd", "randomized"])
    # and so are they in another dtype, with the fused LM head
    assert run([*score, "--out", str(workdir / "bf16"), "--prepared", prepared, "--dtype", "bfloat16",
                "--fused-head"]) == 0
    capsys.readouterr()
    # the queries a directory's scores were computed against are not replaced: the run could
    # not be resumed after
    saved = (workdir / "whole" / "queries.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"whole holds scores of other queries \(.*weights: fingerprint .* "
                                         r"\(seed: 0 there, 1 now\)"):
        run([*score, "--seed", "1", "--out", str(workdir / "whole"), "--allow-other-weights"])
    assert "reusing the queries" not in capsys.readouterr().err
    assert (workdir / "whole" / "queries.safetensors").read_bytes() == saved


def test_a_refused_run_leaves_a_directory_as_it_was(workdir, capsys):
    """A run with other settings replaced a damaged queries.safetensors before the chunks
    refused it, and then the run the chunks belong to was refused too; prepared queries of
    another run replaced a finished result whose chunks were deleted."""
    import shutil

    common = ["--model", str(workdir / "model"), "--batch-size", "2", "--no-progress", "--track", "mlp"]
    factors = str(workdir / "f.safetensors")
    assert run(["fit", *common, "--train", str(workdir / "train.jsonl"), "--out", factors,
                "--fisher", "empirical"]) == 0
    score = ["score", *common, "--factors", factors, "--train", str(workdir / "train.jsonl"), "--queries",
             str(workdir / "queries.jsonl"), "--chunk-size", "2", "--out", str(workdir / "out")]
    assert run([*score, "--rank", "2"]) == 0
    want = (workdir / "out" / "scores.safetensors").read_bytes()
    # an interrupted run (chunks only) whose saved queries were damaged
    (workdir / "out" / "scores.safetensors").unlink()
    queries_file = workdir / "out" / "queries.safetensors"
    queries_file.write_bytes(queries_file.read_bytes()[:1000])
    damaged = queries_file.read_bytes()
    with pytest.raises(ValueError, match=r"out holds scores of other queries \(fingerprint [0-9a-f]{12} in "
                                         r"0000000000-0000000002.safetensors, [0-9a-f]{12} now; "
                                         r"queries.safetensors, which would name the settings"):
        run([*score, "--rank", "3"])
    assert queries_file.read_bytes() == damaged
    assert run([*score, "--rank", "2"]) == 0  # the chunks' own settings: restored, resumed, joined
    assert (workdir / "out" / "scores.safetensors").read_bytes() == want
    # other prepared queries, once the finished run's chunks are gone
    (workdir / "one.jsonl").write_text((workdir / "queries.jsonl").read_text().splitlines()[0] + "\n")
    assert run(["prepare", *common, "--factors", factors, "--queries", str(workdir / "one.jsonl"), "--rank", "2",
                "--out", str(workdir / "one.safetensors")]) == 0
    shutil.rmtree(workdir / "out" / "scores-chunks")
    top = (workdir / "out" / "top.json").read_bytes()
    with pytest.raises(ValueError, match=r"scores.safetensors holds the scores of another run \(queries: .*"
                                         r"n_queries: 2 there, 1 now\)"):
        run([*[a if a != str(workdir / "queries.jsonl") else str(workdir / "one.jsonl") for a in score],
             "--prepared", str(workdir / "one.safetensors")])
    assert (workdir / "out" / "scores.safetensors").read_bytes() == want
    assert (workdir / "out" / "top.json").read_bytes() == top


def test_sharded_fit_gives_the_plain_fit(workdir, capsys):
    common = ["--model", str(workdir / "model"), "--batch-size", "2", "--no-progress", "--track", "mlp",
              "--train", str(workdir / "train.jsonl"), "--fisher", "empirical"]
    assert run(["fit", *common, "--out", str(workdir / "plain.safetensors")]) == 0
    assert not (workdir / "plain.safetensors.parts").exists()
    plain = pyinf.Factors.load(workdir / "plain.safetensors")
    sharded = ["fit", *common, "--out", str(workdir / "sharded.safetensors"), "--no-wait"]
    waiting = EXIT_RUN_AGAIN
    assert run([*sharded, "--shard", "1/2"]) == waiting
    said = capsys.readouterr()
    assert "waits for the other shards' covariance sums" in said.err and "run it again once" in said.err
    assert "its part of the fit so far is saved in" in said.out and "run it again once the other" in said.out
    assert run([*sharded, "--shard", "0/2"]) == waiting  # decomposes, then its Lambda sums; shard 1's are missing
    assert not (workdir / "sharded.safetensors").exists()
    capsys.readouterr()
    assert run([*sharded, "--shard", "1/2"]) == 0  # its part is done: shard 0 writes the factors
    assert "run it again" not in capsys.readouterr().out
    assert run([*sharded, "--shard", "0/2"]) == 0
    got = pyinf.Factors.load(workdir / "sharded.safetensors")
    assert got.meta["shards"] == 2 and got.meta["n_examples"] == plain.meta["n_examples"] == 4
    for name in plain.module_names:
        torch.testing.assert_close(got[name].lambdas, plain[name].lambdas, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(got[name].a_cov, plain[name].a_cov, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="--max-examples must be positive"):
        run(["fit", *common, "--out", str(workdir / "x.safetensors"), "--max-examples", "0"])


def test_self_influence_command(workdir, capsys):
    common = ["--model", str(workdir / "model"), "--batch-size", "2", "--no-progress", "--track", "mlp"]
    assert run(["fit", *common, "--train", str(workdir / "train.jsonl"), "--out", str(workdir / "f.safetensors"),
                "--fisher", "empirical"]) == 0
    args = ["self-influence", *common, "--factors", str(workdir / "f.safetensors"), "--train",
            str(workdir / "train.jsonl"), "--out", str(workdir / "self"), "--chunk-size", "3", "--top-k", "2"]
    assert run(args) == 0
    saved, _ = pyinf.storage.load(workdir / "self" / "self_influence.safetensors", "self_influence")
    values = saved["self_influence"]
    assert values.shape == (4,) and bool((values > 0).all())  # grad^T H^-1 grad of a positive-definite H
    top = json.loads((workdir / "self" / "top_self_influence.json").read_text())
    assert [row["index"] for row in top] == values.topk(2).indices.tolist()
    assert [row["line"] for row in top] == [n + 1 for n in values.topk(2).indices.tolist()]
    assert "highest self-influence" in capsys.readouterr().out
    assert run(args) == 0 and "holds this run's self_influence, complete" in capsys.readouterr().err
    # pyinf info reads any saved file's header: kind, settings, run fingerprints, shapes
    chunk = next((workdir / "self" / "self_influence-chunks").iterdir())
    assert run(["info", str(workdir / "f.safetensors"), str(chunk), "--max-tensors", "2"]) == 0
    out = capsys.readouterr().out
    assert '"kind": "factors"' in out and '"fisher": "empirical"' in out and "more tensors" in out
    assert '"model_weights": "record of ' in out  # a hash per parameter, summarised
    assert '"kind": "self_influence-chunk"' in out and '"documents": ' in out and "values: F32 [3]" in out
    # an unreadable file is reported and the others are still described
    (workdir / "junk.safetensors").write_bytes(b"not a file")
    assert run(["info", str(workdir / "junk.safetensors"), str(chunk)]) == 1
    out, err = capsys.readouterr()
    assert "not a readable pyinf file" in err and str(workdir / "junk.safetensors") in err
    assert '"kind": "self_influence-chunk"' in out
    # edited settings are not shown as if they held: the metadata's checksum is checked
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(workdir / "f.safetensors"), framework="pt") as f:
        header = json.loads(f.metadata()["pyinf"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header["fisher"] = "true"
    save_file(tensors, str(workdir / "edited.safetensors"), metadata={"pyinf": json.dumps(header)})
    assert run(["info", str(workdir / "edited.safetensors")]) == 1
    assert "edited.safetensors: its metadata fails its checksum" in capsys.readouterr().err


def test_max_length_is_bounded_by_the_model_and_completions_are_never_cut(workdir, capsys):
    """A document longer than the model's position table (n_positions=64 here) is cut to it,
    with a notice, instead of indexing past the table; a query whose completion would be cut
    is refused, naming the record."""
    (workdir / "long.jsonl").write_text(json.dumps({"text": "a long document " * 6}) + "\n"
                                        + json.dumps({"text": "short one"}) + "\n")
    fit = ["fit", "--model", str(workdir / "model"), "--train", str(workdir / "long.jsonl"), "--out",
           str(workdir / "f.safetensors"), "--no-progress", "--track", "mlp", "--fisher", "empirical"]
    assert run(fit + ["--max-length", "512"]) == 0
    assert "--max-length 512 lowered to 64" in capsys.readouterr().err
    assert run(fit) == 0  # the default (512) is capped without a notice
    assert "lowered" not in capsys.readouterr().err
    (workdir / "longq.jsonl").write_text(json.dumps({"prompt": "where is paris? ", "completion": "in france " * 6}))
    with pytest.raises(ValueError, match=r"longq.jsonl:1: prompt \(16 tokens\) and completion \(60\) exceed "
                                         r"max_length=64: the completion would be cut"):
        run(["score", "--model", str(workdir / "model"), "--factors", str(workdir / "f.safetensors"), "--train",
             str(workdir / "long.jsonl"), "--queries", str(workdir / "longq.jsonl"), "--out", str(workdir / "out"),
             "--no-progress", "--track", "mlp"])
    assert not (workdir / "out" / "scores.safetensors").exists()


def test_cli_results_are_the_python_apis(workdir):
    """fit, score (with --rank and --damping) and self-influence through the CLI give what the
    same model, data and settings give through InfluenceEngine."""
    from pyinf.textdata import JsonlTextDataset, load_model

    common = ["--model", str(workdir / "model"), "--batch-size", "3", "--no-progress", "--track", "mlp",
              "--seed", "3"]
    factors_path = str(workdir / "f.safetensors")
    assert run(["fit", *common, "--train", str(workdir / "train.jsonl"), "--out", factors_path,
                "--fisher", "empirical"]) == 0
    # without --seed: the fit's, recorded in the factors (a config-only model's random weights)
    assert run(["score", *common[:-2], "--factors", factors_path, "--train", str(workdir / "train.jsonl"),
                "--queries", str(workdir / "queries.jsonl"), "--out", str(workdir / "out"), "--rank", "3",
                "--damping", "0.02"]) == 0
    assert run(["self-influence", *common, "--factors", factors_path, "--train", str(workdir / "train.jsonl"),
                "--out", str(workdir / "si"), "--damping", "0.05"]) == 0
    model, tokenizer = load_model(str(workdir / "model"), seed=3)
    names = [n for n in pyinf.modules.find_tracked_modules(model) if "mlp" in n]
    engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(tracked_modules=names), progress=False)
    train = JsonlTextDataset(str(workdir / "train.jsonl"), tokenizer, max_length=64)
    query = JsonlTextDataset(str(workdir / "queries.jsonl"), tokenizer, max_length=64)
    factors = engine.fit_factors(train, fisher="empirical", batch_size=3)
    queries = engine.prepare_queries(query, factors, rank=3, damping=0.02, batch_size=3)
    want = engine.pairwise_scores(train, queries, batch_size=3)
    got, _ = pyinf.storage.load(workdir / "out" / "scores.safetensors", "scores")
    torch.testing.assert_close(got["scores"], want, rtol=1e-4, atol=1e-6)
    want_si = engine.self_influence(train, factors, damping=0.05, batch_size=3)
    got_si, _ = pyinf.storage.load(workdir / "si" / "self_influence.safetensors", "self_influence")
    torch.testing.assert_close(got_si["self_influence"], want_si, rtol=1e-4, atol=1e-6)


def test_a_reader_that_goes_away_is_no_error(tmp_path):
    """`pyinf info ... | head`: the closed pipe ends the command quietly (status 141, as a
    shell reports SIGPIPE), not with `pyinf: error: [Errno 32] Broken pipe`."""
    import subprocess

    path = pyinf.storage.save(tmp_path / "x.safetensors", "scores", {"scores": torch.zeros(3, 2)},
                              dict(note="x" * 2000))
    proc = subprocess.Popen([sys.executable, "-m", "pyinf", "info", *[str(path)] * 200],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(10)  # more than a pipe's buffer follows
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_a_rerun_of_a_finished_fit_does_nothing(workdir, capsys):
    """A `fit; score` script run again after a crash in the scoring does not fit again: the
    factors record their fit (model, data, settings, shards); any change fits anew."""
    common = ["--model", str(workdir / "model"), "--batch-size", "2", "--no-progress", "--track", "mlp"]
    out = workdir / "f.safetensors"
    fit = ["fit", *common, "--train", str(workdir / "train.jsonl"), "--out", str(out), "--fisher", "empirical"]
    assert run(fit) == 0
    first, first_id = out.read_bytes(), pyinf.Factors.load(out).id
    capsys.readouterr()
    assert run(fit) == 0
    assert "already holds the factors of this fit" in capsys.readouterr().out
    assert out.read_bytes() == first  # untouched
    assert run([*fit, "--refit"]) == 0 and "fitted EK-FAC factors" in capsys.readouterr().out
    assert pyinf.Factors.load(out).id == first_id  # the same fit again: the same factors
    # other data, another setting, or a damaged file: fitted again
    with open(workdir / "train.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    for extra in ([], ["--max-length", "16"]):
        assert run([*fit, *extra]) == 0
        assert "fitted EK-FAC factors" in capsys.readouterr().out
    for where in (slice(10, 20), slice(-10, None)):  # in the header; in the tensors' data
        raw = bytearray(out.read_bytes())
        raw[where] = b"\1" * 10
        out.write_bytes(bytes(raw))
        assert run([*fit, "--max-length", "16"]) == 0
        captured = capsys.readouterr()
        assert "fitted EK-FAC factors" in captured.out and "not reusing" in captured.err
        pyinf.Factors.load(out)  # whole again


def test_factors_without_a_weights_record_are_warned_about_not_refused(workdir):
    """Factors of an older pyinf record no per-parameter weights: another dtype of the same
    checkpoint cannot be told from other weights, so the CLI warns instead of refusing."""
    common = ["--model", str(workdir / "model"), "--batch-size", "2", "--no-progress", "--track", "mlp"]
    assert run(["fit", *common, "--train", str(workdir / "train.jsonl"), "--out", str(workdir / "f.safetensors"),
                "--fisher", "empirical"]) == 0
    old = pyinf.Factors.load(workdir / "f.safetensors")
    old.meta.pop("model_weights")
    old.save(workdir / "old.safetensors")
    with pytest.warns(UserWarning, match="records no per-parameter weights .* cannot be told"):
        assert run(["self-influence", *common, "--dtype", "bfloat16", "--factors", str(workdir / "old.safetensors"),
                    "--train", str(workdir / "train.jsonl"), "--out", str(workdir / "si")]) == 0


def test_fit_on_a_uniform_sample(workdir, capsys):
    """--max-examples N takes the first N documents; with --sample-seed a uniform sample of N,
    in file order: the factors are those of the same documents fitted through the API."""
    from pyinf.textdata import JsonlTextDataset, load_model

    texts = [f"document {i}: " + "abcdefgh"[i % 8] * (3 + i % 5) for i in range(12)]
    (workdir / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    common = ["--model", str(workdir / "model"), "--batch-size", "3", "--no-progress", "--track", "mlp"]
    fit = ["fit", *common, "--train", str(workdir / "train.jsonl"), "--fisher", "empirical", "--max-examples", "5"]
    assert run([*fit, "--sample-seed", "4", "--out", str(workdir / "s.safetensors")]) == 0
    assert run([*fit, "--out", str(workdir / "first.safetensors")]) == 0
    sampled, first = (pyinf.Factors.load(workdir / f"{n}.safetensors") for n in ("s", "first"))
    assert sampled.meta["n_examples"] == first.meta["n_examples"] == 5 and sampled.id != first.id
    chosen = sorted(torch.randperm(12, generator=torch.Generator().manual_seed(4))[:5].tolist())
    model, tokenizer = load_model(str(workdir / "model"), seed=0)
    names = [n for n in pyinf.modules.find_tracked_modules(model) if "mlp" in n]
    engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(tracked_modules=names), progress=False)
    data = JsonlTextDataset(workdir / "train.jsonl", tokenizer, max_length=64)
    for got, docs in ((sampled, chosen), (first, list(range(5)))):
        want = engine.fit_factors(torch.utils.data.Subset(data, docs), fisher="empirical", batch_size=3)
        for name in names:
            torch.testing.assert_close(got[name].lambdas, want[name].lambdas, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="--sample-seed draws the --max-examples documents"):
        run(["fit", *common, "--train", str(workdir / "train.jsonl"), "--sample-seed", "4", "--out",
             str(workdir / "x.safetensors")])


def test_documents_that_failed_alone_are_listed_last_or_not_at_all(workdir, monkeypatch, capsys):
    """A document whose scores are NaN (it failed alone, pyinf.corpus) is never among a query's
    top or bottom documents (nor scored per token, where it would fail again); self-influence
    lists it last, as JSON null."""
    import pyinf.corpus as corpus_mod

    common = ["--model", str(workdir / "model"), "--batch-size", "2", "--no-progress", "--track", "mlp"]
    factors = str(workdir / "f.safetensors")
    assert run(["fit", *common, "--train", str(workdir / "train.jsonl"), "--out", factors, "--fisher",
                "empirical"]) == 0
    real_scores, real_self = corpus_mod.score_corpus, corpus_mod.self_influence_corpus

    def with_a_failure(real):
        def run_(*args, **kwargs):
            values = real(*args, **kwargs).clone()
            values[2] = float("nan")
            return values
        return run_

    monkeypatch.setattr(corpus_mod, "score_corpus", with_a_failure(real_scores))
    monkeypatch.setattr(corpus_mod, "self_influence_corpus", with_a_failure(real_self))
    assert run(["score", *common, "--factors", factors, "--train", str(workdir / "train.jsonl"), "--queries",
                str(workdir / "queries.jsonl"), "--out", str(workdir / "out"), "--rank", "4", "--top-k", "9",
                "--bottom-k", "9", "--per-token"]) == 0
    top = json.loads((workdir / "out" / "top.json").read_text())  # valid JSON: no bare NaN
    for entry in top:
        for side in ("top", "bottom"):
            assert sorted(row["index"] for row in entry[side]) == [0, 1, 3]
    assert run(["self-influence", *common, "--factors", factors, "--train", str(workdir / "train.jsonl"), "--out",
                str(workdir / "si"), "--top-k", "4"]) == 0
    rows = json.loads((workdir / "si" / "top_self_influence.json").read_text())
    assert [row["index"] for row in rows][-1] == 2 and rows[-1]["self_influence"] is None
    assert all(row["self_influence"] > 0 for row in rows[:-1])
