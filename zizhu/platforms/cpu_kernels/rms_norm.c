/* RMSNorm in fp32: out = x * rsqrt(mean(x^2) + eps) * w. torch runs this as five operators on
 * CPU; a decode step normalises about four rows per layer, so the dispatch is the whole cost. */
#include <stdint.h>

#include "simd.h"

void rms_norm_f32(const float* x, int64_t x_stride, const float* w, float* out, int64_t rows, int64_t dim,
                  float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * dim >= 65536)
    for (int64_t r = 0; r < rows; r++) rms_norm_row(x + r * x_stride, w, out + r * dim, dim, eps);
}
