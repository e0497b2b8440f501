"""Check that the emulated tests can fail: build copies of csrc/ with one deliberate bug each
(a missing __syncthreads, an unzeroed shared array, an out-of-bounds read, a wrong WMMA
layout; for the Hopper kernel a stage released while its wgmma runs, a wrong TMA coordinate,
a wrong transaction byte count, swapped accumulator coordinates, unmasked rows, overlapping
persistent tiles, a short barrier count, a lost rank column, a missing full-barrier wait, a
warpgroup whose threads issue different wgmma) and run the relevant part of
tests/test_native_emulated.py (or test_native_sm90_emulated.py) against each. Every
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

SM90 = "cuda/factored_scores_sm90.cu"
SM90_TEST = "test_native_sm90_emulated.py"
SM90_CASE = "test_sm90_matches_the_reference and token-tiles and bf16"

# name: (file under csrc/, unique snippet, replacement, pytest -k selection[, test file])
MUTANTS = {
    "fma: no barrier between Ps and the fold": (
        "cuda/factored_scores.cu",
        "Ps[ty * 4 + i][tx * 4 + j] = gl[i][j] * ar[i][j];\n      __syncthreads();",
        "Ps[ty * 4 + i][tx * 4 + j] = gl[i][j] * ar[i][j];\n      ;",
        "test_factored_scores and fp32 and tc0"),
    "fma: sums not zeroed": (
        "cuda/factored_scores.cu",
        "e += THREADS) sums[e / QMAX][e % QMAX] = 0.0f;", "e += THREADS) ;",
        "test_factored_scores and fp32 and tc0"),
    "fma: no barrier after staging": (
        "cuda/factored_scores.cu",
        "* f.s1) : 0.0f;\n    __syncthreads();", "* f.s1) : 0.0f;\n    ;",
        "test_factored_scores and fp32 and tc0"),
    "tc: 16-byte row load past the row end": (
        "cuda/factored_scores_tc.cu", "k0 + k + 8 <= d", "k0 + k < d",
        "test_factored_scores and bf16 and tc1"),
    "tc: no barrier after the slice's copies land": (
        "cuda/factored_scores_tc.cu", "__pipeline_wait_prior(1);  // this thread's copies of slice s have landed\n"
        "    __syncthreads();", "__pipeline_wait_prior(1);\n    ;", "test_factored_scores and bf16 and tc1"),
    "tc: slice s multiplied before its copies land": (
        "cuda/factored_scores_tc.cu", "__pipeline_wait_prior(1);", "__pipeline_wait_prior(2);",
        "test_factored_scores and bf16 and tc1"),
    "tc: the next slice staged into the buffer being multiplied": (
        "cuda/factored_scores_tc.cu", "stage_rows<T>(As[buf ^ 1],", "stage_rows<T>(As[buf],",
        "test_factored_scores and bf16 and tc1"),
    "tc: no barrier before restaging": (
        "cuda/factored_scores_tc.cu", "B_LD);\n    }\n    __syncthreads();", "B_LD);\n    }\n    ;",
        "test_factored_scores and bf16 and tc1"),
    "grouped: each problem's blocks start one block late": (
        "cuda/kernels_common.cuh", "bid >= static_cast<uint32_t>(g.p[i + 1].first_block)",
        "bid > static_cast<uint32_t>(g.p[i + 1].first_block)", "test_factored_scores_grouped and tc1"),
    "grouped: every split problem's partials at the same offset": (
        "cuda/factored_scores.cu", "const size_t start = p.split ? aligned_partials(end) : end;",
        "const size_t start = 0;", "test_factored_scores_grouped_split"),
    "grouped: the split sized per problem, not for the call": (
        "cuda/factored_scores.cu", "plans.push_back(plan(c.d, per_token, may_split, call_pairs));",
        "plans.push_back(plan(c.d, per_token, may_split, document_query_pairs(c.d)));",
        "test_factored_scores_grouped_split"),
    "tf32: col-major A read as row-major": (
        "cuda/eigen_tc.cu", "wmma::precision::tf32, wmma::col_major>", "wmma::precision::tf32, wmma::row_major>",
        "test_eigen_ops and fp32 and tc1"),
    "rotate: no barrier at the end of a K slice": (
        "cuda/rotate.cu", "mma_slice(As, Bs, acc, ty, tx);\n    __syncthreads();",
        "mma_slice(As, Bs, acc, ty, tx);\n    ;",
        "test_eigen_ops and fp32 and tc0"),
    "reduce: one partial past the end": (
        "cuda/eigen_correction.cu", "k < tiles; ++k", "k <= tiles; ++k", "test_eigen_ops and fp32 and tc0"),
    "sm90: a stage released while its wgmma still runs (two left in flight)": (
        SM90, "warpgroup_wait<kInFlight>();", "warpgroup_wait<kInFlight + 1>();", SM90_CASE, SM90_TEST),
    "sm90: acts x right loads the wrong K step": (
        SM90, "(_, _, _, kt - kt_g), tAs(_, _, _, st));", "(_, _, _, kt), tAs(_, _, _, st));", SM90_CASE, SM90_TEST),
    "sm90: half the transaction bytes expected": (
        SM90, "(kTileM + kTileN) * kTileK;", "(kTileM + kTileN) * kTileK / 2;", SM90_CASE, SM90_TEST),
    "sm90: accumulator row and column swapped in the epilogue": (
        SM90, "const int m = get<0>(coords(e)), c = get<1>(coords(e));",
        "const int m = get<1>(coords(e)), c = get<0>(coords(e));", SM90_CASE, SM90_TEST),
    "sm90: masked rows not zeroed": (
        SM90, "s.row_ok[m] ? acc_gl(e) * acc_ar(e) : 0.0f;", "acc_gl(e) * acc_ar(e);", SM90_CASE, SM90_TEST),
    "sm90: persistent CTAs take overlapping tiles": (
        SM90, "const int tile = (int)blockIdx.x + i * (int)gridDim.x;", "const int tile = (int)blockIdx.x + i;",
        "test_sm90_persistent_grid", SM90_TEST),
    "sm90: empty barriers expect half the consumers": (
        SM90, "EmptyBar::init(&s.empty[st], kConsumers);", "EmptyBar::init(&s.empty[st], kConsumers / 2);",
        SM90_CASE, SM90_TEST),
    "sm90: wgmma issued without waiting for its stage's TMA load (no full-barrier wait)": (
        SM90, "FullBar::wait(&s.full[st], (g / kStages) & 1);", ";", SM90_CASE, SM90_TEST),
    "sm90: half of each warpgroup skips the first K step's wgmma": (
        SM90, "gemm(mma, tCrA(_, _, _, st), tCrB(_, _, _, st), acc);",
        "if (ctid % 128 < 64 || kt > 0) gemm(mma, tCrA(_, _, _, st), tCrB(_, _, _, st), acc);",
        SM90_CASE, SM90_TEST),
    "sm90: the fold drops each query's last rank column": (
        SM90, "for (int k = 0; k < p.Rp; ++k)", "for (int k = 0; k < p.Rp - 1; ++k)",
        "test_sm90_matches_the_reference and column-tiles and bf16", SM90_TEST),
}


def run(name, work):
    rel, old, new, selection, *test = MUTANTS[name]
    test_file = test[0] if test else "test_native_emulated.py"
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
                        os.path.join(ROOT, "tests", test_file), "-k", selection],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    last = [line for line in r.stdout.splitlines() if line.strip()][-1:]
    if r.returncode == 5:  # pytest: no test collected, i.e. the selection matches nothing
        return f"NO TEST SELECTED by -k {selection!r} in {test_file}: fix the selection"
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
