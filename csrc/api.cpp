// Status strings, error reporting, argument validation and the CUDA stubs of a CPU-only build.
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>

#include "common.h"

namespace pyinf {

namespace {
thread_local std::string g_last_error;

// The dtype field as the integer a caller stored: comparing a pyinf_dtype that holds none of
// the enum's values is undefined behaviour in C++ (a compiler may assume it cannot happen),
// and a C caller can store any int there.
int dtype_code(const pyinf_tensor* t) {
  std::underlying_type<pyinf_dtype>::type code;
  static_assert(sizeof code == sizeof t->dtype, "pyinf_dtype's storage");
  std::memcpy(&code, &t->dtype, sizeof code);
  return static_cast<int>(code);
}

std::string dtype_name(int code) {
  switch (code) {
    case PYINF_FLOAT32: return "float32";
    case PYINF_BFLOAT16: return "bfloat16";
    case PYINF_FLOAT16: return "float16";
    case PYINF_BOOL: return "bool";
    default: return "unknown (" + std::to_string(code) + ")";
  }
}

std::string describe(const pyinf_tensor* t) {
  std::ostringstream s;
  s << "shape [";
  for (int i = 0; i < t->ndim && i < 3; ++i) s << (i ? ", " : "") << t->shape[i];
  s << "], strides [";
  for (int i = 0; i < t->ndim && i < 3; ++i) s << (i ? ", " : "") << t->strides[i];
  s << "], dtype " << dtype_name(dtype_code(t));
  return s.str();
}

// Fails unless every element offset of a non-empty tensor, in bytes, is at most kMaxSize:
// the implementations form n * s0 + t * s1 + k * s2 (and pointer + offset) in int64 /
// pointer arithmetic. Always true of a real strided tensor; stride-0 views give 0.
pyinf_status check_extent(const std::string& where, const pyinf_tensor* t, int64_t element_bytes) {
  int64_t last = 0;  // offset of the last element, in elements
  for (int i = 0; i < t->ndim; ++i) {
    if (t->shape[i] <= 1) continue;  // its stride is never applied (a size-1 dimension's may be anything)
    int64_t span = 0;
    if (!size_product({t->shape[i] - 1, t->strides[i]}, &span) || span > kMaxSize - last)
      return fail(PYINF_ERROR_INVALID_VALUE, where + " spans more than 2^60 bytes (" + describe(t) + ")");
    last += span;
  }
  if (!size_product({last + 1, element_bytes}))
    return fail(PYINF_ERROR_INVALID_VALUE, where + " spans more than 2^60 bytes (" + describe(t) + ")");
  return PYINF_SUCCESS;
}
}  // namespace

pyinf_status fail(pyinf_status status, const std::string& msg) {
  g_last_error = msg;
  return status;
}

void clear_error() { g_last_error.clear(); }

pyinf_status check_input(const char* op, const char* name, const pyinf_tensor* t, int ndim) {
  std::string where = std::string("pyinf_") + op + ": '" + name + "'";
  if (t == nullptr) return fail(PYINF_ERROR_INVALID_VALUE, where + " is NULL");
  if (t->ndim != ndim)
    return fail(PYINF_ERROR_INVALID_VALUE, where + " must have " + std::to_string(ndim) +
                                               " dimensions, got " + std::to_string(t->ndim));
  const int dtype = dtype_code(t);
  if (dtype != PYINF_FLOAT32 && dtype != PYINF_BFLOAT16 && dtype != PYINF_FLOAT16)
    return fail(PYINF_ERROR_UNSUPPORTED_DTYPE,
                where + " must be float32, bfloat16 or float16 (" + describe(t) + ")");
  for (int i = 0; i < ndim; ++i) {
    if (t->shape[i] < 0 || t->strides[i] < 0)
      return fail(PYINF_ERROR_INVALID_VALUE, where + " has a negative size or stride (" + describe(t) + ")");
  }
  if (!size_product({t->shape[0], ndim > 1 ? t->shape[1] : 1, ndim > 2 ? t->shape[2] : 1}))
    return fail(PYINF_ERROR_INVALID_VALUE,
                where + " is too large: the product of its sizes exceeds 2^60 (" + describe(t) + ")");
  if (numel(*t) == 0) return PYINF_SUCCESS;  // nothing is read: any pointer will do
  if (t->data == nullptr) return fail(PYINF_ERROR_INVALID_VALUE, where + " has a NULL data pointer");
  return check_extent(where, t, dtype == PYINF_FLOAT32 ? 4 : 2);
}

pyinf_status check_mask(const char* op, const pyinf_tensor* mask, int64_t n, int64_t t) {
  if (mask == nullptr) return PYINF_SUCCESS;
  std::string where = std::string("pyinf_") + op + ": 'mask'";
  if (dtype_code(mask) != PYINF_BOOL)
    return fail(PYINF_ERROR_UNSUPPORTED_DTYPE, where + " must be PYINF_BOOL, got " + dtype_name(dtype_code(mask)));
  if (mask->ndim != 2 || mask->shape[0] != n || mask->shape[1] != t)
    return fail(PYINF_ERROR_INVALID_VALUE, where + " must be [N, T] = [" + std::to_string(n) + ", " +
                                               std::to_string(t) + "], got " + describe(mask));
  if (mask->strides[0] < 0 || mask->strides[1] < 0)
    return fail(PYINF_ERROR_INVALID_VALUE, where + " has a negative stride");
  if (n * t == 0) return PYINF_SUCCESS;  // nothing is read (n * t: the inputs' checked N*T)
  if (mask->data == nullptr) return fail(PYINF_ERROR_INVALID_VALUE, where + " has a NULL data pointer");
  return check_extent(where, mask, 1);
}

pyinf_status check_sizes(const char* op, const char* what, std::initializer_list<int64_t> factors) {
  if (size_product(factors)) return PYINF_SUCCESS;
  std::ostringstream s;
  s << "pyinf_" << op << ": sizes too large: " << what << " = ";
  const char* sep = "";
  for (int64_t f : factors) s << sep << f, sep = " * ";
  s << " exceeds 2^60 elements";
  return fail(PYINF_ERROR_INVALID_VALUE, s.str());
}

pyinf_status check_out(const char* op, const float* out, int64_t count) {
  if (out == nullptr && count > 0)
    return fail(PYINF_ERROR_INVALID_VALUE, std::string("pyinf_") + op + ": 'out' is NULL");
  return PYINF_SUCCESS;
}

#define PYINF_TRY(expr)                          \
  do {                                           \
    pyinf_status _s = (expr);                    \
    if (_s != PYINF_SUCCESS) return _s;          \
  } while (0)

pyinf_status validate_covariance(const pyinf_tensor* x, const pyinf_tensor* mask, const float* out, Dims* d) {
  PYINF_TRY(check_input("covariance", "x", x, 3));
  d->n = x->shape[0];
  d->t = x->shape[1];
  d->d_in = x->shape[2];
  PYINF_TRY(check_mask("covariance", mask, d->n, d->t));
  PYINF_TRY(check_sizes("covariance", "d*d", {d->d_in, d->d_in}));  // the output
  return check_out("covariance", out, d->d_in * d->d_in);
}

pyinf_status validate_tokens(const char* op, const pyinf_tensor* acts, const pyinf_tensor* grads, Dims* d) {
  PYINF_TRY(check_input(op, "acts", acts, 3));
  PYINF_TRY(check_input(op, "grads", grads, 3));
  if (acts->shape[0] != grads->shape[0] || acts->shape[1] != grads->shape[1])
    return fail(PYINF_ERROR_INVALID_VALUE, std::string("pyinf_") + op +
                                               ": 'acts' and 'grads' must share [N, T], got acts " +
                                               describe(acts) + " and grads " + describe(grads));
  d->n = acts->shape[0];
  d->t = acts->shape[1];
  d->d_in = acts->shape[2];
  d->d_out = grads->shape[2];
  return PYINF_SUCCESS;
}

static pyinf_status check_shape2(const char* op, const char* name, const pyinf_tensor* t, int64_t a, int64_t b) {
  PYINF_TRY(check_input(op, name, t, 2));
  if (t->shape[0] != a || t->shape[1] != b)
    return fail(PYINF_ERROR_INVALID_VALUE, std::string("pyinf_") + op + ": '" + name + "' must be [" +
                                               std::to_string(a) + ", " + std::to_string(b) + "], got " +
                                               describe(t));
  return PYINF_SUCCESS;
}

pyinf_status validate_rotated(const char* op, const pyinf_tensor* acts, const pyinf_tensor* grads,
                              const pyinf_tensor* q_a, const pyinf_tensor* q_s, const pyinf_tensor* lambdas,
                              float damping, const pyinf_tensor* mask, const float* out, Dims* d) {
  PYINF_TRY(validate_tokens(op, acts, grads, d));
  PYINF_TRY(check_shape2(op, "q_a", q_a, d->d_in, d->d_in));
  PYINF_TRY(check_shape2(op, "q_s", q_s, d->d_out, d->d_out));
  const bool self = std::string(op) == "self_influence";
  if (self) {
    PYINF_TRY(check_shape2(op, "lambdas", lambdas, d->d_out, d->d_in));
    if (!(damping >= 0.0f))
      return fail(PYINF_ERROR_INVALID_VALUE, std::string("pyinf_") + op + ": 'damping' must be >= 0");
  }
  PYINF_TRY(check_mask(op, mask, d->n, d->t));
  PYINF_TRY(check_sizes(op, "d_out*d_in", {d->d_out, d->d_in}));  // eigen_correction's output, the CPU sums
  return check_out(op, out, self ? d->n : d->d_out * d->d_in);
}

pyinf_status validate_factor_pair(const char* op, const pyinf_tensor* left, const pyinf_tensor* right, Dims* d) {
  PYINF_TRY(check_input(op, "left", left, 3));
  PYINF_TRY(check_input(op, "right", right, 3));
  if (left->shape[0] != right->shape[0] || left->shape[2] != right->shape[2])
    return fail(PYINF_ERROR_INVALID_VALUE, std::string("pyinf_") + op +
                                               ": 'left' [Q, d_out, r] and 'right' [Q, d_in, r] must share Q "
                                               "and r, got left " + describe(left) + " and right " +
                                               describe(right));
  d->q = left->shape[0];
  d->r = left->shape[2];
  d->d_out = left->shape[1];
  d->d_in = right->shape[1];
  return check_sizes(op, "Q*r", {d->q, d->r});  // the factor columns (a product of no tensor when d is 0)
}

pyinf_status validate_factored_shapes(const pyinf_tensor* acts, const pyinf_tensor* grads, const pyinf_tensor* left,
                                      const pyinf_tensor* right, Dims* d) {
  const char* op = "factored_scores";
  PYINF_TRY(validate_tokens(op, acts, grads, d));
  Dims f;
  PYINF_TRY(validate_factor_pair(op, left, right, &f));
  if (f.d_out != d->d_out)
    return fail(PYINF_ERROR_INVALID_VALUE, std::string("pyinf_") + op + ": 'left' must be [Q, d_out=" +
                                               std::to_string(d->d_out) + ", r], got " + describe(left));
  if (f.d_in != d->d_in)
    return fail(PYINF_ERROR_INVALID_VALUE, std::string("pyinf_") + op + ": 'right' must be [Q, d_in=" +
                                               std::to_string(d->d_in) + ", r], got " + describe(right));
  d->q = f.q;
  d->r = f.r;
  // the per-token scores (the CPU keeps them for document scores too) and the document scores
  PYINF_TRY(check_sizes(op, "N*T*Q", {d->n, d->t, d->q}));
  return check_sizes(op, "N*Q", {d->n, d->q});
}

pyinf_status validate_factored(const pyinf_tensor* acts, const pyinf_tensor* grads, const pyinf_tensor* left,
                               const pyinf_tensor* right, const pyinf_tensor* mask, int per_token,
                               const float* out, Dims* d) {
  const char* op = "factored_scores";
  PYINF_TRY(validate_factored_shapes(acts, grads, left, right, d));
  PYINF_TRY(check_mask(op, mask, d->n, d->t));
  return check_out(op, out, per_token ? d->n * d->t * d->q : d->n * d->q);
}

pyinf_status validate_factored_group(const char* fn, const pyinf_factored_problem* problems, int count,
                                     int per_token, bool with_outputs, std::vector<Dims>* dims) {
  if (count < 0) return fail(PYINF_ERROR_INVALID_VALUE, std::string(fn) + ": count is negative");
  if (count > 0 && problems == nullptr) return fail(PYINF_ERROR_INVALID_VALUE, std::string(fn) + ": 'problems' is NULL");
  for (int i = 0; i < count; ++i) {
    const pyinf_factored_problem& p = problems[i];
    Dims d;
    const pyinf_status s = with_outputs
                               ? validate_factored(p.acts, p.grads, p.left, p.right, p.mask, per_token, p.out, &d)
                               : validate_factored_shapes(p.acts, p.grads, p.left, p.right, &d);
    if (s != PYINF_SUCCESS)
      return fail(s, std::string(fn) + ": problem " + std::to_string(i) + ": " + pyinf_last_error());
    if (dims) dims->push_back(d);
  }
  return PYINF_SUCCESS;
}

}  // namespace pyinf

