/* pyinf native C API: the hot EK-FAC contractions over raw pointers.
 *
 * Plain C (C99), no CUDA, torch or C++ headers needed to include it. Every op and
 * workspace query returns a pyinf_status; pyinf_status_string() names a code and
 * pyinf_last_error() gives the message of the last failing call on the calling thread.
 *
 * Tensors are described by pyinf_tensor: a data pointer, a dtype, up to 3 dimensions
 * and per-dimension strides counted in ELEMENTS (any non-negative stride is accepted,
 * zero strides included). Inputs may be float32, bfloat16 or float16 (each input may
 * have its own dtype); masks are PYINF_BOOL (one byte per element, nonzero = keep).
 * Accumulation is float32 or wider; outputs are dense row-major float32 buffers.
 *
 * Shapes (the same as pyinf.ops in Python):
 *   acts [N, T, d_in], grads [N, T, d_out], x [N, T, d], mask [N, T] (or NULL)
 *   q_a [d_in, d_in], q_s [d_out, d_out], lambdas [d_out, d_in]
 *   left [Q, d_out, r], right [Q, d_in, r]
 * Masked-out token rows are never read into a result (NaN/Inf in padding cannot leak), and
 * their per-token scores are exactly 0. Sizes, and the products of sizes an op forms, above
 * 2^60 elements are refused (PYINF_ERROR_INVALID_VALUE): stride-0 views can claim them. So is
 * a tensor whose strides span more than 2^60 bytes (2^58 float32 elements) from its first
 * element to its last.
 *
 * CPU entry points (pyinf_cpu_*) take host pointers and run synchronously (OpenMP).
 * CUDA entry points (pyinf_cuda_*) take device pointers, enqueue work on `stream` (a
 * cudaStream_t passed as void*, NULL = legacy default stream) on the calling thread's
 * current device, and return without synchronising. Ops that need scratch memory take a
 * device workspace whose size the matching *_workspace_size function reports, 16-byte
 * aligned (as cudaMalloc's are; so must packed factors be). When the
 * library was built without CUDA, pyinf_cuda_* return PYINF_ERROR_NOT_COMPILED.
 * Results are deterministic: no atomics, fixed reduction orders.
 * Tensor cores: pyinf_cuda_factored_scores runs on WMMA (fp32 accumulation) when the four
 * inputs are all bf16 or all fp16; pyinf_cuda_eigen_correction and pyinf_cuda_self_influence
 * run their products on TF32 tensor cores when acts and grads are both 16-bit (their values
 * are exact in TF32; the fp32 eigenbases are rounded to it). fp32 and mixed inputs use fp32
 * FMA. The environment variable PYINF_NATIVE_TC, read per call, overrides this: "0" = fp32
 * FMA for every call, "1" = also fp32 inputs of the eigen ops on TF32 (~1e-3 relative).
 * On Hopper, pyinf_cuda_factored_scores_split can run a TMA + wgmma kernel instead of WMMA
 * (opt-in for now: see pyinf_cuda_factored_scores_kernel).
 */
#ifndef PYINF_PYINF_H_
#define PYINF_PYINF_H_

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  if defined(PYINF_BUILDING_LIBRARY)
#    define PYINF_API __declspec(dllexport)
#  else
#    define PYINF_API
#  endif
#else
#  define PYINF_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define PYINF_API_VERSION 1

typedef enum pyinf_status {
  PYINF_SUCCESS = 0,
  PYINF_ERROR_INVALID_VALUE = 1,     /* bad shape, stride, pointer or argument */
  PYINF_ERROR_UNSUPPORTED_DTYPE = 2, /* dtype not accepted for that argument */
  PYINF_ERROR_NOT_COMPILED = 3,      /* CUDA entry point in a CPU-only build */
  PYINF_ERROR_CUDA = 4,              /* a CUDA runtime call or kernel launch failed, or CUDA had
                                        an error pending before pyinf launched anything (left by
                                        earlier work on this thread, or a runtime that cannot
                                        start); the message says which, and the error is taken,
                                        as cudaGetLastError takes it */
  PYINF_ERROR_WORKSPACE = 5,         /* workspace missing or too small */
  PYINF_ERROR_OUT_OF_MEMORY = 6,     /* host allocation failed */
  PYINF_ERROR_INTERNAL = 7
} pyinf_status;

typedef enum pyinf_dtype {
  PYINF_FLOAT32 = 0,
  PYINF_BFLOAT16 = 1,
  PYINF_FLOAT16 = 2,
  PYINF_BOOL = 3 /* masks only */
} pyinf_dtype;

typedef struct pyinf_tensor {
  const void* data;
  pyinf_dtype dtype;
  int32_t ndim;        /* must match the argument's rank (2 or 3) */
  int64_t shape[3];
  int64_t strides[3];  /* in elements */
} pyinf_tensor;

PYINF_API const char* pyinf_status_string(pyinf_status status);
/* Message of the last failing call on this thread ("" if none); a successful call leaves it.
 * The pointer stays valid until the next failing call on the same thread. */
