/* Hand-written AVX-512 kernels for gpart's per-entry work: evidence, not part of the library.
 *
 * gpart is pure PyTorch, so its CPU kernels are what Inductor generates, and Inductor emits a
 * gather as a scalar loop of 16 loads per vector. These kernels do the same arithmetic with the
 * hardware gather (vgatherdps) to separate "this CPU cannot" from "pure PyTorch cannot"
 * (benchmarks/bench_native.py, which checks every output against gpart's own bit for bit).
 *
 * All pointers are contiguous; n is a multiple of 16; 0 < d <= 2**21 (the general-d modulo below
 * goes through doubles, like gpart's own for such d).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define GOLDEN 0x9E3779B97F4A7C15ULL

/* SplitMix64's output function on 8 lanes: spec/method.md, "Group assignment". */
static inline __m512i splitmix(__m512i z) {
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)),
                           _mm512_set1_epi64((int64_t)0xBF58476D1CE4E5B9ULL));
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)),
                           _mm512_set1_epi64((int64_t)0x94D049BB133111EBULL));
    return _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
}

/* Unsigned z mod d: a mask when d = 2**k, else gpart's split modulo (partition._umod_split) in
 * double: x = hi * (2**32 mod d) + lo is exact below 2**53, its double quotient is off by at most
 * one, and one correction each way fixes it. */
static inline __m256i group(__m512i z, int64_t d, __m512d dd, __m512d inv, __m512d r32) {
    if ((d & (d - 1)) == 0) return _mm512_cvtepi64_epi32(_mm512_and_si512(z, _mm512_set1_epi64(d - 1)));
    __m512d hi = _mm512_cvtepu64_pd(_mm512_srli_epi64(z, 32));
    __m512d lo = _mm512_cvtepu64_pd(_mm512_and_si512(z, _mm512_set1_epi64(0xffffffffLL)));
    __m512d x = _mm512_fmadd_pd(hi, r32, lo);
    __m512d q = _mm512_roundscale_pd(_mm512_mul_pd(x, inv), _MM_FROUND_TO_NEG_INF);
    __m512d r = _mm512_fnmadd_pd(q, dd, x);
    r = _mm512_mask_add_pd(r, _mm512_cmp_pd_mask(r, _mm512_setzero_pd(), _CMP_LT_OQ), r, dd);
    r = _mm512_mask_sub_pd(r, _mm512_cmp_pd_mask(r, dd, _CMP_GE_OQ), r, dd);
    return _mm512_cvttpd_epi32(r);
}

/* w = w0 + table[g(seed + start + i)]: the fused forward (and backward's recompute). */
void fused(const float *w0, const float *table, float *w, int64_t n, uint64_t seed, uint64_t start,
           int64_t d) {
    const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    const __m512d dd = _mm512_set1_pd((double)d), inv = _mm512_set1_pd(1.0 / (double)d);
    const __m512d r32 = _mm512_set1_pd((double)((1ULL << 32) % (uint64_t)d));
    const uint64_t base = seed + start + GOLDEN;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i += 16) {
        __m256i a = group(splitmix(_mm512_add_epi64(_mm512_set1_epi64(base + i), lane)), d, dd, inv, r32);
        __m256i b = group(splitmix(_mm512_add_epi64(_mm512_set1_epi64(base + i + 8), lane)), d, dd, inv, r32);
        __m512i ids = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
        __m512 t = _mm512_i32gather_ps(ids, table, 4);
        _mm512_storeu_ps(w + i, _mm512_add_ps(_mm512_loadu_ps(w0 + i), t));
    }
}

/* w = w0 + table[ids] with the ids in memory: the floor of a cached-ids path. */
void gather(const float *w0, const float *table, const int32_t *ids, float *w, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i += 16) {
        __m512 t = _mm512_i32gather_ps(_mm512_loadu_si512(ids + i), table, 4);
        _mm512_storeu_ps(w + i, _mm512_add_ps(_mm512_loadu_ps(w0 + i), t));
    }
}

/* acc[h, ids[i]] += g[i] for i in part h of `parts` (1 or 2), each part in entry order: gpart's
 * segment sum (the parts run on their own threads; no vector form: entries of one vector may
 * share a group). */
void segment_sum(const float *g, const int64_t *ids, float *acc, int64_t n, int64_t d, int parts) {
    const int64_t len = n / parts;
#pragma omp parallel for schedule(static) num_threads(parts)
    for (int h = 0; h < parts; ++h) {
        float *a = acc + h * d;
        for (int64_t i = h * len; i < (h + 1) * len; ++i) a[ids[i]] += g[i];
    }
}

/* The OpenMP runtime of this library is not torch's: the caller sets its thread count. */
void set_threads(int n) { omp_set_num_threads(n); }
