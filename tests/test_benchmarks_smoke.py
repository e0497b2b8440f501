"""The benchmark suite's CPU smoke run: ``python -m benchmarks.run --smoke`` executes every
section and writes well-formed JSON, markdown between its markers (leaving hand-written text
alone) and plots. Nothing timed is asserted; the one numeric check is that pyinf and
kronfluence, given the same model, data and settings, produce correlated scores."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_smoke(out_dir, md_path, *extra):
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out_dir), "--results-md", str(md_path),
           *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    md = tmp / "RESULTS.md"
    md.write_text("# notes\n\nHand-written text above.\n\n"
                  "<!-- pyinf-bench:begin cpu-smoke -->\nSTALE CONTENT\n<!-- pyinf-bench:end cpu-smoke -->\n\n"
                  "Hand-written text below.\n")
    proc = _run_smoke(tmp / "out", md)
    assert proc.returncode == 0, f"smoke run failed:\nSTDOUT\n{proc.stdout[-4000:]}\nSTDERR\n{proc.stderr[-4000:]}"
    with open(tmp / "out" / "results.json") as fh:
        res = json.load(fh)
    return dict(res=res, md=md.read_text(), out=tmp / "out", stdout=proc.stdout)


def _finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_section_ran(smoke):
    res = smoke["res"]
    assert res["preset"] == "smoke"
    for section in ("ops", "grouped", "head", "eigh", "e2e", "scaling"):
        assert section in res and "error" not in res[section], res.get(section)
    assert _finite_positive(res["peak"]["tflops"])
    assert {"torch", "transformers", "kronfluence", "device_name"} <= set(res["env"])


def test_ops_records(smoke):
    ops = smoke["res"]["ops"]
    seen = {(r["op"], r["workload"]["name"], r["backend"]) for r in ops["records"]}
    for op in ("covariance", "eigen_correction", "self_influence", "factored_scores", "dense_scores"):
        assert any(o == op and b == "torch" for o, _, b in seen), op
    for op in ("eigen_correction", "self_influence", "factored_scores"):
        assert any(o == op and b == "unfused" for o, _, b in seen), op
    for r in ops["records"]:
        for key in ("ms", "tflops", "pct_peak", "speedup_vs_torch"):
            assert _finite_positive(r[key]), (key, r)
        assert r["rel_err_vs_torch"] is not None and r["rel_err_vs_torch"] < 1e-3, r
    # Each backend either ran or says why not.
    for backend in ("triton", "native"):
        ran = any(b == backend for _, _, b in seen)
        assert ran or any(s["backend"] == backend for s in ops["skipped"]), backend


def test_grouped_records(smoke):
    g = smoke["res"]["grouped"]
    variants = {r["variant"] for r in g["records"]}
    assert {"loop:torch", "loop:unfused", "grouped:torch"} <= variants
    assert all(_finite_positive(r["ms"]) for r in g["records"])


def test_head_records(smoke):
    h = smoke["res"]["head"]
    seen = {(r["what"], r["backend"]) for r in h["records"]}
    assert {("cross_entropy_rows", "torch"), ("cross_entropy_rows", "triton"), ("head fwd+bwd", "plain autograd"),
            ("head fwd+bwd", "fused, torch"), ("head fwd+bwd", "fused, triton")} <= seen
    for r in h["records"]:
        assert _finite_positive(r["ms"]), r
        err = r.get("loss_rel_err", r.get("rel_err_vs_plain"))
        assert err is not None and err < 1e-4, r  # fp32 on a CPU
    assert "#### LM head" in smoke["md"]


def test_eigh_records(smoke):
    ei = smoke["res"]["eigh"]
    assert ei["n_matrices"] == len(ei["sizes"]) == 8  # tiny GPT-NeoX: 2 layers x (A, S) x 2 MLP linears
    assert [r["workers"] for r in ei["runs"]] == [1, 2]
    for r in ei["runs"]:
        assert r["identical"] is True and _finite_positive(r["s"]) and _finite_positive(r["speedup"]), r
    assert "#### Eigendecompositions of a fit" in smoke["md"]


def test_e2e_pyinf_agrees_with_kronfluence(smoke):
    e = smoke["res"]["e2e"]
    libs = {r["library"] for r in e["runs"]}
    assert libs == {"pyinf", "kronfluence"}, e.get("skipped")
    for r in e["runs"]:
        assert _finite_positive(r["fit_s"]) and _finite_positive(r["score_s"])
    pairs = [p for p in e["pearson"] if p["kind"] == "kronfluence"]
    assert pairs
    for p in pairs:
        assert len(p["per_query"]) == e["workload"]["n_queries"]
        # Same model, data and settings with the empirical Fisher: the scores must agree.
        assert p["min"] > 0.9, p
    assert e["floor"] and _finite_positive(e["floor"][0]["train_step_s"])
    # the resumable, chunked path gives the same scores (the chunks hold whole batches)
    chunked = [r["chunked"] for r in e["runs"] if r.get("chunked")]
    assert len(chunked) == 1 and chunked[0]["chunks"] >= 2 and _finite_positive(chunked[0]["seconds"])
    assert chunked[0]["max_rel_diff"] < 1e-6
    assert "resumable scoring (`pyinf.score_corpus`" in smoke["md"]


def test_scaling_points(smoke):
    s = smoke["res"]["scaling"]
    assert {p["axis"] for p in s["points"]} == {"n_docs", "doc_len", "n_queries", "rank"}, s.get("skipped")


def test_markdown_block_and_plots(smoke):
    md = smoke["md"]
    assert md.count("<!-- pyinf-bench:begin cpu-smoke -->") == 1
    assert md.count("<!-- pyinf-bench:end cpu-smoke -->") == 1
    assert "STALE CONTENT" not in md
    assert "Hand-written text above." in md and "Hand-written text below." in md
    assert "CPU smoke" in md and "meaningless for speed" in md
    block = md.split("<!-- pyinf-bench:begin cpu-smoke -->")[1].split("<!-- pyinf-bench:end cpu-smoke -->")[0]
    for heading in ("#### Kernels", "#### Grouped scoring", "#### End to end", "#### Scaling"):
        assert heading in block
    # Every table row has as many cells as its header.
    lines = block.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("| ---"):
            width = line.count("|")
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                assert lines[j].count("|") == width, lines[j]
                j += 1
    for name in smoke["res"]["plots"].values():
        assert os.path.getsize(name) > 1000
        with open(name, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_markdown_block_replacement(tmp_path):
    from benchmarks.run import write_markdown_block

    path = tmp_path / "R.md"
    path.write_text("intro\n")
    write_markdown_block(str(path), "a", "first")
    write_markdown_block(str(path), "b", "other")
    write_markdown_block(str(path), "a", "second")
    text = path.read_text()
    assert text.startswith("intro\n")
    assert "first" not in text and text.count("second") == 1 and text.count("other") == 1
    assert text.index("pyinf-bench:begin a") < text.index("pyinf-bench:begin b")


def test_a_results_folder_is_spliced_into_results_md(smoke, tmp_path):
    """What a GPU session sends back (results/<tag>/ with its results.md) goes into RESULTS.md
    under its tag, the rest of the file kept, without running anything."""
    from benchmarks.run import main

    md = tmp_path / "R.md"
    md.write_text("# notes\n\nkept\n")
    assert main(["--splice", str(smoke["out"]), "--results-md", str(md)]) == 0
    text = md.read_text()
    assert text.startswith("# notes\n\nkept\n") and "<!-- pyinf-bench:begin cpu-smoke -->" in text
    assert (smoke["out"] / "results.md").read_text().strip() in text
    with pytest.raises(SystemExit, match="no results.md in"):
        main(["--splice", str(tmp_path / "nothing"), "--results-md", str(md)])


def test_ops_filters_and_slow_call_timing(monkeypatch):
    """--ops/--workloads keep only what a short GPU session asks for; a call slower than
    SLOW_CALL_MS is timed once instead of a dozen times."""
    import torch

    from benchmarks import bench_ops

    monkeypatch.setattr(bench_ops, "SLOW_CALL_MS", 0.0)
    peak = dict(tflops=1.0)
    res = bench_ops.run_ops("smoke", torch.device("cpu"), peak=peak, backends=("torch", "native"),
                            ops_to_run=("factored_scores",), workloads=["tiny-b"], log=lambda *_: None)
    assert res["records"], res
    assert {(r["op"], r["workload"]["name"]) for r in res["records"]} == {("factored_scores", "tiny-b")}
    assert all(r["reps"] == 1 for r in res["records"])
    assert all(r["rel_err_vs_torch"] < 1e-4 for r in res["records"])


def test_tune_sweep_checks_each_candidate_and_restores_the_table():
    """benchmarks.tune: every candidate is checked against the reference before it is timed,
    a best entry is named, and the kernel's table in the source is left as it was. (Under
    the CPU interpreter the tables are ignored: this exercises the harness only.)"""
    from benchmarks import tune
    from triton_kernels import _shared

    table = tune._table("covariance")
    before = {k: dict(v) for k, v in table.items()}
    seen = []
    res = tune.sweep(("covariance",), preset="smoke", workloads=["tiny-b"], max_seconds=120,
                     log=lambda *_: seen.append(set(_shared.EXACT_STAGES)))
    assert {k: dict(v) for k, v in table.items()} == before
    # the swept kernel launched at its candidates' exact stages, and only during the sweep
    assert seen and all(s == {tune._jitted("covariance")} for s in seen) and not _shared.EXACT_STAGES
    entries = res["kernels"]["covariance"]["entries"]
    assert len(entries) == len(tune.CANDIDATES["covariance"])
    assert all(e["rel_err"] < 1e-2 and e["ms"] > 0 for e in entries), entries
    best = res["kernels"]["covariance"]["best"]
    assert best["config"] in tune.CANDIDATES["covariance"] and best["speedup_vs_current"] > 0


def test_ops_skip_variants_predicted_over_the_call_budget(monkeypatch):
    """A variant predicted (from its rate at an earlier workload) to exceed MAX_PREDICTED_S
    is skipped with the prediction as the reason, not run."""
    import torch

    from benchmarks import bench_ops

    monkeypatch.setattr(bench_ops, "MAX_PREDICTED_S", 1e-12)
    res = bench_ops.run_ops("smoke", torch.device("cpu"), peak=dict(tflops=1.0), backends=("torch", "native"),
                            ops_to_run=("covariance",), log=lambda *_: None)
    first, second = (w.name for w in bench_ops.op_workloads("covariance", "smoke"))
    assert {r["workload"]["name"] for r in res["records"]} == {first}
    skipped = [s for s in res["skipped"] if s["workload"] == second]
    assert skipped and all(s["reason"].startswith("predicted") for s in skipped), res["skipped"]


def test_eigh_default_from_measurements():
    """The fit's eigh default: the fastest worker count with the same bits, if clearly faster
    than one after another."""
    from benchmarks.preferences import eigh_workers

    def runs(*rows):
        return dict(runs=[dict(workers=w, s=s, identical=same) for w, s, same in rows])

    assert eigh_workers(None) == (None, [])
    assert eigh_workers(runs((1, 3.0, True), (2, 2.0, True), (4, 1.2, True), (8, 1.25, True)))[0] == 4
    assert eigh_workers(runs((1, 3.0, True), (4, 2.9, True)))[0] == 1        # within 10%: not worth threads
    assert eigh_workers(runs((1, 3.0, True), (4, 1.0, False), (2, 2.0, True)))[0] == 2  # different bits: never
    assert eigh_workers(runs((2, 1.0, True)))[0] is None                     # no baseline measured


def test_preferences_from_measurements(tmp_path):
    """benchmarks.preferences: per op, the fastest backend that agreed with the reference at
    each measured shape, bounds between shapes where the winner changes; the rewritten
    module is valid Python whose table auto's dispatcher reads the same way."""
    from benchmarks import preferences
    from pyinf.ops import _preferences

    from benchmarks.shapes import OpWorkload, flops

    def rec(op, name, backend, ms, n, t, d_in, d_out, q=0, r=0, err=1e-3):
        w = OpWorkload(name, d_in, d_out, n, t, q, r)
        return dict(op=op, backend=backend, ms=ms, rel_err_vs_torch=0.0 if backend == "torch" else err,
                    workload=w.to_dict(), flops=flops(op, w))

    small, large = ("gpt2", 8, 512, 768, 3072, 16, 32), ("llama", 8, 2048, 4096, 11008, 80, 32)
    records = [
        rec("factored_scores", *small[:1], "torch", 0.30, *small[1:]),
        rec("factored_scores", *small[:1], "triton", 0.20, *small[1:]),
        rec("factored_scores", *small[:1], "native", 0.10, *small[1:]),
        rec("factored_scores", *small[:1], "native-fma", 0.01, *small[1:]),  # a switch's variant: not a backend
        rec("factored_scores", *small[:1], "unfused", 0.01, *small[1:]),    # not a backend either
        rec("factored_scores", *large[:1], "torch", 2000.0, *large[1:]),
        rec("factored_scores", *large[:1], "triton", 1800.0, *large[1:]),
        rec("factored_scores", *large[:1], "native", 2500.0, *large[1:]),
        rec("covariance", "gpt2", "triton", 0.1, 8, 512, 768, 3072),
        rec("covariance", "gpt2", "torch", 0.2, 8, 512, 768, 3072),
    ]
    table, evidence = preferences.rules(records)
    assert table["covariance"] == [(None, "triton")]
    (bound, first), (last_bound, last) = table["factored_scores"]
    assert (first, last, last_bound) == ("native", "triton", None)
    s_small = _preferences.work("factored_scores", dict(n=8, t=512, d_in=768, d_out=3072, q=16, r=32))
    s_large = _preferences.work("factored_scores", dict(n=8, t=2048, d_in=4096, d_out=11008, q=80, r=32))
    assert s_small < bound < s_large
    assert any("native-fma" not in e and "llama" in e for e in evidence)

    text = open(preferences.TARGET).read()
    new = preferences.rewrite(text, preferences.render(table, evidence, "test device"))
    assert preferences.rewrite(new, preferences.render(table, evidence, "test device")) == new  # idempotent
    namespace = {}
    exec(compile(new, "_preferences.py", "exec"), namespace)
    assert namespace["MEASURED"] == table and namespace["SOURCE"] == "test device"
    assert namespace["EIGH_WORKERS"] is None  # no eigh section measured
    with_eigh = preferences.rewrite(text, preferences.render(table, evidence, "test device", 4))
    namespace = {}
    exec(compile(with_eigh, "_preferences.py", "exec"), namespace)
    assert namespace["EIGH_WORKERS"] == 4
    shape = dict(n=8, t=512, d_in=768, d_out=3072, q=16, r=32)
    assert _preferences.preferred("factored_scores", shape, table) == "native"
    assert _preferences.preferred("factored_scores", dict(shape, t=2048, d_in=4096, d_out=11008, q=80), table) == "triton"
    assert _preferences.preferred("self_influence", shape, table) is None
    # A backend off the reference anywhere (a biased layout too), or failing, is never chosen
    # for that op: the tolerance is DESIGN.md's 1e-2, doubled for the squared eigen ops.
    wrong_at_large = records[:7] + [rec("factored_scores", *large[:1], "native", 900.0, *large[1:], err=0.5)]
    assert preferences.rules(wrong_at_large)[0]["factored_scores"] == [(None, "triton")]
    wrong_biased = records[:8] + [dict(rec("factored_scores", *small[:1], "native", 0.1, *small[1:], err=0.02),
                                       workload=dict(records[2]["workload"], bias=True))]
    assert preferences.rules(wrong_biased)[0]["factored_scores"] == [(None, "triton")]
    wrong_per_token = records + [rec("factored_scores_per_token", *small[:1], "native", 0.1, *small[1:], err=0.5)]
    assert preferences.rules(wrong_per_token)[0]["factored_scores"] == [(None, "triton")]
    failed = [dict(op="factored_scores", backend="native", workload="llama", reason="failed: RuntimeError: ...")]
    assert preferences.rules(records, failures=failed)[0]["factored_scores"] == [(None, "triton")]
    eigen = [rec("eigen_correction", "gpt2", "torch", 0.3, 8, 512, 768, 3072),
             rec("eigen_correction", "gpt2", "triton", 0.1, 8, 512, 768, 3072, err=1.5e-2)]
    assert preferences.rules(eigen)[0]["eigen_correction"] == [(None, "triton")]  # within 2e-2
    # the grouped section: the fastest correct grouped call; loops and wrong results never win
    grouped = dict(workload=dict(name="gpt2-small 24 MLP layers"), records=[
        dict(variant="loop:torch", ms=9.0, rel_err_vs_torch=0.0), dict(variant="loop:native", ms=0.5, rel_err_vs_torch=0.0),
        dict(variant="grouped:torch", ms=8.0, rel_err_vs_torch=0.0),
        dict(variant="grouped:triton", ms=3.0, rel_err_vs_torch=1e-3),
        dict(variant="grouped:native", ms=2.0, rel_err_vs_torch=1e-3)])
    gtable, gevidence = preferences.grouped_rule(grouped)
    assert gtable == {"factored_scores_grouped": [(None, "native")]} and "native 2 ms" in gevidence[0]
    grouped["records"][-1]["rel_err_vs_torch"] = 0.5
    assert preferences.grouped_rule(grouped)[0] == {"factored_scores_grouped": [(None, "triton")]}
    assert preferences.grouped_rule(None) == ({}, [])
    assert _preferences.preferred("factored_scores_grouped", dict(groups=24, n=8, q=16),
                                  dict(table, **gtable)) == "native"
    # a CPU run is refused
    res = tmp_path / "results.json"
    res.write_text(json.dumps(dict(env=dict(device_type="cpu", device_name="cpu"), ops=dict(records=records))))
    assert preferences.main([str(res)]) == 2


