// Portable CPU N:M products: 8-float "vectors" as plain arrays (the compiler vectorizes
// them with the baseline ISA). The fallback when neither AVX2 nor AVX-512 is available.
#include <cstring>

#include "spmm.h"

namespace sparsekit {
namespace spmm_scalar {

struct V {
  static constexpr int kRegs = 16;
  static constexpr int kLanes = 8;
  static constexpr bool kHasForward24 = false;
  struct reg {
    float v[kLanes];
  };
  static reg zero() { return reg{}; }
  static reg load(const float* p) {
    reg r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  static void store(float* p, const reg& a) { std::memcpy(p, a.v, sizeof(a.v)); }
  static reg bcast(float x) {
    reg r;
    for (float& e : r.v) e = x;
    return r;
  }
  static reg fma(const reg& a, const reg& b, const reg& c) {
    reg r;
    for (int i = 0; i < kLanes; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  static reg mul(const reg& a, const reg& b) {
    reg r;
    for (int i = 0; i < kLanes; ++i) r.v[i] = a.v[i] * b.v[i];
    return r;
  }
  static reg add(const reg& a, const reg& b) {
    reg r;
    for (int i = 0; i < kLanes; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
  static float hsum(const reg& a) {
    float s = 0.f;
    for (float e : a.v) s += e;
    return s;
  }
  static void hsum4_add(const reg& a, const reg& b, const reg& c, const reg& d, float* out,
                        bool accumulate) {
    const float sums[4] = {hsum(a), hsum(b), hsum(c), hsum(d)};
    for (int i = 0; i < 4; ++i) out[i] = (accumulate ? out[i] : 0.f) + sums[i];
  }
  static float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
    if (exp == 0x1Fu) {
      bits = sign | 0x7F800000u | (man << 13);  // inf / NaN
    } else if (exp != 0) {
      bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      exp = 113u;
      while ((man & 0x400u) == 0) {
        man <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((man & 0x3FFu) << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
  static float half1(uint16_t h) { return half_to_float(h); }
  static void widen16(const uint16_t* in, int64_t count, bool bf16, float* out) {
    for (int64_t i = 0; i < count; ++i) out[i] = bf16 ? bf16_to_float(in[i]) : half_to_float(in[i]);
  }
};

}  // namespace spmm_scalar
}  // namespace sparsekit

#define SK_ISA_NS spmm_scalar
#include "spmm_kernels.h"
#include "conv_kernels.h"

namespace sparsekit {
const ConvKernels& conv_kernels_scalar() {
  static const ConvKernels k = spmm_scalar::make_conv_kernels(
      "scalar", std::make_integer_sequence<int, kMaxConvRegs>{});
  return k;
}

const SpmmKernels& spmm_kernels_scalar() {
  static const SpmmKernels k =
      spmm_scalar::make_kernels("scalar", std::make_integer_sequence<int, 8>{});
  return k;
}
}  // namespace sparsekit
