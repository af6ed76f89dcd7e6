/* The dictionary linear for a few tokens (decode), straight from the packed format (x86-64, AVX-512F):
 *
 *     z[t, a] = sum_i  dictionary[a, i] * x[t, i]                                          (stage 1)
 *     y[t, o] = sum over the set bits a of bitmask row o:  values[o, j(a)] * z[t, a]   (+ bias[o])
 *
 * where j(a) counts the set bits before a (values are stored in increasing atom order, see
 * spadi_ao/format.py). Each 16-slot chunk of a row expands its next popcount(bits) values into the set
 * lanes and multiplies them with 16 entries of z, so the kernel reads exactly the stored bytes: the values
 * and one bit per slot. Stage 1 is a plain streaming GEMV. Each stage splits its rows evenly over OpenMP
 * threads (the same libgomp runtime torch uses); one parallel region runs both, so a decode step pays one
 * call and one thread wake-up per layer.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Software prefetch distance in the streams: 4 KiB ahead raised the DRAM throughput of the codes of a cold
   1536 x 445 layer from 8 to 11 GB/s per thread (the variable stride defeats the hardware prefetcher),
   and stage 1's by 1-5 %. */
#define PREFETCH_FLOATS 1024

static inline __m512 expand_values(const float **values, __mmask16 bits) {
    int count = __builtin_popcount(bits);
    __m512 packed = _mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1u), *values);
    *values += count;
    return _mm512_maskz_expand_ps(bits, packed);
}

/* Whether a bitmask row has exactly s bits set and none at or past slot k: the kernel reads s values and
   z entries below k only, so a malformed row is refused instead of read out of bounds. */
static int row_is_valid(const uint8_t *mask, int64_t nbytes, int64_t s, int64_t k) {
    int64_t count = 0, i = 0;
    for (; i + 8 <= nbytes; i += 8) {
        uint64_t word;
        memcpy(&word, mask + i, 8);
        count += __builtin_popcountll(word);
    }
    for (; i < nbytes; ++i) count += __builtin_popcount(mask[i]);
    int spare = (int)(nbytes * 8 - k);
    return count == s && (spare == 0 || (mask[nbytes - 1] >> (8 - spare)) == 0);
}

/* One output row for T tokens at once; two accumulators per token hide the FMA latency. z rows have
   stride k. Chunks that lie wholly inside the row load z unmasked; the last partial one is masked. */
#define ROW_TILE(T)                                                                                        \
    static void row_tile_##T(const float *z, int64_t k, const float *v, const uint8_t *mask, int64_t nbytes, \
                             float *sums) {                                                                \
        __m512 even[T], odd[T];                                                                            \
        for (int t = 0; t < T; ++t) even[t] = odd[t] = _mm512_setzero_ps();                               \
        int64_t whole = k / 16, c = 0;                                                                     \
        for (; c + 1 < whole; c += 2) {                                                                    \
            uint16_t bits0, bits1;                                                                         \
            memcpy(&bits0, mask + 2 * c, 2);                                                               \
            memcpy(&bits1, mask + 2 * c + 2, 2);                                                           \
            _mm_prefetch((const char *)(v + PREFETCH_FLOATS), _MM_HINT_T0);                                \
            __m512 v0 = expand_values(&v, bits0), v1 = expand_values(&v, bits1);                           \
            for (int t = 0; t < T; ++t) {                                                                  \
                even[t] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(z + t * k + 16 * c), even[t]);               \
                odd[t] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(z + t * k + 16 * c + 16), odd[t]);            \
            }                                                                                              \
        }                                                                                                  \
        for (; c < whole; ++c) {                                                                           \
            uint16_t bits0;                                                                                \
            memcpy(&bits0, mask + 2 * c, 2);                                                               \
            __m512 v0 = expand_values(&v, bits0);                                                          \
            for (int t = 0; t < T; ++t)                                                                    \
                even[t] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(z + t * k + 16 * c), even[t]);               \
        }                                                                                                  \
        if (16 * c < k) {                                                                                  \
            unsigned high = 2 * c + 1 < nbytes ? mask[2 * c + 1] : 0u;                                     \
            __mmask16 bits0 = (__mmask16)(mask[2 * c] | (high << 8));                                      \
            __m512 v0 = expand_values(&v, bits0);                                                          \
            for (int t = 0; t < T; ++t)                                                                    \
                even[t] = _mm512_fmadd_ps(v0, _mm512_maskz_loadu_ps(bits0, z + t * k + 16 * c), even[t]);  \
        }                                                                                                  \
        for (int t = 0; t < T; ++t) sums[t] = _mm512_reduce_add_ps(_mm512_add_ps(even[t], odd[t]));        \
    }

