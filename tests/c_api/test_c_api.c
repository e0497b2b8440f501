/* Calls every op of the pyinf C API from plain C and checks it against naive double
 * loops written here; checks error reporting; exercises strided (transposed) inputs,
 * bf16/fp16 inputs and masks. Exit status 0 = all passed. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pyinf/pyinf.h>

static int failures = 0;
#define CHECK(cond, ...)                 \
  do {                                   \
    if (!(cond)) {                       \
      fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      fprintf(stderr, __VA_ARGS__);      \
      fprintf(stderr, "\n");             \
      ++failures;                        \
    }                                    \
  } while (0)

static unsigned rng = 12345u;
static float frand(void) {
  rng = rng * 1664525u + 1013904223u;
  return ((rng >> 8) & 0xffff) / 32768.0f - 1.0f;
}

static pyinf_tensor t3(const void* p, pyinf_dtype dt, int64_t a, int64_t b, int64_t c) {
  pyinf_tensor t;
  memset(&t, 0, sizeof t);
  t.data = p; t.dtype = dt; t.ndim = 3;
  t.shape[0] = a; t.shape[1] = b; t.shape[2] = c;
  t.strides[0] = b * c; t.strides[1] = c; t.strides[2] = 1;
  return t;
}
static pyinf_tensor t2(const void* p, pyinf_dtype dt, int64_t a, int64_t b) {
  pyinf_tensor t;
  memset(&t, 0, sizeof t);
  t.data = p; t.dtype = dt; t.ndim = 2;
  t.shape[0] = a; t.shape[1] = b;
  t.strides[0] = b; t.strides[1] = 1;
  return t;
}

static double rel_err(const float* out, const double* ref, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!isfinite(out[i])) return INFINITY;
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return sqrt(num) / (den > 0 ? sqrt(den) : 1.0);
}

static unsigned short to_bf16(float f) { /* round to nearest even */
  unsigned u;
  memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
}
static float from_bf16(unsigned short h) {
  unsigned u = (unsigned)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static unsigned short to_fp16(float f) { /* normal range only (test values are small) */
  unsigned u;
  memcpy(&u, &f, 4);
  unsigned sign = (u >> 16) & 0x8000u;
  int exp = (int)((u >> 23) & 0xff) - 127 + 15;
  unsigned mant = u & 0x7fffffu;
  if (exp <= 0) return (unsigned short)sign;
  unsigned h = sign | ((unsigned)exp << 10) | (mant >> 13);
  if (mant & 0x1000u) h += 1; /* round half up */
  return (unsigned short)h;
}

enum { N = 3, T = 5, DI = 7, DO = 4, Q = 3, R = 2 };

int main(void) {
  float acts[N * T * DI], grads[N * T * DO], qa[DI * DI], qs[DO * DO], lam[DO * DI];
  float left[Q * DO * R], right[Q * DI * R];
  unsigned char mask[N * T];
  for (int i = 0; i < N * T * DI; ++i) acts[i] = frand();
  for (int i = 0; i < N * T * DO; ++i) grads[i] = frand();
  for (int i = 0; i < DI * DI; ++i) qa[i] = frand();
  for (int i = 0; i < DO * DO; ++i) qs[i] = frand();
  for (int i = 0; i < DO * DI; ++i) lam[i] = 1.5f + frand();
  for (int i = 0; i < Q * DO * R; ++i) left[i] = frand();
  for (int i = 0; i < Q * DI * R; ++i) right[i] = frand();
  for (int i = 0; i < N * T; ++i) mask[i] = (unsigned char)((i % 3) != 1);
  for (int t = 0; t < T; ++t) mask[(N - 1) * T + t] = 0; /* a document that is all padding */
  /* padding garbage must never reach a result */
  for (int i = 0; i < N * T; ++i)
    if (!mask[i]) { acts[i * DI] = NAN; grads[i * DO] = INFINITY; }
  const float damping = 0.25f;

  pyinf_tensor A = t3(acts, PYINF_FLOAT32, N, T, DI), G = t3(grads, PYINF_FLOAT32, N, T, DO);
  pyinf_tensor QA = t2(qa, PYINF_FLOAT32, DI, DI), QS = t2(qs, PYINF_FLOAT32, DO, DO), L = t2(lam, PYINF_FLOAT32, DO, DI);
  pyinf_tensor LF = t3(left, PYINF_FLOAT32, Q, DO, R), RF = t3(right, PYINF_FLOAT32, Q, DI, R);
  pyinf_tensor M = t2(mask, PYINF_BOOL, N, T);

  /* ---- naive references (double) ---- */
  double dw[N][DO][DI], rot[N][DO][DI], cov[DI * DI], ec[DO * DI], si[N], fs[N * Q], fst[N * T * Q];
  memset(dw, 0, sizeof dw); memset(rot, 0, sizeof rot); memset(cov, 0, sizeof cov); memset(ec, 0, sizeof ec);
  memset(si, 0, sizeof si); memset(fs, 0, sizeof fs); memset(fst, 0, sizeof fst);
  for (int n = 0; n < N; ++n)
    for (int t = 0; t < T; ++t) {
      if (!mask[n * T + t]) continue;
      const float* a = acts + (n * T + t) * DI;
      const float* g = grads + (n * T + t) * DO;
      for (int i = 0; i < DI; ++i)
        for (int j = 0; j < DI; ++j) cov[i * DI + j] += (double)a[i] * a[j];
      for (int o = 0; o < DO; ++o)
        for (int i = 0; i < DI; ++i) dw[n][o][i] += (double)g[o] * a[i];
      for (int q = 0; q < Q; ++q) {
        double s = 0;
        for (int k = 0; k < R; ++k) {
          double gl = 0, ar = 0;
          for (int o = 0; o < DO; ++o) gl += (double)g[o] * left[(q * DO + o) * R + k];
          for (int i = 0; i < DI; ++i) ar += (double)a[i] * right[(q * DI + i) * R + k];
          s += gl * ar;
        }
        fst[(n * T + t) * Q + q] = s;
        fs[n * Q + q] += s;
      }
    }
  for (int n = 0; n < N; ++n)
    for (int i = 0; i < DO; ++i)
      for (int j = 0; j < DI; ++j) {
        double v = 0;
        for (int o = 0; o < DO; ++o)
          for (int k = 0; k < DI; ++k) v += (double)qs[o * DO + i] * dw[n][o][k] * qa[k * DI + j];
        rot[n][i][j] = v;
        ec[i * DI + j] += v * v;
        si[n] += v * v / ((double)lam[i * DI + j] + damping);
      }

  /* ---- CPU ops ---- */
  float out[N * T * Q + DI * DI];
  pyinf_status s;
  s = pyinf_cpu_covariance(&A, &M, out);
  CHECK(s == PYINF_SUCCESS, "covariance: %s %s", pyinf_status_string(s), pyinf_last_error());
  CHECK(rel_err(out, cov, DI * DI) < 1e-5, "covariance rel err %g", rel_err(out, cov, DI * DI));
  for (int i = 0; i < DI; ++i)
    for (int j = 0; j < DI; ++j) CHECK(out[i * DI + j] == out[j * DI + i], "covariance not exactly symmetric");

  s = pyinf_cpu_eigen_correction(&A, &G, &QA, &QS, &M, out);
  CHECK(s == PYINF_SUCCESS, "eigen_correction: %s %s", pyinf_status_string(s), pyinf_last_error());
  CHECK(rel_err(out, ec, DO * DI) < 1e-5, "eigen_correction rel err %g", rel_err(out, ec, DO * DI));

  s = pyinf_cpu_self_influence(&A, &G, &QA, &QS, &L, damping, &M, out);
  CHECK(s == PYINF_SUCCESS, "self_influence: %s %s", pyinf_status_string(s), pyinf_last_error());
  CHECK(rel_err(out, si, N) < 1e-5, "self_influence rel err %g", rel_err(out, si, N));

  s = pyinf_cpu_factored_scores(&A, &G, &LF, &RF, &M, 0, out);
  CHECK(s == PYINF_SUCCESS, "factored_scores: %s %s", pyinf_status_string(s), pyinf_last_error());
  CHECK(rel_err(out, fs, N * Q) < 1e-5, "factored_scores rel err %g", rel_err(out, fs, N * Q));
  s = pyinf_cpu_factored_scores(&A, &G, &LF, &RF, &M, 1, out);
  CHECK(s == PYINF_SUCCESS, "factored_scores per-token: %s", pyinf_last_error());
  CHECK(rel_err(out, fst, N * T * Q) < 1e-5, "factored_scores per-token rel err %g", rel_err(out, fst, N * T * Q));

  /* strided input: q_a given as a transposed view of its transpose (strides [1, DI]) */
  float qat[DI * DI];
  for (int i = 0; i < DI; ++i)
    for (int j = 0; j < DI; ++j) qat[j * DI + i] = qa[i * DI + j];
  pyinf_tensor QAT = QA;
  QAT.data = qat; QAT.strides[0] = 1; QAT.strides[1] = DI;
  s = pyinf_cpu_eigen_correction(&A, &G, &QAT, &QS, &M, out);
  CHECK(s == PYINF_SUCCESS && rel_err(out, ec, DO * DI) < 1e-5, "eigen_correction with strided q_a");

  /* bf16 and fp16 acts (values rounded first, so the reference is exact) */
  unsigned short acts_h[N * T * DI];
  float acts_r[N * T * DI];
  for (int half = 0; half < 2; ++half) {
    for (int i = 0; i < N * T * DI; ++i) {
      if (!isfinite(acts[i])) { acts_h[i] = 0x7fc0; acts_r[i] = acts[i]; continue; } /* NaN padding */
      if (half) { acts_h[i] = to_fp16(acts[i]); }
      else { acts_h[i] = to_bf16(acts[i]); }
      acts_r[i] = half ? acts[i] : from_bf16(acts_h[i]);
    }
    pyinf_tensor AH = t3(acts_h, half ? PYINF_FLOAT16 : PYINF_BFLOAT16, N, T, DI);
    pyinf_tensor AR = t3(acts_r, PYINF_FLOAT32, N, T, DI);
    float ref_out[N * Q];
    s = pyinf_cpu_factored_scores(&AR, &G, &LF, &RF, &M, 0, ref_out);
    CHECK(s == PYINF_SUCCESS, "factored_scores fp32 rounded acts");
    s = pyinf_cpu_factored_scores(&AH, &G, &LF, &RF, &M, 0, out);
    CHECK(s == PYINF_SUCCESS, "factored_scores %s acts: %s", half ? "fp16" : "bf16", pyinf_last_error());
    double ref_d[N * Q];
    for (int i = 0; i < N * Q; ++i) ref_d[i] = ref_out[i];
    CHECK(rel_err(out, ref_d, N * Q) < (half ? 2e-3 : 1e-6), "factored_scores %s rel err %g",
          half ? "fp16" : "bf16", rel_err(out, ref_d, N * Q));
  }

  /* ---- errors ---- */
  pyinf_tensor bad = QA;
  bad.shape[0] = DI + 1;
  s = pyinf_cpu_eigen_correction(&A, &G, &bad, &QS, NULL, out);
  CHECK(s == PYINF_ERROR_INVALID_VALUE, "bad q_a shape gave %d", (int)s);
  CHECK(strstr(pyinf_last_error(), "q_a") != NULL, "error message names q_a: '%s'", pyinf_last_error());
  pyinf_tensor wrong = A;
  wrong.dtype = PYINF_BOOL;
  s = pyinf_cpu_covariance(&wrong, NULL, out);
  CHECK(s == PYINF_ERROR_UNSUPPORTED_DTYPE, "bool x gave %d", (int)s);
  CHECK(strstr(pyinf_last_error(), "dtype bool") != NULL, "error message names the dtype: '%s'", pyinf_last_error());
  wrong.dtype = (pyinf_dtype)99; /* a C caller can store any int there */
  s = pyinf_cpu_covariance(&wrong, NULL, out);
  CHECK(s == PYINF_ERROR_UNSUPPORTED_DTYPE, "dtype 99 gave %d", (int)s);
  CHECK(strstr(pyinf_last_error(), "unknown (99)") != NULL, "error message shows the code: '%s'", pyinf_last_error());
  {
    /* a size-1 dimension's stride is never applied: any value is accepted */
    pyinf_tensor one = t3(acts, PYINF_FLOAT32, 1, 1, DI);
    one.strides[0] = (int64_t)1 << 61;
    one.strides[1] = (int64_t)1 << 61;
    s = pyinf_cpu_covariance(&one, NULL, out);
    CHECK(s == PYINF_SUCCESS, "size-1 dimensions with 2^61 strides gave %d: %s", (int)s, pyinf_last_error());
  }
  s = pyinf_cpu_factored_scores(&A, &G, &LF, &RF, NULL, 0, NULL);
  CHECK(s == PYINF_ERROR_INVALID_VALUE, "NULL out gave %d", (int)s);
  s = pyinf_cpu_covariance(NULL, NULL, out);
  CHECK(s == PYINF_ERROR_INVALID_VALUE, "NULL x gave %d", (int)s);
  /* grouped on the CPU: each problem's scores are its own call's; a bad problem 1 is named
   * and problem 0's output is left untouched */
  {
    float single[N * Q], grouped[2][N * Q];
    s = pyinf_cpu_factored_scores(&A, &G, &LF, &RF, &M, 0, single);
    CHECK(s == PYINF_SUCCESS, "single call for the grouped check gave %d", (int)s);
    pyinf_factored_problem group[2] = {{&A, &G, &LF, &RF, &M, grouped[0]}, {&A, &G, &LF, &RF, NULL, grouped[1]}};
    s = pyinf_cpu_factored_scores_grouped(group, 2, 0);
    CHECK(s == PYINF_SUCCESS && memcmp(grouped[0], single, sizeof single) == 0, "cpu grouped gave %d", (int)s);
    for (int i = 0; i < N * Q; ++i) grouped[0][i] = -7.0f;
    group[1].left = &bad;
    s = pyinf_cpu_factored_scores_grouped(group, 2, 0);
    CHECK(s == PYINF_ERROR_INVALID_VALUE && strstr(pyinf_last_error(), "problem 1") != NULL && grouped[0][0] == -7.0f,
          "cpu grouped with a bad problem 1 gave %d (%s)", (int)s, pyinf_last_error());
    s = pyinf_cpu_factored_scores_grouped(NULL, 0, 0);
    CHECK(s == PYINF_SUCCESS, "empty cpu grouped call gave %d", (int)s);
  }
  /* sizes past 2^60 (a stride-0 view can claim any size): refused, the product named, before
   * any buffer is sized from them (N*T*Q once wrapped to a small buffer and a segfault) */
  {
    static const float one = 1.0f;
    float sink[1];
    const int64_t big = (int64_t)1 << 50;
    pyinf_tensor ba = t3(&one, PYINF_FLOAT32, 1, big, 1), bl = t3(&one, PYINF_FLOAT32, 4096, 1, 1);
    ba.strides[0] = ba.strides[1] = ba.strides[2] = 0;
    bl.strides[0] = bl.strides[1] = bl.strides[2] = 0;
    s = pyinf_cpu_factored_scores(&ba, &ba, &bl, &bl, NULL, 0, sink);
    CHECK(s == PYINF_ERROR_INVALID_VALUE && strstr(pyinf_last_error(), "N*T*Q = 1 * 1125899906842624 * 4096"),
          "N*T*Q past 2^60 gave %d (%s)", (int)s, pyinf_last_error());
    pyinf_factored_problem group[2] = {{&A, &G, &LF, &RF, NULL, out}, {&ba, &ba, &bl, &bl, NULL, sink}};
    s = pyinf_cpu_factored_scores_grouped(group, 2, 1);
    CHECK(s == PYINF_ERROR_INVALID_VALUE && strstr(pyinf_last_error(), "problem 1") &&
              strstr(pyinf_last_error(), "N*T*Q"), "grouped N*T*Q past 2^60 gave %d (%s)", (int)s, pyinf_last_error());
    pyinf_tensor na = t3(NULL, PYINF_FLOAT32, (int64_t)1 << 40, 0, 1), nl = t3(&one, PYINF_FLOAT32, 1 << 30, 1, 1);
    nl.strides[0] = 0;
    s = pyinf_cpu_factored_scores(&na, &na, &nl, &nl, NULL, 0, sink);  /* T = 0: N*T*Q = 0, N*Q = 2^70 */
    CHECK(s == PYINF_ERROR_INVALID_VALUE && strstr(pyinf_last_error(), "N*Q"), "N*Q past 2^60 gave %d (%s)", (int)s,
          pyinf_last_error());
    pyinf_tensor ea = t3(NULL, PYINF_FLOAT32, 1, 1, 0), ql = t3(NULL, PYINF_FLOAT32, big, 0, big);
    s = pyinf_cpu_factored_scores(&ea, &ea, &ql, &ql, NULL, 0, sink);  /* d = 0: no factor elements, Q*r = 2^100 */
    CHECK(s == PYINF_ERROR_INVALID_VALUE && strstr(pyinf_last_error(), "Q*r"), "Q*r past 2^60 gave %d (%s)", (int)s,
          pyinf_last_error());
    {  /* Q*r = 2^60, within the limit, on an empty layer: scores of 0, no per-thread scratch of
        * threads x 2 x Q*r floats (it overflowed int64 and crashed with 8 threads) */
      pyinf_tensor el = t3(NULL, PYINF_FLOAT32, 1, 0, (int64_t)1 << 60);
      sink[0] = -1.0f;
      s = pyinf_cpu_factored_scores(&ea, &ea, &el, &el, NULL, 0, sink);
      CHECK(s == PYINF_SUCCESS && sink[0] == 0.0f, "Q*r = 2^60 on an empty layer gave %d (%s)", (int)s,
            pyinf_last_error());
    }
    pyinf_tensor wide = t3(NULL, PYINF_FLOAT32, big, big, 0);  /* no elements, but N*T = 2^100 */
    s = pyinf_cpu_covariance(&wide, NULL, sink);
    CHECK(s == PYINF_ERROR_INVALID_VALUE && strstr(pyinf_last_error(), "'x' is too large"),
          "N*T past 2^60 gave %d (%s)", (int)s, pyinf_last_error());
    pyinf_tensor cx = t3(&one, PYINF_FLOAT32, 1, 1, (int64_t)1 << 31);
    cx.strides[2] = 0;
    s = pyinf_cpu_covariance(&cx, NULL, sink);
    CHECK(s == PYINF_ERROR_INVALID_VALUE && strstr(pyinf_last_error(), "d*d"), "d*d past 2^60 gave %d (%s)", (int)s,
          pyinf_last_error());
    pyinf_tensor far = t3(&one, PYINF_FLOAT32, 2, 1, 1);
    far.strides[0] = (int64_t)1 << 62;  /* the second document 2^64 bytes away */
    s = pyinf_cpu_covariance(&far, NULL, sink);
    CHECK(s == PYINF_ERROR_INVALID_VALUE && strstr(pyinf_last_error(), "spans more than 2^60 bytes"),
          "an offset past 2^60 bytes gave %d (%s)", (int)s, pyinf_last_error());
    pyinf_tensor far_mask = t2(&one, PYINF_BOOL, 2, 1), x2 = t3(&one, PYINF_FLOAT32, 2, 1, 1);
    far_mask.strides[0] = (int64_t)1 << 61;
    x2.strides[0] = 0;
    s = pyinf_cpu_covariance(&x2, &far_mask, sink);
    CHECK(s == PYINF_ERROR_INVALID_VALUE && strstr(pyinf_last_error(), "'mask' spans"),
          "a mask offset past 2^60 bytes gave %d (%s)", (int)s, pyinf_last_error());
  }
  /* empty results: nothing is read or written, so NULL pointers are fine */
  {
    pyinf_tensor a0 = t3(NULL, PYINF_FLOAT32, N, 0, DI), g0 = t3(NULL, PYINF_FLOAT32, N, 0, DO);
    s = pyinf_cpu_factored_scores(&a0, &g0, &LF, &RF, NULL, 1, NULL);
    CHECK(s == PYINF_SUCCESS, "per-token scores with T = 0 gave %d (%s)", (int)s, pyinf_last_error());
    pyinf_tensor l0 = t3(NULL, PYINF_FLOAT32, 0, DO, R), r0 = t3(NULL, PYINF_FLOAT32, 0, DI, R);
    s = pyinf_cpu_factored_scores(&A, &G, &l0, &r0, &M, 0, NULL);
    CHECK(s == PYINF_SUCCESS, "scores with Q = 0 gave %d (%s)", (int)s, pyinf_last_error());
    pyinf_tensor ad = t3(NULL, PYINF_FLOAT32, N, T, 0), qa0 = t2(NULL, PYINF_FLOAT32, 0, 0);
    s = pyinf_cpu_eigen_correction(&ad, &G, &qa0, &QS, &M, NULL);
    CHECK(s == PYINF_SUCCESS, "eigen_correction with d_in = 0 gave %d (%s)", (int)s, pyinf_last_error());
    s = pyinf_cpu_covariance(&ad, &M, NULL);
    CHECK(s == PYINF_SUCCESS, "covariance with d = 0 gave %d (%s)", (int)s, pyinf_last_error());
  }
  CHECK(strlen(pyinf_status_string(PYINF_ERROR_CUDA)) > 0, "status string");
  CHECK(pyinf_api_version() == PYINF_API_VERSION, "api version");

  /* ---- CUDA entry points: a CPU-only build says so; host pointers are never launched on
   * here (this test runs without a GPU), only argument validation is exercised. ---- */
  size_t bytes = 0;
  s = pyinf_cuda_eigen_correction_workspace_size(&A, &G, &bytes);
  if (pyinf_cuda_compiled()) {
    CHECK(s == PYINF_SUCCESS && bytes >= (size_t)(N * T * (DI + DO) * 4), "workspace size %zu", bytes);
    s = pyinf_cuda_eigen_correction(&A, &G, &QA, &QS, &M, out, NULL, 0, NULL);
    CHECK(s == PYINF_ERROR_WORKSPACE, "missing workspace gave %d", (int)s);
    s = pyinf_cuda_factored_scores(&A, &G, &bad, &RF, NULL, 0, out, NULL);
    CHECK(s == PYINF_ERROR_INVALID_VALUE, "cuda bad left gave %d", (int)s);
    s = pyinf_cuda_factored_scores_workspace_size(&A, &G, &LF, &RF, 0, &bytes);
    CHECK(s == PYINF_SUCCESS, "factored workspace size gave %d", (int)s);
    s = pyinf_cuda_factored_scores_workspace_size(&A, &G, &bad, &RF, 0, &bytes);
    CHECK(s == PYINF_ERROR_INVALID_VALUE, "factored workspace size with a bad left gave %d", (int)s);
    s = pyinf_cuda_factored_scores_split(&A, &G, &bad, &RF, NULL, 0, out, NULL, 0, NULL);
    CHECK(s == PYINF_ERROR_INVALID_VALUE, "cuda split bad left gave %d", (int)s);
    const char* kernel = NULL;
    s = pyinf_cuda_factored_scores_kernel(&A, &G, &LF, &RF, 0, bytes, &kernel);
    CHECK(s == PYINF_SUCCESS && kernel != NULL && strlen(kernel) > 0, "factored kernel name gave %d", (int)s);
    s = pyinf_cuda_factored_scores_kernel(&A, &G, &bad, &RF, 0, bytes, &kernel);
    CHECK(s == PYINF_ERROR_INVALID_VALUE, "factored kernel name with a bad left gave %d", (int)s);
    /* packed factors: none here (fp32 factors, no opt-in, no GPU), so packing is refused */
    size_t packed_bytes = 1;
    s = pyinf_cuda_factored_scores_pack_size(&LF, &RF, &packed_bytes);
    CHECK(s == PYINF_SUCCESS && packed_bytes == 0, "pack size gave %d, %zu bytes", (int)s, packed_bytes);
    s = pyinf_cuda_factored_scores_pack_size(&bad, &RF, &packed_bytes);
    CHECK(s == PYINF_ERROR_INVALID_VALUE, "pack size with a bad left gave %d", (int)s);
    s = pyinf_cuda_factored_scores_pack(&LF, &RF, out, 16, NULL);
    CHECK(s == PYINF_ERROR_INVALID_VALUE, "pack of factors the Hopper kernel cannot take gave %d", (int)s);
    size_t packed_ws = 0;
    s = pyinf_cuda_factored_scores_packed_workspace_size(&A, &G, &LF, &RF, 0, &packed_ws);
    CHECK(s == PYINF_SUCCESS && packed_ws <= bytes, "packed workspace size gave %d, %zu > %zu", (int)s, packed_ws,
          bytes);
    s = pyinf_cuda_factored_scores_split_packed(&A, &G, &LF, &RF, out, 16, NULL, 0, out, NULL, 0, NULL);
    CHECK(s == PYINF_ERROR_WORKSPACE, "split with packed factors that cannot exist gave %d", (int)s);
    s = pyinf_cuda_factored_scores_split_packed(&A, &G, &bad, &RF, NULL, 0, NULL, 0, out, NULL, 0, NULL);
    CHECK(s == PYINF_ERROR_INVALID_VALUE, "split_packed with a bad left gave %d", (int)s);
    /* grouped: the size of a good group; a bad second problem is named and nothing runs */
    pyinf_factored_problem group[2] = {{&A, &G, &LF, &RF, &M, out}, {&A, &G, &bad, &RF, NULL, out}};
    size_t group_bytes = 7;
    s = pyinf_cuda_factored_scores_grouped_workspace_size(group, 1, 0, &group_bytes);
    CHECK(s == PYINF_SUCCESS, "grouped workspace size gave %d", (int)s);
    s = pyinf_cuda_factored_scores_grouped(group, 2, 0, NULL, 0, NULL);
    CHECK(s == PYINF_ERROR_INVALID_VALUE && strstr(pyinf_last_error(), "problem 1") != NULL,
          "grouped call with a bad problem 1 gave %d (%s)", (int)s, pyinf_last_error());
    s = pyinf_cuda_factored_scores_grouped(group, 0, 0, NULL, 0, NULL);
    CHECK(s == PYINF_SUCCESS, "empty grouped call gave %d", (int)s);
    /* self_influence's partials, N * tiles(d_out) * tiles(d_in) floats, are no tensor's size */
    static const float one = 1.0f;
    pyinf_tensor wa = t3(&one, PYINF_FLOAT32, (int64_t)1 << 36, 1, (int64_t)1 << 24);
    wa.strides[0] = wa.strides[1] = wa.strides[2] = 0;
    s = pyinf_cuda_self_influence_workspace_size(&wa, &wa, &bytes);
    CHECK(s == PYINF_ERROR_INVALID_VALUE && strstr(pyinf_last_error(), "N*tiles"),
          "self_influence partials past 2^60 gave %d (%s)", (int)s, pyinf_last_error());
  } else {
    const char* kernel = NULL;
    s = pyinf_cuda_factored_scores_kernel(&A, &G, &LF, &RF, 0, 0, &kernel);
    CHECK(s == PYINF_ERROR_NOT_COMPILED && pyinf_cuda_sm90_compiled() == 0, "CPU-only build: kernel name gave %d",
          (int)s);
    CHECK(s == PYINF_ERROR_NOT_COMPILED, "CPU-only build: cuda entry point gave %d", (int)s);
    s = pyinf_cuda_factored_scores(&A, &G, &LF, &RF, NULL, 0, out, NULL);
    CHECK(s == PYINF_ERROR_NOT_COMPILED, "CPU-only build: cuda factored_scores gave %d", (int)s);
    s = pyinf_cuda_factored_scores_workspace_size(&A, &G, &LF, &RF, 0, &bytes);
    CHECK(s == PYINF_ERROR_NOT_COMPILED, "CPU-only build: factored workspace size gave %d", (int)s);
    s = pyinf_cuda_factored_scores_split(&A, &G, &LF, &RF, NULL, 0, out, NULL, 0, NULL);
    CHECK(s == PYINF_ERROR_NOT_COMPILED, "CPU-only build: factored split gave %d", (int)s);
    s = pyinf_cuda_factored_scores_pack_size(&LF, &RF, &bytes);
    CHECK(s == PYINF_ERROR_NOT_COMPILED, "CPU-only build: pack size gave %d", (int)s);
    s = pyinf_cuda_factored_scores_pack(&LF, &RF, out, 16, NULL);
    CHECK(s == PYINF_ERROR_NOT_COMPILED, "CPU-only build: pack gave %d", (int)s);
    s = pyinf_cuda_factored_scores_packed_workspace_size(&A, &G, &LF, &RF, 0, &bytes);
    CHECK(s == PYINF_ERROR_NOT_COMPILED, "CPU-only build: packed workspace size gave %d", (int)s);
    s = pyinf_cuda_factored_scores_split_packed(&A, &G, &LF, &RF, NULL, 0, NULL, 0, out, NULL, 0, NULL);
    CHECK(s == PYINF_ERROR_NOT_COMPILED, "CPU-only build: split_packed gave %d", (int)s);
    pyinf_factored_problem one = {&A, &G, &LF, &RF, NULL, out};
    s = pyinf_cuda_factored_scores_grouped_workspace_size(&one, 1, 0, &bytes);
    CHECK(s == PYINF_ERROR_NOT_COMPILED, "CPU-only build: grouped workspace size gave %d", (int)s);
    s = pyinf_cuda_factored_scores_grouped(&one, 1, 0, NULL, 0, NULL);
    CHECK(s == PYINF_ERROR_NOT_COMPILED, "CPU-only build: grouped gave %d", (int)s);
  }

  printf("pyinf C API test (cuda compiled: %d, archs '%s'): %s\n", pyinf_cuda_compiled(), pyinf_cuda_archs(),
         failures ? "FAILED" : "OK");
  return failures ? 1 : 0;
}