def _tiny_bf16_workload():
    from benchmarks.shapes import TINY_NEOX, E2EWorkload

    return E2EWorkload(TINY_NEOX, n_docs=8, doc_len=16, n_queries=3, query_len=8, rank=4, dtype="bfloat16",
                       batch_sizes=(8,), query_batch_size=3, floor_batch_sizes=(8,), compile_floor=False,
                       pyinf_compiled_batch=0, pyinf_checkpoint_batch=0, kronfluence_fp32=False)


def test_e2e_bf16_runs_against_pyinf_float32():
    """A bf16 workload also runs pyinf in float32 (a float32 copy of the same model), and
    each bf16 pyinf run is correlated against it: issue 5's second accuracy reference. The
    floor at the same batch gives the scoring-vs-floor line of the report."""
    import torch

    from benchmarks import bench_e2e
    from benchmarks.run import _floor_ratios

    e = bench_e2e.run_e2e(_tiny_bf16_workload(), torch.device("cpu"), log=lambda *_: None, with_kronfluence=False)
    assert [(r["library"], r["precision"]) for r in e["runs"]] == [("pyinf", "bfloat16"), ("pyinf", "float32")], e
    (p,) = e["pearson"]
    assert (p["run"], p["against"], p["kind"]) == ("pyinf bfloat16 b8", "pyinf float32 b8", "pyinf float32")
    assert len(p["per_query"]) == 3 and p["min"] > 0.9, p
    (line,) = _floor_ratios(e, smoke=False)
    assert line.startswith("- pyinf bfloat16 b8: scoring") and "(goal: " in line