ROW_TILE(1)
ROW_TILE(2)
ROW_TILE(4)

static int64_t rows(const float *z, int64_t tokens, int64_t k, const float *values, int64_t s,
                    const uint8_t *bitmask, int64_t nbytes, const float *bias, float *y, int64_t out,
                    int64_t begin, int64_t end) {
    int64_t invalid = 0;
    float sums[4];
    for (int64_t o = begin; o < end; ++o) {
        const uint8_t *mask = bitmask + o * nbytes;
        const float *v = values + o * s;
        if (!row_is_valid(mask, nbytes, s, k)) {
            ++invalid;
            continue;
        }
        float b = bias ? bias[o] : 0.0f;
        int64_t t = 0;
        for (; t + 4 <= tokens; t += 4) {
            row_tile_4(z + t * k, k, v, mask, nbytes, sums);
            for (int i = 0; i < 4; ++i) y[(t + i) * out + o] = sums[i] + b;
        }
        for (; t + 2 <= tokens; t += 2) {
            row_tile_2(z + t * k, k, v, mask, nbytes, sums);
            for (int i = 0; i < 2; ++i) y[(t + i) * out + o] = sums[i] + b;
        }
        for (; t < tokens; ++t) {
            row_tile_1(z + t * k, k, v, mask, nbytes, sums);
            y[t * out + o] = sums[0] + b;
        }
    }
    return invalid;
}

static void share(int64_t n, int64_t *begin, int64_t *end) {
    int64_t team = omp_get_num_threads(), part = (n + team - 1) / team;
    *begin = omp_get_thread_num() * part;
    *end = *begin + part < n ? *begin + part : n;
}

/* z (tokens, k), values (out, s), bitmask (out, ceil(k / 8)), bias (out) or NULL, y (tokens, out); all
   contiguous float32 / uint8. Returns the number of malformed bitmask rows (their outputs are not written). */
int64_t spadi_codes_gemv(const float *z, int64_t tokens, int64_t k, const float *values, int64_t s,
                         const uint8_t *bitmask, const float *bias, float *y, int64_t out, int threads) {
    int64_t nbytes = (k + 7) / 8, invalid = 0;
#pragma omp parallel num_threads(threads) reduction(+ : invalid)
    {
        int64_t begin, end;
        share(out, &begin, &end);
        if (begin < end) invalid += rows(z, tokens, k, values, s, bitmask, nbytes, bias, y, out, begin, end);
    }
    return invalid;
}

/* Stage 1 for atoms [begin, end): one dictionary row at a time against up to 4 tokens. */
#define ATOM_TILE(T)                                                                                       \
    static void atom_tile_##T(const float *x, int64_t in, const float *row, float *sums) {                \
        __m512 acc[T];                                                                                     \
        for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();                                          \
        int64_t i = 0;                                                                                     \
        for (; i + 16 <= in; i += 16) {                                                                    \
            _mm_prefetch((const char *)(row + i + PREFETCH_FLOATS), _MM_HINT_T0);                          \
            __m512 d = _mm512_loadu_ps(row + i);                                                           \
            for (int t = 0; t < T; ++t) acc[t] = _mm512_fmadd_ps(d, _mm512_loadu_ps(x + t * in + i), acc[t]); \
        }                                                                                                  \
        if (i < in) {                                                                                      \
            __mmask16 rest = (__mmask16)((1u << (in - i)) - 1u);                                           \
            __m512 d = _mm512_maskz_loadu_ps(rest, row + i);                                               \
            for (int t = 0; t < T; ++t)                                                                    \
                acc[t] = _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(rest, x + t * in + i), acc[t]);          \
        }                                                                                                  \
        for (int t = 0; t < T; ++t) sums[t] = _mm512_reduce_add_ps(acc[t]);                                \
    }

