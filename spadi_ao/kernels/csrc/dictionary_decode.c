/* The dictionary linear for a few tokens (decode), straight from the packed format (x86-64, AVX-512):
 *
 *     z[t, a] = dictionary_scale[a] * sum_i  dictionary[a, i] * x[t, i]                          (stage 1)
 *     y[t, o] = value_scale[o] * sum over the set bits a of bitmask row o:  values[o, j(a)] * z[t, a]
 *               + bias[o]
 *
 * where j(a) counts the set bits before a (values are stored in increasing atom order, see
 * spadi_ao/format.py). The dictionary and the values are float32, bfloat16 or float16 (no scale) or int8
 * with a float32 scale per row (spadi_ao/integrations/torchao.py); everything accumulates in float32, and
 * 16-bit activations are widened around the float32 stages (see "activations"). Each 16-slot chunk of a row expands its next popcount(bits)
 * values into the set lanes and multiplies them with 16 entries of z, so the kernel reads exactly the
 * stored bytes: the values and one bit per slot. Stage 1 is a plain streaming GEMV. Each stage splits its
 * rows evenly over OpenMP threads (the same libgomp runtime torch uses); one parallel region runs both, so
 * a decode step pays one call and one thread wake-up per layer.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Software prefetch distance in the streams: the codes' variable stride defeats the hardware prefetcher,
   so the kernel prefetches 4 KiB ahead itself (the distance was chosen on cold-weight timings). */
#define PREFETCH_BYTES 4096

/* 16 stored elements as float32: all of them, or only the lanes in mask. */
#define LOAD_F32(pointer, mask) _mm512_maskz_loadu_ps((mask), (pointer))
#define LOAD_I8(pointer, mask) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8((mask), (pointer))))
#define LOAD_ALL_F32(pointer) _mm512_loadu_ps(pointer)
#define LOAD_ALL_I8(pointer) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(pointer))))
#define WIDEN_BF16(halves) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16))
#define LOAD_BF16(pointer, mask) WIDEN_BF16(_mm256_maskz_loadu_epi16((mask), (pointer)))
#define LOAD_ALL_BF16(pointer) WIDEN_BF16(_mm256_loadu_si256((const __m256i *)(pointer)))
#define LOAD_F16(pointer, mask) _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((mask), (pointer)))
#define LOAD_ALL_F16(pointer) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(pointer)))

/* Element types of the stored tensors and of the activations, as spadi_ao/kernels/native.py numbers them. */
enum { F32 = 0, I8 = 1, BF16 = 2, F16 = 3 };

static inline void prefetch(const void *pointer) { _mm_prefetch((const char *)pointer + PREFETCH_BYTES, _MM_HINT_T0); }

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

static void share(int64_t n, int64_t *begin, int64_t *end) {
    int64_t team = omp_get_num_threads(), part = (n + team - 1) / team;
    *begin = omp_get_thread_num() * part;
    *end = *begin + part < n ? *begin + part : n;
}

/* ------------------------------------------------------------------------------------------- stage 2 */

/* The next popcount(bits) values, expanded into the set lanes. Float32 values expand straight from memory
   (vexpandps with a memory operand saves the masked load and register expand); int8 and 16-bit values are
   loaded, widened, then expanded. */
static inline __m512 expand_F32(const float **values, __mmask16 bits) {
    __m512 expanded = _mm512_maskz_expandloadu_ps(bits, *values);
    *values += __builtin_popcount(bits);
    return expanded;
}

#define EXPAND_WIDENED(NAME, ELEMENT)                                                                     \
    static inline __m512 expand_##NAME(const ELEMENT **values, __mmask16 bits) {                          \
        int count = __builtin_popcount(bits);                                                             \
        __m512 packed = LOAD_##NAME(*values, (__mmask16)((1u << count) - 1u));                            \
        *values += count;                                                                                 \
        return _mm512_maskz_expand_ps(bits, packed);                                                      \
    }
EXPAND_WIDENED(I8, int8_t)
EXPAND_WIDENED(BF16, uint16_t)
EXPAND_WIDENED(F16, uint16_t)

/* One output row for T tokens at once; two accumulators per token hide the FMA latency. z rows have
   stride k. Chunks that lie wholly inside the row load z unmasked; the last partial one is masked. */