PYINF_API const char* pyinf_last_error(void);
PYINF_API int pyinf_api_version(void);
/* 1 when the CUDA kernels are compiled in, else 0. */
PYINF_API int pyinf_cuda_compiled(void);
/* Semicolon-separated CUDA architectures compiled in ("" without CUDA). */
PYINF_API const char* pyinf_cuda_archs(void);
/* 1 when the Hopper factored-scores kernel (TMA + wgmma, sm_90a, CUTLASS/CuTe) is compiled in. */
PYINF_API int pyinf_cuda_sm90_compiled(void);

/* ---- CPU (host pointers) ------------------------------------------------------ */

/* out [d, d] = sum over unmasked rows of x x^T; exactly symmetric. */
PYINF_API pyinf_status pyinf_cpu_covariance(const pyinf_tensor* x, const pyinf_tensor* mask, float* out);

/* out [d_out, d_in] = sum_n (Q_S^T DW_n Q_A)^2, DW_n = sum_t mask g a^T. */
PYINF_API pyinf_status pyinf_cpu_eigen_correction(const pyinf_tensor* acts, const pyinf_tensor* grads,
                                                  const pyinf_tensor* q_a, const pyinf_tensor* q_s,
                                                  const pyinf_tensor* mask, float* out);

/* out [N] = sum_ij (Q_S^T DW_n Q_A)[i,j]^2 / (lambdas[i,j] + damping); lambdas is required,
 * and damping must be >= 0 (not NaN), else PYINF_ERROR_INVALID_VALUE. */
PYINF_API pyinf_status pyinf_cpu_self_influence(const pyinf_tensor* acts, const pyinf_tensor* grads,
                                                const pyinf_tensor* q_a, const pyinf_tensor* q_s,
                                                const pyinf_tensor* lambdas, float damping,
                                                const pyinf_tensor* mask, float* out);

/* out [N, Q] (per_token = 0) or [N, T, Q] (per_token != 0):
 * sum_t mask[n,t] sum_k (grads[n,t] . left[q,:,k]) (acts[n,t] . right[q,:,k]). */
PYINF_API pyinf_status pyinf_cpu_factored_scores(const pyinf_tensor* acts, const pyinf_tensor* grads,
                                                 const pyinf_tensor* left, const pyinf_tensor* right,
                                                 const pyinf_tensor* mask, int per_token, float* out);

/* ---- CUDA (device pointers, asynchronous on `stream`) --------------------------- */

PYINF_API pyinf_status pyinf_cuda_covariance(const pyinf_tensor* x, const pyinf_tensor* mask, float* out,
                                             void* stream);

PYINF_API pyinf_status pyinf_cuda_eigen_correction_workspace_size(const pyinf_tensor* acts,
                                                                  const pyinf_tensor* grads, size_t* bytes);
PYINF_API pyinf_status pyinf_cuda_eigen_correction(const pyinf_tensor* acts, const pyinf_tensor* grads,
                                                   const pyinf_tensor* q_a, const pyinf_tensor* q_s,
                                                   const pyinf_tensor* mask, float* out, void* workspace,
                                                   size_t workspace_bytes, void* stream);

PYINF_API pyinf_status pyinf_cuda_self_influence_workspace_size(const pyinf_tensor* acts,
                                                                const pyinf_tensor* grads, size_t* bytes);
PYINF_API pyinf_status pyinf_cuda_self_influence(const pyinf_tensor* acts, const pyinf_tensor* grads,
                                                 const pyinf_tensor* q_a, const pyinf_tensor* q_s,
                                                 const pyinf_tensor* lambdas, float damping,
                                                 const pyinf_tensor* mask, float* out, void* workspace,
                                                 size_t workspace_bytes, void* stream);

PYINF_API pyinf_status pyinf_cuda_factored_scores(const pyinf_tensor* acts, const pyinf_tensor* grads,
                                                  const pyinf_tensor* left, const pyinf_tensor* right,
                                                  const pyinf_tensor* mask, int per_token, float* out,
                                                  void* stream);

/* The same scores, faster for few documents and queries: document scores (per_token = 0)
 * then split each document's tokens over several blocks, whose partial scores are summed in
 * a fixed order (deterministic; the split, hence the rounding, depends on the shapes only).
 * The split needs the workspace whose size pyinf_cuda_factored_scores_workspace_size reports
 * (0 bytes when no split is made: then the call is pyinf_cuda_factored_scores). When the
 * Hopper kernel is selected (see pyinf_cuda_factored_scores_kernel) the size also covers its
 * rank-padded copy of the factors; query the size with the environment the call will see. */
PYINF_API pyinf_status pyinf_cuda_factored_scores_workspace_size(const pyinf_tensor* acts,
                                                                 const pyinf_tensor* grads,
                                                                 const pyinf_tensor* left,
                                                                 const pyinf_tensor* right, int per_token,
                                                                 size_t* bytes);
PYINF_API pyinf_status pyinf_cuda_factored_scores_split(const pyinf_tensor* acts, const pyinf_tensor* grads,
                                                        const pyinf_tensor* left, const pyinf_tensor* right,
                                                        const pyinf_tensor* mask, int per_token, float* out,
                                                        void* workspace, size_t workspace_bytes, void* stream);

