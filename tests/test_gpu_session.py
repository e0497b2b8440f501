"""benchmarks/gpu_session.sh, run here with stand-ins for python, nvidia-smi and
compute-sanitizer (tests/gpu_session_stub.py): every mode gets to its end, and every command
it would run on the GPU machine takes its arguments (sections, ops, workload filters,
kernels, backend labels, pytest files and -k selections). A GPU session has 15 minutes in
all; an argument typo must not be found there."""
import json
import os
import stat
import subprocess
import tarfile
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_session.sh")


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fake_machine(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_python = _executable(bin_dir / "fakepy", f'#!/bin/sh\nexec "{sys.executable}" '
                                                  f'"{os.path.join(ROOT, "tests", "gpu_session_stub.py")}" "$@"\n')
    _executable(bin_dir / "nvidia-smi", "#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559 MiB, 570.86, 1980 MHz'\n")
    # compute-sanitizer --tool T --print-limit N COMMAND...: check the tool, run the command
    _executable(bin_dir / "compute-sanitizer", """#!/bin/sh
[ "$1" = --tool ] || { echo "stub compute-sanitizer: expected --tool first" >&2; exit 3; }
case "$2" in memcheck|racecheck|initcheck|synccheck) ;; *) echo "stub: unknown tool $2" >&2; exit 3;; esac
shift 2
[ "$1" = --print-limit ] && shift 2
"$@" && echo "========= ERROR SUMMARY: 0 errors"
""")
    env = dict(os.environ, PYTHON=str(fake_python), OUT=str(tmp_path / "out"), STUB_LOG=str(tmp_path / "calls.jsonl"),
               PYINF_SESSION_LOGS=str(tmp_path / "logs"),
               PYINF_WHEELHOUSE=str(tmp_path / "no-wheelhouse"),  # not the tree's (make wheelhouse adds a pip call)
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=ROOT)
    env.pop("PYINF_CUDA_ARCHS", None)
    return tmp_path, env


def _run(mode, tmp_path, env):
    proc = subprocess.run(["bash", SCRIPT, mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = tmp_path / "calls.jsonl"
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def _modules(calls):
    return [c["args"][1] if c["args"][:1] == ["-m"] else c["args"][0] for c in calls]


EXPECTED = {
    "all": ["-", "-c", "pip", "pyinf", "pytest", "pytest", "pytest", "benchmarks.run", "benchmarks.run",
            "benchmarks.run", "benchmarks.preferences", "benchmarks.run", "benchmarks.preferences", "benchmarks.tune"],
    "check": ["-", "-c", "pip", "pyinf", "pytest", "benchmarks.sanitize", "benchmarks.sanitize",
              "benchmarks.sanitize", "benchmarks.sanitize"],
    "ops": ["-", "-c", "pip", "pyinf", "benchmarks.run", "benchmarks.preferences"],
    "eigh": ["-", "-c", "pip", "pyinf", "benchmarks.run", "benchmarks.preferences"],  # the branch e2e and scaling take
    "tune": ["-", "-c", "pip", "pyinf", "benchmarks.tune"],
}


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_every_command_of_the_session_takes_its_arguments(mode, fake_machine):
    tmp_path, env = fake_machine
    proc, calls = _run(mode, tmp_path, env)
    errors = [c for c in calls if "error" in c]
    assert not errors, errors
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== done" in proc.stdout
    assert _modules(calls) == EXPECTED[mode], calls
    summary = (tmp_path / "out" / f"summary-{mode}.txt").read_text()
    assert "build: ok" in summary and "FAILED" not in summary
    # at most 8 files come back from $OUT: the summary and one archive of every log and result
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["session.tgz", f"summary-{mode}.txt"]
    with tarfile.open(tmp_path / "out" / "session.tgz") as tar:
        names = tar.getnames()
    assert f"./summary-{mode}.txt" in names and "./build.log" in names
    if mode == "all":
        sections = [c["args"][c["args"].index("--only") + 1] for c in calls if "--only" in c["args"]]
        assert sections == ["ops", "e2e", "grouped", "eigh"]  # e2e (issue 5's headline) before the short steps
        assert "RESULTS.md" in " ".join(names) and "kronfluence: imports" in summary


def test_a_failed_build_does_not_end_the_session(fake_machine):
    """Triton, torch and the end-to-end comparison need no native build: they still run, and
    the Hopper kernel's benchmark variants are skipped."""
    tmp_path, env = fake_machine
    proc, calls = _run("all", tmp_path, dict(env, STUB_FAIL_BUILD="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _modules(calls) == EXPECTED["all"]
    summary = (tmp_path / "out" / "summary-all.txt").read_text()
    assert "build: FAILED" in summary and "the sm90 benchmark variants are skipped" in summary
    assert "benchmarks e2e" in summary and "== done" in summary


def test_a_bad_argument_is_caught(tmp_path, monkeypatch):
    """The stub itself: a typo in a section, workload, backend or label is an error (exit 2),
    not a silent pass."""
    from . import gpu_session_stub

    monkeypatch.setenv("STUB_LOG", str(tmp_path / "calls.jsonl"))
    for bad in (["benchmarks.run", "--only", "opps"], ["benchmarks.run", "--only", "ops", "--workloads", "gtp2"],
                ["benchmarks.run", "--backends", "cuda"], ["benchmarks.tune", "--kernels", "factored"],
                ["benchmarks.tune", "--workloads", "lamma"], ["benchmarks.sanitize", "natve"]):
        with pytest.raises(SystemExit) as exc:
            gpu_session_stub.main(["-m", *bad])
        assert exc.value.code == 2, bad
    assert gpu_session_stub.main(["-m", "benchmarks.run", "--only", "ops", "--workloads", "gpt2,llama"]) == 0


def test_sections_named_by_modes_exist():
    """Modes e2e, eigh and scaling share one branch (``--only $mode``); eigh runs it above."""
    from benchmarks.run import SECTIONS

    assert {"e2e", "eigh", "scaling"} <= set(SECTIONS)
