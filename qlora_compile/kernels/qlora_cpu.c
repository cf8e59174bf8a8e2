/* Native CPU kernels for bitsandbytes' 4-bit format: blockwise quantize and dequantize.
 *
 * Built at first use by native.py (cc -O3 -march=native -ffp-contract=off -fopenmp) and called
 * through ctypes; the *_parallel entry points split whole blocks over OpenMP threads. Every result equals the vectorized torch
 * path (cpu.py) bit for bit: the same fp32 operations in the same order, no fused multiply-add.
 * With AVX-512 a 16-entry code lookup is one permute; without it a scalar loop does the same.
 *
 * Element ranges [start, stop) start on a block boundary; blocksize is a multiple of 16.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

enum { KIND_F32 = 0, KIND_F16 = 1, KIND_BF16 = 2 };

/* ---- scalar conversions (round to nearest even, as torch's .to()) ---- */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float load_f32(const void* x, int kind, int64_t i) {
    if (kind == KIND_F32) return ((const float*)x)[i];
    if (kind == KIND_BF16) return bf16_to_f32(((const uint16_t*)x)[i]);
    return (float)((const _Float16*)x)[i];
}

static inline void store_f32(void* out, int kind, int64_t i, float v) {
    if (kind == KIND_F32) ((float*)out)[i] = v;
    else if (kind == KIND_BF16) ((uint16_t*)out)[i] = f32_to_bf16(v);
    else ((_Float16*)out)[i] = (_Float16)v;
}

/* ---- dequantize: out[i] = code[q[i]] * absmax[i / blocksize], fp32, cast once ---- */
#ifdef __AVX512F__
static inline __m512 dequant16(const uint8_t* p, __m512 table) {
    __m128i bytes = _mm_loadl_epi64((const __m128i*)p);                  /* 8 bytes, 16 codes */
    __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0f));
    __m128i lo = _mm_and_si128(bytes, _mm_set1_epi8(0x0f));
    __m512i idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));      /* high nibble first */
    return _mm512_permutexvar_ps(idx, table);
}

static inline void store16(void* out, int kind, int64_t i, __m512 v) {
    if (kind == KIND_F32) {
        _mm512_storeu_ps((float*)out + i, v);
    } else if (kind == KIND_F16) {
        _mm256_storeu_si256((__m256i*)((uint16_t*)out + i), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    } else {
        /* by hand: vcvtneps2bf16 flushes subnormals to zero, torch's .to(bfloat16) does not */
        __m512i u = _mm512_castps_si512(v);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
        __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
        _mm256_storeu_si256((__m256i*)((uint16_t*)out + i), _mm512_cvtepi32_epi16(r));
    }
}
#endif

/* absmax is fp32 per block, or (nested != NULL) uint8 codes decoded as
 * code8[q] * nested[b / 256] + offset: two fp32 roundings, as bitsandbytes. */
void qc_dequantize(const uint8_t* packed, const void* absmax, const float* nested, float offset,
                   const float* code8, const float* code, void* out, int kind, int64_t blocksize,
                   int64_t start, int64_t stop) {
    for (int64_t b0 = start; b0 < stop; b0 += blocksize) {
        const int64_t b1 = b0 + blocksize < stop ? b0 + blocksize : stop;
        const int64_t b = b0 / blocksize;
        float scale;
        if (nested) {
            scale = code8[((const uint8_t*)absmax)[b]] * nested[b >> 8];
            scale = scale + offset;
        } else {
            scale = ((const float*)absmax)[b];
        }
        float table[16];
        for (int j = 0; j < 16; ++j) table[j] = code[j] * scale;
        int64_t i = b0;
#ifdef __AVX512F__
        const __m512 tv = _mm512_loadu_ps(table);
        for (; i + 16 <= b1; i += 16) store16(out, kind, i, dequant16(packed + i / 2, tv));
#endif
        for (; i < b1; ++i) {
            const uint8_t byte = packed[i / 2];
            store_f32(out, kind, i, table[(i & 1) ? (byte & 0x0f) : (byte >> 4)]);
        }
    }
}

/* ---- quantize: absmax per block, scale into [-1, 1], bucket by 15 thresholds, pack ---- */
static inline int bucket(float x, const float* bounds) {
    int q = 0;
    for (int j = 0; j < 15; ++j) q += x > bounds[j];
    return q;
}

/* Returns 1 when a non-finite value was seen in [start, stop), else 0. */
int qc_quantize(const void* x, int kind, const float* bounds, const uint8_t* nibble, uint8_t* packed,
                float* absmax, int64_t blocksize, int64_t start, int64_t stop, int64_t n) {
    int nonfinite = 0;
    for (int64_t b0 = start; b0 < stop; b0 += blocksize) {
        const int64_t b1 = b0 + blocksize < stop ? b0 + blocksize : stop;
        float am = 0.0f;
        for (int64_t i = b0; i < b1; ++i) {
            const float v = fabsf(load_f32(x, kind, i));
            nonfinite |= !(v <= 3.4028235e38f);
            am = v > am ? v : am;
        }
        const int partial = b1 - b0 < blocksize;
        const float safe = am > 1e-38f ? am : 1e-38f;
        absmax[b0 / blocksize] = partial ? safe : am; /* only the partial block stores it clamped */
        const float inv = 1.0f / safe;
        int64_t i = b0;
#ifdef __AVX512F__
        if (!partial) {
            const __m512 vinv = _mm512_set1_ps(inv), one = _mm512_set1_ps(1.0f), mone = _mm512_set1_ps(-1.0f);
            const __m512i nib = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)nibble));
            for (; i + 16 <= b1; i += 16) {
                __m512 v;
                if (kind == KIND_F32) v = _mm512_loadu_ps((const float*)x + i);
                else if (kind == KIND_BF16)
                    v = _mm512_castsi512_ps(_mm512_slli_epi32(
                        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)x + i))), 16));
                else v = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)x + i)));
                v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, vinv), mone), one);
                __m512i q = _mm512_setzero_si512();
                for (int j = 0; j < 15; ++j) {
                    __mmask16 gt = _mm512_cmp_ps_mask(v, _mm512_set1_ps(bounds[j]), _CMP_GT_OQ);
                    q = _mm512_mask_add_epi32(q, gt, q, _mm512_set1_epi32(1));
                }
                q = _mm512_permutexvar_epi32(q, nib);
                __m128i pairs = _mm512_cvtepi32_epi8(q);                 /* 16 codes as bytes */
                __m128i hi = _mm_slli_epi16(_mm_and_si128(pairs, _mm_set1_epi16(0x00ff)), 4);
                __m128i lo = _mm_srli_epi16(pairs, 8);
                __m128i bytes = _mm_packus_epi16(_mm_or_si128(hi, lo), _mm_setzero_si128());
                _mm_storel_epi64((__m128i*)(packed + i / 2), bytes);
            }
        }