ATOM_TILE(1)
ATOM_TILE(2)
ATOM_TILE(4)


/* Stage 1 for one token (decode proper): four dictionary rows at once, four independent accumulator chains
   (2-3 % faster than one row at a time on cold SmolLM2 layers). */
static void atom_quad(const float *x, int64_t in, const float *row, float *sums) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    int64_t i = 0;
    for (; i + 16 <= in; i += 16) {
        __m512 xv = _mm512_loadu_ps(x + i);
        _mm_prefetch((const char *)(row + i + PREFETCH_FLOATS), _MM_HINT_T0);
        _mm_prefetch((const char *)(row + in + i + PREFETCH_FLOATS), _MM_HINT_T0);
        _mm_prefetch((const char *)(row + 2 * in + i + PREFETCH_FLOATS), _MM_HINT_T0);
        _mm_prefetch((const char *)(row + 3 * in + i + PREFETCH_FLOATS), _MM_HINT_T0);
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(row + i), xv, acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(row + in + i), xv, acc1);
        acc2 = _mm512_fmadd_ps(_mm512_loadu_ps(row + 2 * in + i), xv, acc2);
        acc3 = _mm512_fmadd_ps(_mm512_loadu_ps(row + 3 * in + i), xv, acc3);
    }
    if (i < in) {
        __mmask16 rest = (__mmask16)((1u << (in - i)) - 1u);
        __m512 xv = _mm512_maskz_loadu_ps(rest, x + i);
        acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(rest, row + i), xv, acc0);
        acc1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(rest, row + in + i), xv, acc1);
        acc2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(rest, row + 2 * in + i), xv, acc2);
        acc3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(rest, row + 3 * in + i), xv, acc3);
    }
    sums[0] = _mm512_reduce_add_ps(acc0);
    sums[1] = _mm512_reduce_add_ps(acc1);
    sums[2] = _mm512_reduce_add_ps(acc2);
    sums[3] = _mm512_reduce_add_ps(acc3);
}

static void atoms(const float *x, int64_t tokens, int64_t in, const float *dictionary, int64_t k, float *z,
                  int64_t begin, int64_t end) {
    float sums[4];
    int64_t a = begin;
    if (tokens == 1)
        for (; a + 4 <= end; a += 4) atom_quad(x, in, dictionary + a * in, z + a);
    for (; a < end; ++a) {
        const float *row = dictionary + a * in;
        int64_t t = 0;
        for (; t + 4 <= tokens; t += 4) {
            atom_tile_4(x + t * in, in, row, sums);
            for (int i = 0; i < 4; ++i) z[(t + i) * k + a] = sums[i];
        }
        for (; t + 2 <= tokens; t += 2) {
            atom_tile_2(x + t * in, in, row, sums);
            for (int i = 0; i < 2; ++i) z[(t + i) * k + a] = sums[i];
        }
        for (; t < tokens; ++t) {
            atom_tile_1(x + t * in, in, row, sums);
            z[t * k + a] = sums[0];
        }
    }
}

/* Both stages: x (tokens, in), dictionary (k, in), then as spadi_codes_gemv. Returns the number of malformed
   bitmask rows, or -1 if the scratch for z could not be allocated. */
int64_t spadi_dictionary_decode(const float *x, int64_t tokens, int64_t in, const float *dictionary, int64_t k,
                                const float *values, int64_t s, const uint8_t *bitmask, const float *bias, float *y,
                                int64_t out, int threads) {
    float *z = malloc((size_t)(tokens * k > 0 ? tokens * k : 1) * sizeof(float));
    if (!z) return -1;
    int64_t nbytes = (k + 7) / 8, invalid = 0;
#pragma omp parallel num_threads(threads) reduction(+ : invalid)
    {
        int64_t begin, end;
        share(k, &begin, &end);
        if (begin < end) atoms(x, tokens, in, dictionary, k, z, begin, end);
#pragma omp barrier
        share(out, &begin, &end);
        if (begin < end) invalid += rows(z, tokens, k, values, s, bitmask, nbytes, bias, y, out, begin, end);
    }
    free(z);
    return invalid;
}