extern "C" {

const char* pyinf_status_string(pyinf_status status) {
  switch (status) {
    case PYINF_SUCCESS: return "PYINF_SUCCESS: no error";
    case PYINF_ERROR_INVALID_VALUE: return "PYINF_ERROR_INVALID_VALUE: invalid shape, stride, pointer or argument";
    case PYINF_ERROR_UNSUPPORTED_DTYPE: return "PYINF_ERROR_UNSUPPORTED_DTYPE: unsupported dtype";
    case PYINF_ERROR_NOT_COMPILED: return "PYINF_ERROR_NOT_COMPILED: pyinf was built without CUDA";
    case PYINF_ERROR_CUDA: return "PYINF_ERROR_CUDA: a CUDA call failed";
    case PYINF_ERROR_WORKSPACE: return "PYINF_ERROR_WORKSPACE: workspace missing or too small";
    case PYINF_ERROR_OUT_OF_MEMORY: return "PYINF_ERROR_OUT_OF_MEMORY: host allocation failed";
    case PYINF_ERROR_INTERNAL: return "PYINF_ERROR_INTERNAL: internal error";
  }
  return "unknown pyinf_status";
}

const char* pyinf_last_error(void) { return pyinf::g_last_error.c_str(); }

int pyinf_api_version(void) { return PYINF_API_VERSION; }

#ifndef PYINF_WITH_CUDA
int pyinf_cuda_compiled(void) { return 0; }
const char* pyinf_cuda_archs(void) { return ""; }
int pyinf_cuda_sm90_compiled(void) { return 0; }

static pyinf_status not_compiled(const char* op) {
  return pyinf::fail(PYINF_ERROR_NOT_COMPILED,
                     std::string("pyinf_cuda_") + op + ": this libpyinf was built without CUDA");
}

pyinf_status pyinf_cuda_covariance(const pyinf_tensor*, const pyinf_tensor*, float*, void*) {
  return not_compiled("covariance");
}
pyinf_status pyinf_cuda_eigen_correction_workspace_size(const pyinf_tensor*, const pyinf_tensor*, size_t*) {
  return not_compiled("eigen_correction_workspace_size");
}
pyinf_status pyinf_cuda_eigen_correction(const pyinf_tensor*, const pyinf_tensor*, const pyinf_tensor*,
                                         const pyinf_tensor*, const pyinf_tensor*, float*, void*, size_t, void*) {
  return not_compiled("eigen_correction");
}
pyinf_status pyinf_cuda_self_influence_workspace_size(const pyinf_tensor*, const pyinf_tensor*, size_t*) {
  return not_compiled("self_influence_workspace_size");
}
pyinf_status pyinf_cuda_self_influence(const pyinf_tensor*, const pyinf_tensor*, const pyinf_tensor*,
                                       const pyinf_tensor*, const pyinf_tensor*, float, const pyinf_tensor*, float*,
                                       void*, size_t, void*) {
  return not_compiled("self_influence");
}
pyinf_status pyinf_cuda_factored_scores(const pyinf_tensor*, const pyinf_tensor*, const pyinf_tensor*,
                                        const pyinf_tensor*, const pyinf_tensor*, int, float*, void*) {
  return not_compiled("factored_scores");
}
pyinf_status pyinf_cuda_factored_scores_workspace_size(const pyinf_tensor*, const pyinf_tensor*,
                                                       const pyinf_tensor*, const pyinf_tensor*, int, size_t*) {
  return not_compiled("factored_scores_workspace_size");
}
pyinf_status pyinf_cuda_factored_scores_split(const pyinf_tensor*, const pyinf_tensor*, const pyinf_tensor*,
                                              const pyinf_tensor*, const pyinf_tensor*, int, float*, void*, size_t,
                                              void*) {
  return not_compiled("factored_scores_split");
}
pyinf_status pyinf_cuda_factored_scores_kernel(const pyinf_tensor*, const pyinf_tensor*, const pyinf_tensor*,
                                               const pyinf_tensor*, int, size_t, const char**) {
  return not_compiled("factored_scores_kernel");
}
pyinf_status pyinf_cuda_factored_scores_pack_size(const pyinf_tensor*, const pyinf_tensor*, size_t*) {
  return not_compiled("factored_scores_pack_size");
}
pyinf_status pyinf_cuda_factored_scores_pack(const pyinf_tensor*, const pyinf_tensor*, void*, size_t, void*) {
  return not_compiled("factored_scores_pack");
}
pyinf_status pyinf_cuda_factored_scores_packed_workspace_size(const pyinf_tensor*, const pyinf_tensor*,
                                                              const pyinf_tensor*, const pyinf_tensor*, int, size_t*) {
  return not_compiled("factored_scores_packed_workspace_size");
}
pyinf_status pyinf_cuda_factored_scores_split_packed(const pyinf_tensor*, const pyinf_tensor*, const pyinf_tensor*,
                                                     const pyinf_tensor*, const void*, size_t, const pyinf_tensor*,
                                                     int, float*, void*, size_t, void*) {
  return not_compiled("factored_scores_split_packed");
}
pyinf_status pyinf_cuda_factored_scores_grouped_workspace_size(const pyinf_factored_problem*, int, int, size_t*) {
  return not_compiled("factored_scores_grouped_workspace_size");
}
pyinf_status pyinf_cuda_factored_scores_grouped(const pyinf_factored_problem*, int, int, void*, size_t, void*) {
  return not_compiled("factored_scores_grouped");
}
#endif

}  // extern "C"