#define ROW_TILE(NAME, ELEMENT, T)                                                                        \
    static void row_tile_##NAME##_##T(const float *z, int64_t k, const ELEMENT *v, const uint8_t *mask,   \
                                      int64_t nbytes, float *sums) {                                      \
        __m512 even[T], odd[T];                                                                           \
        for (int t = 0; t < T; ++t) even[t] = odd[t] = _mm512_setzero_ps();                              \
        int64_t whole = k / 16, c = 0;                                                                    \
        for (; c + 1 < whole; c += 2) {                                                                   \
            uint16_t bits0, bits1;                                                                        \
            memcpy(&bits0, mask + 2 * c, 2);                                                              \
            memcpy(&bits1, mask + 2 * c + 2, 2);                                                          \
            prefetch(v);                                                                                  \
            __m512 v0 = expand_##NAME(&v, bits0), v1 = expand_##NAME(&v, bits1);                          \
            for (int t = 0; t < T; ++t) {                                                                 \
                even[t] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(z + t * k + 16 * c), even[t]);              \
                odd[t] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(z + t * k + 16 * c + 16), odd[t]);           \
            }                                                                                             \
        }                                                                                                 \
        for (; c < whole; ++c) {                                                                          \
            uint16_t bits0;                                                                               \
            memcpy(&bits0, mask + 2 * c, 2);                                                              \
            __m512 v0 = expand_##NAME(&v, bits0);                                                         \
            for (int t = 0; t < T; ++t)                                                                   \
                even[t] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(z + t * k + 16 * c), even[t]);              \
        }                                                                                                 \
        if (16 * c < k) {                                                                                 \
            unsigned high = 2 * c + 1 < nbytes ? mask[2 * c + 1] : 0u;                                    \
            __mmask16 bits0 = (__mmask16)(mask[2 * c] | (high << 8));                                     \
            __m512 v0 = expand_##NAME(&v, bits0);                                                         \
            for (int t = 0; t < T; ++t)                                                                   \
                even[t] = _mm512_fmadd_ps(v0, _mm512_maskz_loadu_ps(bits0, z + t * k + 16 * c), even[t]); \
        }                                                                                                 \
        for (int t = 0; t < T; ++t) sums[t] = _mm512_reduce_add_ps(_mm512_add_ps(even[t], odd[t]));       \
    }

/* Output rows [begin, end) for all tokens; returns how many bitmask rows were malformed (left unwritten).
   Not inlined into the dispatcher: inlined side by side, the element types' loops compile to slower code. */
#define ROWS(NAME, ELEMENT)                                                                               \
    ROW_TILE(NAME, ELEMENT, 1)                                                                            \
    ROW_TILE(NAME, ELEMENT, 2)                                                                            \
    ROW_TILE(NAME, ELEMENT, 4)                                                                            \
    __attribute__((noinline)) static int64_t rows_##NAME(const float *z, int64_t tokens, int64_t k, const ELEMENT *values,          \
                               const float *value_scale, int64_t s, const uint8_t *bitmask, int64_t nbytes, \
                               const float *bias, float *y, int64_t out, int64_t begin, int64_t end) {     \
        int64_t invalid = 0;                                                                              \
        float sums[4];                                                                                    \
        for (int64_t o = begin; o < end; ++o) {                                                           \
            const uint8_t *mask = bitmask + o * nbytes;                                                   \
            const ELEMENT *v = values + o * s;                                                            \
            if (!row_is_valid(mask, nbytes, s, k)) {                                                      \
                ++invalid;                                                                                \
                continue;                                                                                 \
            }                                                                                             \
            float scale = value_scale ? value_scale[o] : 1.0f, b = bias ? bias[o] : 0.0f;                 \
            int64_t t = 0;                                                                                \
            for (; t + 4 <= tokens; t += 4) {                                                             \
                row_tile_##NAME##_4(z + t * k, k, v, mask, nbytes, sums);                                 \
                for (int i = 0; i < 4; ++i) y[(t + i) * out + o] = sums[i] * scale + b;                   \
            }                                                                                             \
            for (; t + 2 <= tokens; t += 2) {                                                             \
                row_tile_##NAME##_2(z + t * k, k, v, mask, nbytes, sums);                                 \
                for (int i = 0; i < 2; ++i) y[(t + i) * out + o] = sums[i] * scale + b;                   \
            }                                                                                             \
            for (; t < tokens; ++t) {                                                                     \
                row_tile_##NAME##_1(z + t * k, k, v, mask, nbytes, sums);                                 \
                y[t * out + o] = sums[0] * scale + b;                                                     \
            }                                                                                             \
        }                                                                                                 \
        return invalid;                                                                                   \
    }

