// The sparse MMA of the 2:4 kernels: d += A (2:4 sparse, 16 x 32 stored as 16 x 16) * B
// (32 x 8), f16 or bf16 in, f32 accumulate, metadata word e, sparsity selector 0.
//
// Which PTX instruction spells it depends on the toolkit:
//   - `mma.sp::ordered_metadata` (PTX ISA 8.5, CUDA 12.5 and newer) states that the two
//     indices of every group are sorted, which is what the canonical format stores;
//   - plain `mma.sp` (PTX ISA 7.0, CUDA 11.0 and newer) is the same instruction on sm_80
//     and sm_90 with the same metadata (sorted metadata is valid there too).
// Toolkits before 12.5 reject the first spelling, so they get the second (newer ptxas
// only advises the first for future architectures); defining
// SPARSEKIT_SP24_PLAIN_MMA_SP forces it (a test compiles that variant).
//
// No torch header here, so the header compiles on its own in seconds.
#pragma once

#include <cstdint>

#if !defined(SPARSEKIT_SP24_PLAIN_MMA_SP) && defined(__CUDACC_VER_MAJOR__) && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5))
#define SPARSEKIT_SP24_ORDERED_METADATA 1
#define SPARSEKIT_SP24_MMA "mma.sp::ordered_metadata"
#else
#define SPARSEKIT_SP24_ORDERED_METADATA 0
#define SPARSEKIT_SP24_MMA "mma.sp"
#endif

namespace sparsekit {
namespace sp24 {

// The instruction this translation unit was compiled with (build_info reports it).
constexpr const char* kMmaInstruction = SPARSEKIT_SP24_MMA;

// Volatile, like the kernels' loads: they issue every load of the next step before the
// MMAs of this one, and the compiler must not sink the loads back to their use.
#define SPARSEKIT_SP24_MMA_ASM(AB)                                                          \
  asm volatile(SPARSEKIT_SP24_MMA ".sync.aligned.m16n8k32.row.col.f32." AB "." AB         \
               ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, "               \
               "{%0, %1, %2, %3}, %12, 0x0;\n"                                               \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                             \
               : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]),    \
                 "r"(b[3]), "r"(e))

template <bool kBf16>
__device__ __forceinline__ void mma_sp(float (&d)[4], const uint4& a, const uint32_t (&b)[4],
                                       uint32_t e) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kBf16) {
    SPARSEKIT_SP24_MMA_ASM("bf16");
  } else {
    SPARSEKIT_SP24_MMA_ASM("f16");
  }
#else
  __trap();  // the launcher refuses devices below sm_80
#endif
}
#undef SPARSEKIT_SP24_MMA_ASM

}  // namespace sp24
}  // namespace sparsekit
