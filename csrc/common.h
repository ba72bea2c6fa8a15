// Shared helpers of the native CPU kernels: a vectorisable exp and the extension's module init.
#pragma once

#include <cstdint>
#include <cstring>

namespace ville {

// exp(x) for x <= ~88, written so GCC vectorises the loops that call it (std::exp does not vectorise without
// -ffast-math, and -ffast-math would fold the round-to-nearest trick below). Cephes expf: x = n ln2 + r,
// |r| <= ln2 / 2, degree-5 polynomial for e^r, 2^n from the exponent bits; about 1 ulp on its range. Inputs below
// -87 (including -inf, the masked logits) give exactly 0: those terms are < 1e-38 of the largest one in every sum
// they enter, since the callers subtract a max or a log-sum-exp first.
static inline __attribute__((always_inline)) float fexp(float x) {
  float xc = x < -87.0f ? -87.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  // Round to nearest integer by adding and subtracting 1.5 * 2^23 (exact for |v| < 2^22, vectorises everywhere).
  float fx = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  float z = r * r;
  float y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
             1.6666665459e-1f) * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof(float));
  y *= pow2n;
  return x < -87.0f ? 0.0f : y;
}

}  // namespace ville

// One clone per ISA level, picked at load time (glibc ifunc) by CPU features, not CPU model (an "arch=haswell" clone
// is never picked on AMD): the hot elementwise loops get AVX-512 / AVX2 + FMA where the
// CPU has them, while the extension stays loadable on any x86-64. Other architectures get the plain build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VILLE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VILLE_CLONES
#endif