def test_e2e_keeps_what_ran_when_out_of_time():
    """The time limit (OutOfTime, from SIGTERM) stops the e2e section after the floor: the
    bf16 run and the floor are kept and the float32 run is listed as not reached."""
    import torch

    from benchmarks import OutOfTime, bench_e2e

    def log(msg):
        if msg.startswith("[e2e] floor"):
            raise OutOfTime("test: the limit strikes after the floor")

    e = bench_e2e.run_e2e(_tiny_bf16_workload(), torch.device("cpu"), log=log, with_kronfluence=False)
    assert [r["precision"] for r in e["runs"]] == ["bfloat16"] and len(e["floor"]) == 1
    assert e["pearson"] == []
    assert e["skipped"] == [dict(what="the rest of the e2e section",
                                 reason="out of time: test: the limit strikes after the floor")]


def test_run_stopped_by_sigterm_writes_what_it_measured(tmp_path):
    """`benchmarks.run` under `timeout`: a SIGTERM during the ops section keeps the records
    timed so far, writes results.json and the markdown block saying the run was stopped,
    and exits 124 (as `timeout` does)."""
    import signal

    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    md = tmp_path / "R.md"
    cmd = [sys.executable, "-u", "-m", "benchmarks.run", "--smoke", "--only", "ops,e2e", "--out",
           str(tmp_path / "out"), "--results-md", str(md)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("[ops]") and " ms " in line:  # one record timed: stop the run here
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    output = "".join(seen) + rest
    assert proc.returncode == 124, output[-3000:]
    with open(tmp_path / "out" / "results.json") as fh:
        res = json.load(fh)
    assert res["stopped_by_time_limit"] is True
    assert res["ops"]["records"], output[-3000:]
    assert any(s["backend"] == "(the rest)" and s["reason"].startswith("out of time") for s in res["ops"]["skipped"])
    assert res["e2e"] == dict(error="not run: the step's time limit was reached before this section")
    text = md.read_text()
    assert "stopped by its time limit" in text and "#### Kernels" in text


def test_report_holds_every_target_line(smoke):
    """The lines each issue target is read from: per-token against document scores, grouped
    against the unfused per-layer loop, best against best end to end, scoring against the
    fused-head floor; and the temporaries' memory apart from the result."""
    md, res = smoke["md"], smoke["res"]
    assert "Per-token scores against document scores, same shape and backend" in md
    assert any(r["op"] == "factored_scores_per_token" for r in res["ops"]["records"])
    assert "| vs unfused loop | vs own loop |" in md
    grouped = {r["variant"]: r for r in res["grouped"]["records"]}
    assert grouped["grouped:torch"]["speedup_vs_unfused_loop"] > 0
    assert grouped["grouped:native"]["speedup_vs_own_loop"] > 0
    assert "- best against best, scoring: pyinf" in md and "- best against best, fit: pyinf" in md
    floor = smoke["res"]["e2e"]["floor"][0]
    assert floor["fwd_inputgrad_fused_s"] > 0
    assert "(fused head)" in md
    assert "| extra MiB | temp MiB | err |" in md
    assert "self_influence against the unfused eigen_correction of the same run" in md
    assert "'% peak' here divides by this section's measured matmul peak" in md


def test_a_killed_run_keeps_the_sections_it_finished(tmp_path):
    """A step killed outright (a hang in a CUDA call outlives SIGTERM; `timeout -k` then
    kills it) keeps every section finished before it in results.json, marked partial, and
    an earlier run's results of the section it was in and of those it skips."""
    import signal

    out = tmp_path / "out"
    out.mkdir()
    earlier = dict(tag="t", preset="smoke", started="2026-01-01T00:00:00", env=dict(git="earlier"),
                   sections=["e2e", "scaling"], seconds=dict(e2e=1.0, scaling=2.0),
                   e2e=dict(note="earlier e2e"), scaling=dict(note="earlier scaling"))
    (out / "results.json").write_text(json.dumps(earlier))
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-u", "-m", "benchmarks.run", "--smoke", "--tag", "t", "--only", "eigh,e2e",
           "--no-kronfluence", "--out", str(out), "--results-md", "none"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("[e2e]"):  # the eigh section is finished: kill the run in the e2e section
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["partial"] is True and res["tag"] == "t"
    assert res["eigh"]["runs"] and "error" not in res["eigh"], res["eigh"]
    assert res["e2e"] == dict(note="earlier e2e") and res["section_meta"]["e2e"]["carried_over"] is True
    assert res["scaling"] == dict(note="earlier scaling")
    assert not (out / "results.json.part").exists()