#endif
        for (; i < b1; i += 2) {
            float v0 = load_f32(x, kind, i);
            v0 = partial ? v0 / safe : v0 * inv;
            v0 = v0 < -1.0f ? -1.0f : (v0 > 1.0f ? 1.0f : v0);
            float v1 = 0.0f; /* an odd total pairs the last element with a stored 0.0 */
            if (i + 1 < n) {
                v1 = load_f32(x, kind, i + 1);
                v1 = partial ? v1 / safe : v1 * inv;
                v1 = v1 < -1.0f ? -1.0f : (v1 > 1.0f ? 1.0f : v1);
            }
            packed[i / 2] = (uint8_t)((nibble[bucket(v0, bounds)] << 4) | nibble[bucket(v1, bounds)]);
        }
    }
    return nonfinite;
}

/* ---- parallel entry points: contiguous runs of whole blocks per thread ---- */
static inline void thread_range(int64_t n, int64_t blocksize, int t, int nt, int64_t* s, int64_t* e) {
    const int64_t blocks = (n + blocksize - 1) / blocksize;
    const int64_t per = (blocks + nt - 1) / nt;
    *s = t * per * blocksize;
    *e = (t + 1) * per * blocksize < n ? (t + 1) * per * blocksize : n;
}

void qc_dequantize_parallel(const uint8_t* packed, const void* absmax, const float* nested, float offset,
                            const float* code8, const float* code, void* out, int kind, int64_t blocksize,
                            int64_t n, int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        int64_t s, e;
        thread_range(n, blocksize, t, nt, &s, &e);
        if (s < e) qc_dequantize(packed, absmax, nested, offset, code8, code, out, kind, blocksize, s, e);
    }
}

int qc_quantize_parallel(const void* x, int kind, const float* bounds, const uint8_t* nibble, uint8_t* packed,
                         float* absmax, int64_t blocksize, int64_t n, int threads) {
    int nonfinite = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : nonfinite)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        int64_t s, e;
        thread_range(n, blocksize, t, nt, &s, &e);
        if (s < e) nonfinite |= qc_quantize(x, kind, bounds, nibble, packed, absmax, blocksize, s, e, n);
    }
    return nonfinite;
}
