/* Fused differential-evolution builds for CPU workers (loaded by evoray/strategies/de_kernel.py).
 *
 * The eager build makes one memory pass per torch op (about fifteen, plus the hash); this loop
 * reads each population slice once and writes the offspring once. It computes exactly what the
 * eager build computes: the same 32-bit hash of (block keys, position in block), the same
 * float32 operations in the same order (compiled with -ffp-contract=off: no fused multiply-add),
 * the same round-to-nearest-even bfloat16 conversion, so offspring are bit-identical to the
 * eager build's (checked at load time and by the tests).
 *
 * Optionally the same pass sums the kinship terms of (offspring - base) against
 * (parent - base), the offspring taken as stored.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 65536

static inline uint32_t mix32(uint32_t h) { /* lowbias32 (Wellons) */
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    return h;
}

static inline float from_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf16(float f) { /* c10::BFloat16's round_to_nearest_even */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#define LOAD_bf16(p, i) from_bf16(((const uint16_t *)(p))[i])
#define LOAD_f32(p, i) (((const float *)(p))[i])
#define STORED_bf16(v) from_bf16(to_bf16(v))
#define STORED_f32(v) (v)
#define STORE_bf16(p, i, v) (((uint16_t *)(p))[i] = to_bf16(v))
#define STORE_f32(p, i, v) (((float *)(p))[i] = (v))

/* The mutants, as de.py's build_range computes them (refs a, b, c; x the target). */
#define MUTANT_evolver(IN, i, xf) (((LOAD_##IN(a, i) - (xf)) * F) + (xf))
#define MUTANT_rand1(IN, i, xf) (((LOAD_##IN(b, i) - LOAD_##IN(c, i)) * F) + LOAD_##IN(a, i))

/* Elements [start, stop) of the offspring; every pointer is to element `start`. k1, k2 and
 * forced hold the keys and forced element of each block from start's block on. sums, when not
 * NULL (base given), receives n, sum du, sum dp, sum du^2, sum dp^2, sum du dp. */
#define DEFINE_BUILD(MUT, IN, OUT)                                                               \
    void build_##MUT##_##IN##_##OUT(const void *x, const void *a, const void *b, const void *c, \
                                    const void *base, void *out, int64_t start, int64_t stop,  \
                                    float F, uint64_t threshold, const uint32_t *k1,           \
                                    const uint32_t *k2, const int64_t *forced, double *sums) { \
        (void)b;                                                                                \
        (void)c;                                                                                \
        const int64_t b0 = start / BLOCK;                                                       \
        const uint32_t all = threshold > 0xffffffffu;                                           \
        const uint32_t thr = all ? 0xffffffffu : (uint32_t)threshold;                          \
        for (int64_t s = start; s < stop;) {                                                    \
            const int64_t blk = s / BLOCK;                                                      \
            const int64_t e = (blk + 1) * BLOCK < stop ? (blk + 1) * BLOCK : stop;              \
            const uint32_t ka = k1[blk - b0], kb = k2[blk - b0];                                \
            const uint32_t fp = (uint32_t)forced[blk - b0], p0 = (uint32_t)(s - blk * BLOCK);   \
            const uint32_t m = (uint32_t)(e - s);                                               \
            const int64_t o = s - start; /* this block's part, from element s */                \
            if (base == NULL) {                                                                 \
                for (uint32_t j = 0; j < m; j++) {                                              \
                    const uint32_t pos = p0 + j, h = mix32(mix32(pos ^ ka) ^ kb);               \
                    const float xf = LOAD_##IN(x, o + j);                                       \
                    const float v = MUTANT_##MUT(IN, o + j, xf);                                \
                    STORE_##OUT(out, o + j, (all | (h < thr) | (pos == fp)) ? v : xf);          \
                }                                                                               \
            } else {                                                                            \
                double su = 0, sp = 0, suu = 0, spp = 0, sup = 0;                               \
                _Pragma("omp simd reduction(+ : su, sp, suu, spp, sup)")                        \
                for (uint32_t j = 0; j < m; j++) {                                              \
                    const uint32_t pos = p0 + j, h = mix32(mix32(pos ^ ka) ^ kb);               \
                    const float xf = LOAD_##IN(x, o + j);                                       \
                    const float v = MUTANT_##MUT(IN, o + j, xf);                                \
                    const float w = (all | (h < thr) | (pos == fp)) ? v : xf;                   \
                    STORE_##OUT(out, o + j, w);                                                 \
                    const float bf = LOAD_##IN(base, o + j);                                    \
                    const double du = STORED_##OUT(w) - bf, dp = xf - bf;                       \
                    su += du;                                                                   \
                    sp += dp;                                                                   \
                    suu += du * du;                                                             \
                    spp += dp * dp;                                                             \
                    sup += du * dp;                                                             \
                }                                                                               \
                sums[0] += (double)m;                                                           \
                sums[1] += su;                                                                  \
                sums[2] += sp;                                                                  \
                sums[3] += suu;                                                                 \
                sums[4] += spp;                                                                 \
                sums[5] += sup;                                                                 \
            }                                                                                   \
            s = e;                                                                              \
        }                                                                                       \
    }

DEFINE_BUILD(evolver, bf16, bf16)
DEFINE_BUILD(evolver, bf16, f32)
DEFINE_BUILD(evolver, f32, bf16)
DEFINE_BUILD(evolver, f32, f32)
DEFINE_BUILD(rand1, bf16, bf16)
DEFINE_BUILD(rand1, bf16, f32)
DEFINE_BUILD(rand1, f32, bf16)
DEFINE_BUILD(rand1, f32, f32)
