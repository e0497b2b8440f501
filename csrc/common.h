// Internal helpers shared by the CPU and CUDA implementations (not installed).
#pragma once

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "pyinf/pyinf.h"

namespace pyinf {

// Records `msg` as this thread's last error and returns `status`.
pyinf_status fail(pyinf_status status, const std::string& msg);
void clear_error();

// A workspace or packed-factor buffer must be 16-byte aligned (cudaMalloc's and torch's
// allocations are): the kernels read it as floats, and the Hopper kernel's TMA descriptors
// need 16 bytes, whose failed encoding CuTe only asserts (nothing in a release build: the
// kernel would then fault on the device, after the call returned success).
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

inline pyinf_status check_aligned(const char* fn, const char* what, const void* p) {
  if (p != nullptr && !aligned16(p))
    return fail(PYINF_ERROR_WORKSPACE, std::string(fn) + ": '" + what + "' must be 16-byte aligned");
  return PYINF_SUCCESS;
}

// The largest size, or product of sizes, the C API accepts: 2^60 elements (no real tensor
// comes near; stride-0 views can claim more). A bound below INT64_MAX, so that the
// implementations can count a checked size's fp32 / fp64 bytes, add a few such counts or
// round one up to a tile in int64 / size_t without overflowing.
constexpr int64_t kMaxSize = int64_t(1) << 60;

// The product of sizes >= 0, formed left to right as the implementations form it; false
// when it, or any partial product, exceeds kMaxSize (a zero factor later does not excuse
// an overflowed prefix: the code may form that prefix on its own, e.g. N * T).
inline bool size_product(std::initializer_list<int64_t> factors, int64_t* out = nullptr) {
  int64_t p = 1;
  for (int64_t f : factors) {
    if (f < 0 || f > kMaxSize || (p != 0 && f > kMaxSize / p)) return false;
    p *= f;
  }
  if (out) *out = p;
  return true;
}

// Call only once check_input has checked the sizes (size_product(shape) holds).
inline int64_t numel(const pyinf_tensor& t) {
  int64_t n = 1;
  for (int i = 0; i < t.ndim; ++i) n *= t.shape[i];
  return n;
}

// Shapes after validation.
struct Dims {
  int64_t n = 0, t = 0, d_in = 0, d_out = 0, q = 0, r = 0;
};

// Argument checks shared by both devices; each returns PYINF_SUCCESS or records why not.
pyinf_status check_input(const char* op, const char* name, const pyinf_tensor* t, int ndim);
pyinf_status check_mask(const char* op, const pyinf_tensor* mask, int64_t n, int64_t t);
pyinf_status check_out(const char* op, const float* out, int64_t count);
// Fails unless size_product(factors) holds; `what` names the product for the message
// ("N*T*Q"), whose factors, the shape, it lists.
pyinf_status check_sizes(const char* op, const char* what, std::initializer_list<int64_t> factors);

pyinf_status validate_covariance(const pyinf_tensor* x, const pyinf_tensor* mask, const float* out, Dims* d);
pyinf_status validate_rotated(const char* op, const pyinf_tensor* acts, const pyinf_tensor* grads,
                              const pyinf_tensor* q_a, const pyinf_tensor* q_s, const pyinf_tensor* lambdas,
                              float damping, const pyinf_tensor* mask, const float* out, Dims* d);
pyinf_status validate_tokens(const char* op, const pyinf_tensor* acts, const pyinf_tensor* grads, Dims* d);
// left [Q, d_out, r] and right [Q, d_in, r]; fills d's q, r, d_out, d_in.
pyinf_status validate_factor_pair(const char* op, const pyinf_tensor* left, const pyinf_tensor* right, Dims* d);
pyinf_status validate_factored_shapes(const pyinf_tensor* acts, const pyinf_tensor* grads, const pyinf_tensor* left,
                                      const pyinf_tensor* right, Dims* d);
pyinf_status validate_factored(const pyinf_tensor* acts, const pyinf_tensor* grads, const pyinf_tensor* left,
                               const pyinf_tensor* right, const pyinf_tensor* mask, int per_token,
                               const float* out, Dims* d);
// The problems of a grouped call (fn names the entry point): each one's shapes (with_outputs:
// also its mask and output), problem i's error reported as such; dims (or NULL) gets their Dims.
pyinf_status validate_factored_group(const char* fn, const pyinf_factored_problem* problems, int count,
                                     int per_token, bool with_outputs, std::vector<Dims>* dims);

// Host-side element conversion (bf16 / fp16 bit patterns to float).
inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      u = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float load_host(const void* p, pyinf_dtype dt, int64_t i) {
  switch (dt) {
    case PYINF_FLOAT32: return static_cast<const float*>(p)[i];
    case PYINF_BFLOAT16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    case PYINF_FLOAT16: return fp16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return 0.0f;
  }
}

}  // namespace pyinf
