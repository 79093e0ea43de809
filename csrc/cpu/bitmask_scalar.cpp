// Portable CPU kernels of the bitmask format (any compiler, any CPU): set bits are walked
// one by one. bitmask_avx512.cpp holds the fast ones; these define the results they match.
#include <cstddef>
#include <cstring>

#include "bitmask.h"

namespace sparsekit {
namespace bitmask_scalar {
namespace {

inline float value_at(const BitmaskArgs& a, int64_t i) {
  return a.bf16 ? bf16_to_float(static_cast<const uint16_t*>(a.values)[i])
                : static_cast<const float*>(a.values)[i];
}

// Calls f(column, index into values) for every kept entry of row r, in order.
template <typename F>
inline void for_each_kept(const BitmaskArgs& a, int64_t r, F&& f) {
  const uint16_t* mk = a.mask + r * a.chunks;
  int64_t p = a.offsets[r];
  for (int64_t c = 0; c < a.chunks; ++c) {
    uint32_t m = mk[c];
    while (m != 0) {
      f(c * kChunk + __builtin_ctz(m), p++);
      m &= m - 1;
    }
  }
}

int64_t first_bad_row(const BitmaskArgs& a, int64_t r0, int64_t r1, uint16_t tail) {
  for (int64_t r = r0; r < r1; ++r) {
    if (!bitmask_row_ok(a.mask + r * a.chunks, a.chunks, tail, a.offsets[r + 1] - a.offsets[r],
                        bitmask_popcount64)) {
      return r;
    }
  }
  return -1;
}

void forward_small(const BitmaskArgs& a, int64_t r0, int64_t r1, float*) {
  for (int64_t r = r0; r < r1; ++r) {
    float acc[kBitmaskSmallBatch] = {};
    for_each_kept(a, r, [&](int64_t col, int64_t p) {
      const float w = value_at(a, p);
      for (int64_t b = 0; b < a.batch; ++b) acc[b] += w * a.x[b * a.ldx + col];
    });
    const float bias = a.bias != nullptr ? a.bias[r] : 0.0f;
    for (int64_t b = 0; b < a.batch; ++b) a.y[b * a.ldy + r] = acc[b] + bias;
  }
}

void forward(const BitmaskArgs& a, int64_t r0, int64_t r1, float*) {
  for (int64_t r = r0; r < r1; ++r) {
    float* y = a.out + r * a.ld;
    const float bias = a.bias != nullptr ? a.bias[r] : 0.0f;
    for (int64_t b = 0; b < a.ld; ++b) y[b] = bias;
    for_each_kept(a, r, [&](int64_t col, int64_t p) {
      const float w = value_at(a, p);
      const float* x = a.xT + col * a.ld;
      for (int64_t b = 0; b < a.ld; ++b) y[b] += w * x[b];
    });
  }
}

void grad_input(const BitmaskArgs& a, int64_t r0, int64_t r1, float*) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* gy = a.gyT + r * a.ld;
    for_each_kept(a, r, [&](int64_t col, int64_t p) {
      const float w = value_at(a, p);
      float* gx = a.out + col * a.ld;
      for (int64_t b = 0; b < a.ld; ++b) gx[b] += w * gy[b];
    });
  }
}

void sddmm(const BitmaskArgs& a, int64_t r0, int64_t r1, float*) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* gy = a.gyT + r * a.ld;
    for_each_kept(a, r, [&](int64_t col, int64_t p) {
      const float* x = a.xT + col * a.ld;
      float s = 0.0f;
      for (int64_t b = 0; b < a.ld; ++b) s += gy[b] * x[b];
      a.out[p] = a.first ? s : a.out[p] + s;
    });
  }
}

}  // namespace
}  // namespace bitmask_scalar

namespace {

template <typename T>
void decompress_rows_t(const BitmaskArgs& a, int64_t r0, int64_t r1, T* dst, int64_t k) {
  const T* src = static_cast<const T*>(a.values);
  for (int64_t r = r0; r < r1; ++r) {
    T* row = dst + r * k;
    std::memset(static_cast<void*>(row), 0, sizeof(T) * static_cast<size_t>(k));
    int64_t p = a.offsets[r];
    for (int64_t c = 0; c < a.chunks; ++c) {
      uint32_t m = a.mask[r * a.chunks + c];
      while (m != 0) {
        row[c * kChunk + __builtin_ctz(m)] = src[p++];
        m &= m - 1;
      }
    }
  }
}

}  // namespace

void bitmask_decompress_rows_scalar(const BitmaskArgs& a, int64_t r0, int64_t r1, void* dst,
                                    int64_t k, int elem) {
  switch (elem) {
    case 2: decompress_rows_t(a, r0, r1, static_cast<uint16_t*>(dst), k); break;
    case 4: decompress_rows_t(a, r0, r1, static_cast<uint32_t*>(dst), k); break;
    default: decompress_rows_t(a, r0, r1, static_cast<uint64_t*>(dst), k); break;
  }
}

const BitmaskKernels& bitmask_kernels_scalar() {
  static const BitmaskKernels k{"scalar", bitmask_scalar::first_bad_row, bitmask_scalar::forward_small, false, bitmask_scalar::forward,
                                bitmask_scalar::grad_input, bitmask_scalar::sddmm, bitmask_decompress_rows_scalar};
  return k;
}

}  // namespace sparsekit
