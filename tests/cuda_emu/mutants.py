"""Check that the emulated tests can fail: build copies of csrc/ with one deliberate bug each
(a missing __syncthreads, an unzeroed shared array, an out-of-bounds read, a wrong WMMA
layout) and run the relevant part of tests/test_native_emulated.py against each. Every
mutant must make a test fail (or error). Not part of the test suite (about 15 s a mutant):

    python tests/cuda_emu/mutants.py [name ...]
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# name: (file under csrc/, unique snippet, replacement, pytest -k selection)
MUTANTS = {
    "fma: no barrier between Ps and the fold": (
        "cuda/factored_scores.cu",
        "Ps[ty * 4 + i][tx * 4 + j] = gl[i][j] * ar[i][j];\n      __syncthreads();",
        "Ps[ty * 4 + i][tx * 4 + j] = gl[i][j] * ar[i][j];\n      ;",
        "test_factored_scores and fp32 and tc-unset"),
    "fma: sums not zeroed": (
        "cuda/factored_scores.cu",
        "e += THREADS) sums[e / QMAX][e % QMAX] = 0.0f;", "e += THREADS) ;",
        "test_factored_scores and fp32 and tc-unset"),
    "fma: no barrier after staging": (
        "cuda/factored_scores.cu",
        "      Bs[k][c] = v;\n    }\n    __syncthreads();", "      Bs[k][c] = v;\n    }\n    ;",
        "test_factored_scores and fp32 and tc-unset"),
    "tc: 16-byte row load past the row end": (
        "cuda/factored_scores_tc.cu", "k0 + k + 8 <= d", "k0 + k < d",
        "test_factored_scores and bf16 and tc1"),
    "tc: no barrier after staging": (
        "cuda/factored_scores_tc.cu", "k0, fvec, tid);\n    __syncthreads();", "k0, fvec, tid);\n    ;",
        "test_factored_scores and bf16 and tc1"),
    "tc: no barrier before restaging": (
        "cuda/factored_scores_tc.cu", "B_LD);\n    }\n    __syncthreads();", "B_LD);\n    }\n    ;",
        "test_factored_scores and bf16 and tc1"),
    "tf32: col-major A read as row-major": (
        "cuda/eigen_tc.cu", "wmma::precision::tf32, wmma::col_major>", "wmma::precision::tf32, wmma::row_major>",
        "test_eigen_ops and fp32 and tc1"),
    "rotate: no barrier at the end of a K slice": (
        "cuda/rotate.cu", "mma_slice(As, Bs, acc, ty, tx);\n    __syncthreads();",
        "mma_slice(As, Bs, acc, ty, tx);\n    ;",
        "test_eigen_ops and fp32 and tc-unset"),
    "reduce: one partial past the end": (
        "cuda/eigen_correction.cu", "k < tiles; ++k", "k <= tiles; ++k", "test_eigen_ops and fp32 and tc-unset"),
}


def run(name, work):
    rel, old, new, selection = MUTANTS[name]
    src = os.path.join(work, name.replace(" ", "_").replace(":", ""), "csrc")
    shutil.copytree(os.path.join(ROOT, "csrc"), src)
    path = os.path.join(src, rel)
    with open(path) as f:
        text = f.read()
    if text.count(old) != 1:
        return f"SKIPPED (the snippet occurs {text.count(old)} times in {rel}: the source changed)"
    with open(path, "w") as f:
        f.write(text.replace(old, new))
    env = dict(os.environ, PYINF_EMU_CSRC=src, PYINF_EMU_BUILD_ROOT=os.path.join(work, "build"),
               PYINF_EMU_BARRIER_TIMEOUT="10")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "--tb=no", "-p", "no:cacheprovider",
                        os.path.join(ROOT, "tests", "test_native_emulated.py"), "-k", selection],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    last = [line for line in r.stdout.splitlines() if line.strip()][-1:]
    verdict = "CAUGHT" if r.returncode == 1 else f"NOT CAUGHT (pytest exit {r.returncode})"
    return f"{verdict}: {' '.join(last)}"


def main(argv):
    names = argv or list(MUTANTS)
    missed = 0
    with tempfile.TemporaryDirectory(prefix="pyinf_mutants.") as work:
        for name in names:
            t0 = time.monotonic()
            verdict = run(name, work)
            missed += not verdict.startswith("CAUGHT")
            print(f"{name}: {verdict} ({time.monotonic() - t0:.0f} s)", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