/* Which kernel pyinf_cuda_factored_scores_split runs for these inputs with a workspace of
 * workspace_bytes, on the current device: *name = "sm90" (Hopper: TMA + wgmma), "wmma"
 * (tensor cores, sm_80+) or "fma" (fp32 FMA). The sm90 kernel is opt-in while it has not
 * been measured (environment PYINF_NATIVE_SM90=1, read per call; "wait0" runs it without a
 * wgmma kept in flight across K steps, "ws" with a producer warpgroup issuing the TMA loads
 * on a persistent grid, for comparison); it then needs an sm_90
 * device, four bf16 or four fp16 inputs, r <= 128, acts and grads with a contiguous last
 * dimension and row and document strides that are multiples of 8 elements (16-byte aligned
 * rows), and the workspace pyinf_cuda_factored_scores_workspace_size reports. */
PYINF_API pyinf_status pyinf_cuda_factored_scores_kernel(const pyinf_tensor* acts, const pyinf_tensor* grads,
                                                         const pyinf_tensor* left, const pyinf_tensor* right,
                                                         int per_token, size_t workspace_bytes, const char** name);

/* Packed query factors for the Hopper kernel, made once and reused by every call with the same
 * factors (a scoring pass calls each layer's factors once per batch of documents): without
 * them the Hopper kernel copies the factors into its workspace on every call (two extra
 * launches, Q * Rp * (d_in + d_out) * 2 bytes written). pack_size gives the bytes (0 when the
 * Hopper kernel cannot take these factors: then pass no packed factors), pack fills them on
 * `stream` from left [Q, d_out, r] and right [Q, d_in, r]; split_packed is
 * pyinf_cuda_factored_scores_split with them (packed NULL: identical to it). The packed factors
 * must come from these very left and right, unchanged since: their shapes and dtype are
 * checked, their contents cannot be. With packed factors the Hopper kernel's workspace is only
 * its partial sums: packed_workspace_size reports what split_packed needs then (no more than
 * pyinf_cuda_factored_scores_workspace_size). */
PYINF_API pyinf_status pyinf_cuda_factored_scores_pack_size(const pyinf_tensor* left, const pyinf_tensor* right,
                                                            size_t* bytes);
PYINF_API pyinf_status pyinf_cuda_factored_scores_pack(const pyinf_tensor* left, const pyinf_tensor* right,
                                                       void* packed, size_t packed_bytes, void* stream);
PYINF_API pyinf_status pyinf_cuda_factored_scores_packed_workspace_size(const pyinf_tensor* acts,
                                                                        const pyinf_tensor* grads,
                                                                        const pyinf_tensor* left,
                                                                        const pyinf_tensor* right, int per_token,
                                                                        size_t* bytes);
PYINF_API pyinf_status pyinf_cuda_factored_scores_split_packed(
    const pyinf_tensor* acts, const pyinf_tensor* grads, const pyinf_tensor* left, const pyinf_tensor* right,
    const void* packed, size_t packed_bytes, const pyinf_tensor* mask, int per_token, float* out, void* workspace,
    size_t workspace_bytes, void* stream);

/* Several layers' factored scores in one launch (per 16 layers, and per kernel: the WMMA
 * kernel takes the layers whose four inputs are all bf16 or all fp16, one launch per dtype;
 * the others take the fp32 FMA kernel). A model's small layers (GPT-2 sized) each fill only
 * part of the GPU and would each pay a launch; grouped, they are scored as one grid.
 * Each problem is a call of pyinf_cuda_factored_scores (its own shapes, strides, dtypes,
 * mask and output; every problem is checked before anything is launched, and an error names
 * the problem's index). Document scores of few documents and queries are split over token
 * ranges as in pyinf_cuda_factored_scores_split, sized for the whole group, which needs the
 * workspace pyinf_cuda_factored_scores_grouped_workspace_size reports (0 when nothing is
 * split). The Hopper kernel (pyinf_cuda_factored_scores_kernel) is not used by grouped calls. */
typedef struct pyinf_factored_problem {
  const pyinf_tensor* acts;  /* [N, T, d_in] */
  const pyinf_tensor* grads; /* [N, T, d_out] */
  const pyinf_tensor* left;  /* [Q, d_out, r] */
  const pyinf_tensor* right; /* [Q, d_in, r] */
  const pyinf_tensor* mask;  /* [N, T] or NULL */
  float* out;                /* [N, Q], or [N, T, Q] for per-token scores */
} pyinf_factored_problem;

/* The CPU twin: every problem checked first, then scored one after another. */
PYINF_API pyinf_status pyinf_cpu_factored_scores_grouped(const pyinf_factored_problem* problems, int count,
                                                         int per_token);
PYINF_API pyinf_status pyinf_cuda_factored_scores_grouped_workspace_size(const pyinf_factored_problem* problems,
                                                                         int count, int per_token, size_t* bytes);
PYINF_API pyinf_status pyinf_cuda_factored_scores_grouped(const pyinf_factored_problem* problems, int count,
                                                          int per_token, void* workspace, size_t workspace_bytes,
                                                          void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* PYINF_PYINF_H_ */