ROWS(F32, float)
ROWS(I8, int8_t)
ROWS(BF16, uint16_t)
ROWS(F16, uint16_t)

static int64_t rows(const float *z, int64_t tokens, int64_t k, const void *values, int64_t values_type,
                    const float *value_scale, int64_t s, const uint8_t *bitmask, const float *bias, float *y,
                    int64_t out) {
    int64_t nbytes = (k + 7) / 8, begin, end;
    share(out, &begin, &end);
    if (begin >= end) return 0;
    switch (values_type) {
    case I8: return rows_I8(z, tokens, k, values, value_scale, s, bitmask, nbytes, bias, y, out, begin, end);
    case BF16: return rows_BF16(z, tokens, k, values, value_scale, s, bitmask, nbytes, bias, y, out, begin, end);
    case F16: return rows_F16(z, tokens, k, values, value_scale, s, bitmask, nbytes, bias, y, out, begin, end);
    default: return rows_F32(z, tokens, k, values, value_scale, s, bitmask, nbytes, bias, y, out, begin, end);
    }
}

/* ------------------------------------------------------------------------------------------- stage 1 */

/* One dictionary row at a time against up to 4 tokens. */
#define ATOM_TILE(NAME, ELEMENT, T)                                                                       \
    static void atom_tile_##NAME##_##T(const float *x, int64_t in, const ELEMENT *row, float *sums) {     \
        __m512 acc[T];                                                                                    \
        for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();                                         \
        int64_t i = 0;                                                                                    \
        for (; i + 16 <= in; i += 16) {                                                                   \
            prefetch(row + i);                                                                            \
            __m512 d = LOAD_ALL_##NAME(row + i);                                           \
            for (int t = 0; t < T; ++t) acc[t] = _mm512_fmadd_ps(d, _mm512_loadu_ps(x + t * in + i), acc[t]); \
        }                                                                                                 \
        if (i < in) {                                                                                     \
            __mmask16 rest = (__mmask16)((1u << (in - i)) - 1u);                                          \
            __m512 d = LOAD_##NAME(row + i, rest);                                                        \
            for (int t = 0; t < T; ++t)                                                                   \
                acc[t] = _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(rest, x + t * in + i), acc[t]);         \
        }                                                                                                 \
        for (int t = 0; t < T; ++t) sums[t] = _mm512_reduce_add_ps(acc[t]);                               \
    }

/* One token (decode proper): four dictionary rows at once, four independent accumulator chains, so the
   adds of one row do not wait on the previous row's. */
#define ATOM_QUAD(NAME, ELEMENT)                                                                          \
    static void atom_quad_##NAME(const float *x, int64_t in, const ELEMENT *row, float *sums) {           \
        const ELEMENT *row1 = row + in, *row2 = row + 2 * in, *row3 = row + 3 * in;                       \
        __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;                         \
        int64_t i = 0;                                                                                    \
        for (; i + 16 <= in; i += 16) {                                                                   \
            __m512 xv = _mm512_loadu_ps(x + i);                                                           \
            prefetch(row + i), prefetch(row1 + i), prefetch(row2 + i), prefetch(row3 + i);                \
            acc0 = _mm512_fmadd_ps(LOAD_ALL_##NAME(row + i), xv, acc0);                                   \
            acc1 = _mm512_fmadd_ps(LOAD_ALL_##NAME(row1 + i), xv, acc1);                                  \
            acc2 = _mm512_fmadd_ps(LOAD_ALL_##NAME(row2 + i), xv, acc2);                                  \
            acc3 = _mm512_fmadd_ps(LOAD_ALL_##NAME(row3 + i), xv, acc3);                                  \
        }                                                                                                 \
        if (i < in) {                                                                                     \
            __mmask16 rest = (__mmask16)((1u << (in - i)) - 1u);                                          \
            __m512 xv = _mm512_maskz_loadu_ps(rest, x + i);                                               \
            acc0 = _mm512_fmadd_ps(LOAD_##NAME(row + i, rest), xv, acc0);                                 \
            acc1 = _mm512_fmadd_ps(LOAD_##NAME(row1 + i, rest), xv, acc1);                                \
            acc2 = _mm512_fmadd_ps(LOAD_##NAME(row2 + i, rest), xv, acc2);                                \
            acc3 = _mm512_fmadd_ps(LOAD_##NAME(row3 + i, rest), xv, acc3);                                \
        }                                                                                                 \
        sums[0] = _mm512_reduce_add_ps(acc0), sums[1] = _mm512_reduce_add_ps(acc1);                       \
        sums[2] = _mm512_reduce_add_ps(acc2), sums[3] = _mm512_reduce_add_ps(acc3);                       \
    }

/* Atoms [begin, end) for all tokens, scaled per atom when the dictionary is int8. */
#define ATOMS(NAME, ELEMENT)                                                                              \
    ATOM_TILE(NAME, ELEMENT, 1)                                                                           \
    ATOM_TILE(NAME, ELEMENT, 2)                                                                           \
    ATOM_TILE(NAME, ELEMENT, 4)                                                                           \
    ATOM_QUAD(NAME, ELEMENT)                                                                              \
    static void atoms_##NAME(const float *x, int64_t tokens, int64_t in, const ELEMENT *dictionary,       \
                             const float *scale, int64_t k, float *z, int64_t begin, int64_t end) {       \
        float sums[4];                                                                                    \
        int64_t a = begin;                                                                                \
        if (tokens == 1)                                                                                  \
            for (; a + 4 <= end; a += 4) {                                                                \
                atom_quad_##NAME(x, in, dictionary + a * in, sums);                                       \
                for (int r = 0; r < 4; ++r) z[a + r] = scale ? sums[r] * scale[a + r] : sums[r];          \
            }                                                                                             \
        for (; a < end; ++a) {                                                                            \
            const ELEMENT *row = dictionary + a * in;                                                     \
            float atom_scale = scale ? scale[a] : 1.0f;                                                   \
            int64_t t = 0;                                                                                \
            for (; t + 4 <= tokens; t += 4) {                                                             \
                atom_tile_##NAME##_4(x + t * in, in, row, sums);                                          \
                for (int i = 0; i < 4; ++i) z[(t + i) * k + a] = sums[i] * atom_scale;                    \
            }                                                                                             \
            for (; t + 2 <= tokens; t += 2) {                                                             \
                atom_tile_##NAME##_2(x + t * in, in, row, sums);                                          \
                for (int i = 0; i < 2; ++i) z[(t + i) * k + a] = sums[i] * atom_scale;                    \
            }                                                                                             \
            for (; t < tokens; ++t) {                                                                     \
                atom_tile_##NAME##_1(x + t * in, in, row, sums);                                          \
                z[t * k + a] = sums[0] * atom_scale;                                                      \
            }                                                                                             \
        }                                                                                                 \
    }

ATOMS(F32, float)
ATOMS(I8, int8_t)
ATOMS(BF16, uint16_t)
ATOMS(F16, uint16_t)

static void atoms(const float *x, int64_t tokens, int64_t in, const void *dictionary, int64_t dictionary_type,
                  const float *scale, int64_t k, float *z) {
    int64_t begin, end;
    share(k, &begin, &end);
    if (begin >= end) return;
    switch (dictionary_type) {
    case I8: atoms_I8(x, tokens, in, dictionary, scale, k, z, begin, end); break;
    case BF16: atoms_BF16(x, tokens, in, dictionary, NULL, k, z, begin, end); break;
    case F16: atoms_F16(x, tokens, in, dictionary, NULL, k, z, begin, end); break;
    default: atoms_F32(x, tokens, in, dictionary, NULL, k, z, begin, end);
    }
}

/* ----------------------------------------------------------------------------------- activations */

/* bfloat16 / float16 activations (x or z, bias, y) are widened into float32 scratch before the float32 stages
   and rounded back (to nearest even) after them: they are a few thousand elements against the weight's
   hundreds of thousands, and the products accumulate in float32 either way. */
static void widen(const uint16_t *from, int64_t type, int64_t n, float *to) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(to + i, type == BF16 ? LOAD_ALL_BF16(from + i) : LOAD_ALL_F16(from + i));
    if (i < n) {
        __mmask16 rest = (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(to + i, rest, type == BF16 ? LOAD_BF16(from + i, rest) : LOAD_F16(from + i, rest));
    }
}

static inline __m256i round_to_bf16(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);  /* NaN stays NaN (quiet), not rounded into Inf */
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(rounded);
}

static inline __m256i round_to(int64_t type, __m512 v) {
    return type == BF16 ? round_to_bf16(v) : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

static void narrow(const float *from, int64_t type, int64_t n, uint16_t *to) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i *)(to + i), round_to(type, _mm512_loadu_ps(from + i)));
    if (i < n) {
        __mmask16 rest = (__mmask16)((1u << (n - i)) - 1u);
        _mm256_mask_storeu_epi16(to + i, rest, round_to(type, _mm512_maskz_loadu_ps(rest, from + i)));
    }
}

/* ------------------------------------------------------------------------------------------ entries */

/* A stored weight, laid out once per weight by spadi_ao/kernels/native.py (_StoredWeight), so that a call
   passes one pointer instead of a dozen arguments (ctypes converts each one on every call).
   dictionary (k, in) and values (out, s) are F32, BF16 or F16, or I8 with a float32 scale per row (else the
   scale is NULL); bitmask is (out, ceil(k / 8)); all contiguous. Stage 2 alone leaves dictionary NULL. */
typedef struct {
    const void *dictionary;
    const float *dictionary_scale;
    const void *values;
    const float *value_scale;
    const uint8_t *bitmask;
    int64_t dictionary_type, values_type;
    int64_t in, k, s, out;
} spadi_weight;

/* Both stages (width == w->in) or stage 2 alone on z (width == w->k), all in float32. */
static int64_t run_f32(const spadi_weight *w, const float *x, int64_t tokens, const float *bias, float *y,
                       int threads, int both) {
    int64_t k = w->k, invalid = 0;
    float *z = both ? malloc((size_t)(tokens * k > 0 ? tokens * k : 1) * sizeof(float)) : NULL;
    if (both && !z) return -1;
#pragma omp parallel num_threads(threads) reduction(+ : invalid)
    {
        if (both) {
            atoms(x, tokens, w->in, w->dictionary, w->dictionary_type, w->dictionary_scale, k, z);
#pragma omp barrier
        }
        invalid += rows(both ? z : x, tokens, k, w->values, w->values_type, w->value_scale, w->s, w->bitmask, bias,
                        y, w->out);
    }
    free(z);
    return invalid;
}

static int64_t run(const spadi_weight *w, const void *x, int64_t tokens, const void *bias, void *y,
                   int64_t activation_type, int threads, int both) {
    if (activation_type == F32) return run_f32(w, x, tokens, bias, y, threads, both);
    int64_t width = both ? w->in : w->k, out = w->out;
    float *scratch = malloc((size_t)(tokens * (width + out) + out + 1) * sizeof(float));
    if (!scratch) return -1;
    float *x32 = scratch, *y32 = x32 + tokens * width, *bias32 = bias ? y32 + tokens * out : NULL;
    widen(x, activation_type, tokens * width, x32);
    if (bias) widen(bias, activation_type, out, bias32);
    int64_t invalid = run_f32(w, x32, tokens, bias32, y32, threads, both);
    if (!invalid) narrow(y32, activation_type, tokens * out, y);
    free(scratch);
    return invalid;
}

/* ------------------------------------------------------------------------------------------- tiles */

/* Prefill (many tokens) multiplies z by the codes with BLAS, one block of output rows at a time: this expands
   a block into a small dense tile (the only scratch; see spadi_ao/kernels/cpu.py), so no dense copy of the
   codes outlives a call. Each row is written as dequantize_values does it: the value times its row's scale in
   float32, then rounded to the tile type (float32, bfloat16 or float16; the activations' type). */
static inline void store_lanes(int64_t type, void *row, int64_t at, __m512 v, __mmask16 lanes) {
    if (type == F32) _mm512_mask_storeu_ps((float *)row + at, lanes, v);
    else _mm256_mask_storeu_epi16((uint16_t *)row + at, lanes, round_to(type, v));
}

#define EXPAND_ROW(NAME, ELEMENT)                                                                         \
    static void expand_row_##NAME(const ELEMENT *v, const uint8_t *mask, int64_t k, int64_t nbytes,       \
                                  const float *scale, int64_t type, void *row) {                          \
        __m512 factor = _mm512_set1_ps(scale ? *scale : 1.0f);                                            \
        int64_t c = 0;                                                                                    \
        for (; 16 * c + 16 <= k; ++c) {                                                                   \
            uint16_t bits;                                                                                \
            memcpy(&bits, mask + 2 * c, 2);                                                               \
            __m512 e = expand_##NAME(&v, bits);                                                           \
            store_lanes(type, row, 16 * c, scale ? _mm512_mul_ps(e, factor) : e, (__mmask16)0xffff);      \
        }                                                                                                 \
        if (16 * c < k) {                                                                                 \
            unsigned high = 2 * c + 1 < nbytes ? mask[2 * c + 1] : 0u;                                    \
            __m512 e = expand_##NAME(&v, (__mmask16)(mask[2 * c] | (high << 8)));                         \
            store_lanes(type, row, 16 * c, scale ? _mm512_mul_ps(e, factor) : e,                          \
                        (__mmask16)((1u << (k - 16 * c)) - 1u));                                          \
        }                                                                                                 \
    }

EXPAND_ROW(F32, float)
EXPAND_ROW(I8, int8_t)
EXPAND_ROW(BF16, uint16_t)
EXPAND_ROW(F16, uint16_t)

/* Output rows [begin, end) as a dense (end - begin, k) row-major tile of tile_type. Returns the number of
   malformed bitmask rows (their tile rows are left unwritten). */
int64_t spadi_codes_tile(const spadi_weight *w, int64_t begin, int64_t end, void *tile, int64_t tile_type,
                         int threads) {
    int64_t k = w->k, s = w->s, nbytes = (k + 7) / 8, width = tile_type == F32 ? 4 : 2, invalid = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : invalid) schedule(static)
    for (int64_t o = begin; o < end; ++o) {
        const uint8_t *mask = w->bitmask + o * nbytes;
        if (!row_is_valid(mask, nbytes, s, k)) {
            ++invalid;
            continue;
        }
        const float *scale = w->value_scale ? w->value_scale + o : NULL;
        char *row = (char *)tile + (o - begin) * k * width;
        switch (w->values_type) {
        case I8: expand_row_I8((const int8_t *)w->values + o * s, mask, k, nbytes, scale, tile_type, row); break;
        case BF16: expand_row_BF16((const uint16_t *)w->values + o * s, mask, k, nbytes, scale, tile_type, row); break;
        case F16: expand_row_F16((const uint16_t *)w->values + o * s, mask, k, nbytes, scale, tile_type, row); break;
        default: expand_row_F32((const float *)w->values + o * s, mask, k, nbytes, scale, tile_type, row);
        }
    }
    return invalid;
}

/* Stage 2 alone: z (tokens, k), bias (out) or NULL, y (tokens, out), all of activation_type. Returns the
   number of malformed bitmask rows (their outputs are not written), or -1 if scratch could not be allocated. */
int64_t spadi_codes_gemv(const spadi_weight *w, const void *z, int64_t tokens, const void *bias, void *y,
                         int64_t activation_type, int threads) {
    return run(w, z, tokens, bias, y, activation_type, threads, 0);
}

/* Both stages: x (tokens, in), the rest as spadi_codes_gemv. */
int64_t spadi_dictionary_decode(const spadi_weight *w, const void *x, int64_t tokens, const void *bias, void *y,
                                int64_t activation_type, int threads) {
    return run(w, x, tokens, bias, y, activation_type, threads, 1);
}
