/*
 * mixprec._kernels: the CPU fast path of mixprec.quantize.
 *
 * One pass over a contiguous float32 or float64 buffer, rounding every element to a target
 * floating-point format given by parameters (not constants), so one compiled kernel serves every
 * format and rounding mode. Pure integer arithmetic on the bit patterns: exact whatever the
 * FPU's flush-to-zero / denormals-are-zero flags are (torch.set_flush_denormal sets them).
 *
 * The algorithm (mirrored in torch_kernel.py, the device-agnostic reference):
 *   |x| = m * 2^ulp_in                  m: significand with the implicit bit, ulp_in: its unit
 *   e   = floor(log2 |x|)               from the exponent of (float)m, exact since m < 2^(P+1)
 *   qe  = max(e, emin) - M              the target's quantum at |x| (subnormals: fixed quantum)
 *   k   = round(m / 2^(qe - ulp_in))    integer rounding in the requested mode
 *   |q| = k * 2^qe                      rebuilt into bits, then overflow / flush / sign rules.
 *
 * Builds with the Python headers only (no torch, no numpy). The GIL is released while working so
 * callers can split a buffer over threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

enum { R_NEAREST = 0, R_STOCHASTIC = 1, R_TOWARD_ZERO = 2, R_UP = 3, R_DOWN = 4, R_ODD = 5 };
enum { F_FLUSH = 1, F_NO_NEGZERO = 2, F_NEG_NAN = 4 };

typedef struct {
    int64_t M;            /* target mantissa bits */
    int64_t emin;         /* target exponent of the smallest normal binade (rounding grid) */
    uint64_t max_bits;    /* |largest finite| in the buffer's float type */
    uint64_t ovf_bits;    /* what a non-saturated overflow becomes: inf, NaN or max */
    uint64_t minnorm_bits;/* flush threshold when F_FLUSH */
    uint64_t zero_bits;   /* what a zero result becomes (e8m0 has no zero: 2^-127) */
    uint64_t flags;
    uint64_t seed;
    uint64_t offset;      /* global index of the first element (stochastic streams) */
} qparams;

/* The plain loops are compiled three times, for x86-64-v4 (AVX-512), x86-64-v3 (AVX2, FMA) and
 * the baseline, and the simd level picks one at run time (chosen at import from the CPU; tests
 * and benchmarks may lower it, so the AVX2 code is tested and timed on AVX-512 machines too).
 * MP_VARIANTS(DEFINE, NAME, ...) expands DEFINE(NAME_v4, attribute, ...), DEFINE(NAME_v3, ...)
 * and DEFINE(NAME, , ...); MP_TABLE(NAME) lists them by level (portable, avx2, avx512). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MP_ISA_VARIANTS 1
#define MP_V4 __attribute__((target("arch=x86-64-v4")))
#define MP_V3 __attribute__((target("arch=x86-64-v3")))
#define MP_VARIANTS(DEFINE, NAME, ...)                                                          \
    DEFINE(NAME##_v4, MP_V4, __VA_ARGS__)                                                       \
    DEFINE(NAME##_v3, MP_V3, __VA_ARGS__)                                                       \
    DEFINE(NAME, , __VA_ARGS__)
#define MP_TABLE(NAME) {NAME, NAME##_v3, NAME##_v4}
#else
#define MP_VARIANTS(DEFINE, NAME, ...) DEFINE(NAME, , __VA_ARGS__)
#define MP_TABLE(NAME) {NAME, NAME, NAME}
#endif
#define MP_INLINE static inline __attribute__((always_inline))

/* Streaming passes prefetch their input PF_AHEAD elements (4 KiB) ahead, one line per 16
 * floats, a block of NBLOCK elements at a time. Without it a pass that spends more than about
 * two cycles per element (the AVX2 loops of fp6, fp4, e8m0, stochastic rounding) waits on memory:
 * on the machine the benchmarks run on, such a loop over 64 MiB in place took 2-3x its
 * out-of-place time and 4x its time in cache, and prefetching brought it back to about the cache
 * time. A prefetch never faults; the ones past the end are skipped all the same. */
#define NBLOCK 64
#define PF_AHEAD 1024
MP_INLINE void prefetch_ahead(const void *p, int64_t left, int width) {
    if (left < PF_AHEAD + NBLOCK) return;
    const char *c = (const char *)p + PF_AHEAD * width;
    for (int k = 0; k < NBLOCK * width; k += 64) __builtin_prefetch(c + k);
}

/* for (i = 0; i < n; i++) BODY, in blocks of NBLOCK (a constant trip count, vectorised whole)
 * prefetching SRC (elements of WIDTH bytes) ahead; n, i and BODY as the caller names them */
#define BLOCK_LOOP(SRC, WIDTH, BODY)                                                            \
    do {                                                                                        \
        int64_t i0 = 0;                                                                         \
        for (; i0 + NBLOCK <= n; i0 += NBLOCK) {                                                \
            prefetch_ahead((SRC) + i0, n - i0, WIDTH);                                          \
            for (int64_t i = i0; i < i0 + NBLOCK; i++) BODY;                                    \
        }                                                                                       \
        for (int64_t i = i0; i < n; i++) BODY;                                                  \
    } while (0)

MP_INLINE uint32_t mix32(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352dU;
    x ^= x >> 15; x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

MP_INLINE uint64_t mix64(uint64_t x) {
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27; x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

MP_INLINE uint32_t rand32(const qparams *p, uint64_t idx) {
    const uint32_t lo = (uint32_t)(idx + p->offset), hi = (uint32_t)((idx + p->offset) >> 32);
    return mix32(mix32(lo ^ (uint32_t)p->seed) + hi + (uint32_t)(p->seed >> 32));
}

/* ------------------------------------------------------------------------------------------ */
/* float32                                                                                     */
/* ------------------------------------------------------------------------------------------ */

MP_INLINE uint32_t f32_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }
MP_INLINE float f32_of(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }

MP_INLINE uint32_t q32(uint32_t u, const qparams *p, const int mode, uint64_t idx) {
    const uint32_t sign = u & 0x80000000u;
    const uint32_t a = u & 0x7fffffffu;
    const int32_t ef = (int32_t)(a >> 23);
    const uint32_t m = ef ? ((a & 0x7fffffu) | 0x800000u) : (a & 0x7fffffu);
    const int32_t ulp_in = (ef ? ef : 1) - 150;
    const int32_t lg = (int32_t)(f32_bits((float)(int32_t)m) >> 23) - 127;
    const int32_t e = lg + ulp_in;
    const int32_t emin = (int32_t)p->emin;
    const int32_t qe = (e > emin ? e : emin) - (int32_t)p->M;
    const int32_t d = qe - ulp_in;
    const int32_t dc = d < 1 ? 1 : (d > 25 ? 25 : d);
    uint32_t k = m >> dc;
    const uint32_t rem = m & ((1u << dc) - 1u);
    const uint32_t half = 1u << (dc - 1);
    const uint32_t inexact = rem != 0;
    if (mode == R_NEAREST) {
        /* ties to even as pure arithmetic (vectorises): add half - 1 + lsb, then truncate */
        k = (m + (half - 1u) + ((m >> dc) & 1u)) >> dc;
    } else if (mode == R_STOCHASTIC) {
        /* round up with probability rem / 2^d: 32 random bits against the scaled remainder */
        const uint64_t rnd = rand32(p, idx);
        const int32_t dd = d < 1 ? 1 : (d > 63 ? 63 : d);
        const uint64_t thr = dd <= 32 ? ((uint64_t)rem << (32 - dd)) : ((uint64_t)m >> (dd - 32));
        k += rnd < thr;
    } else if (mode == R_UP) {
        k += inexact & (sign == 0);
    } else if (mode == R_DOWN) {
        k += inexact & (sign != 0);
    } else if (mode == R_ODD) {
        k |= inexact;
    }
    /* rebuild k * 2^qe: (float)k is exact (k <= 2^24) and already normalised */
    const uint32_t kb = f32_bits((float)(int32_t)k);
    const int32_t E = (int32_t)(kb >> 23) - 127 + qe;
    int32_t sh = qe + 149;
    sh = sh < 0 ? 0 : (sh > 31 ? 31 : sh);
    uint32_t r = E >= -126 ? (((uint32_t)(E + 127) << 23) | (kb & 0x7fffffu)) : (k << sh);
    r = E > 127 ? 0x7f800000u : r;
    r = k == 0 ? 0u : r;
    r = d <= 0 ? a : r;

    const uint32_t is_inf = a == 0x7f800000u;
    const uint32_t maxb = (uint32_t)p->max_bits, ovfb = (uint32_t)p->ovf_bits;
    uint32_t ov;
    if (mode == R_NEAREST || mode == R_STOCHASTIC) ov = ovfb;
    else if (mode == R_UP) ov = (is_inf | (sign == 0)) ? ovfb : maxb;
    else if (mode == R_DOWN) ov = (is_inf | (sign != 0)) ? ovfb : maxb;
    else ov = is_inf ? ovfb : maxb;
    r = r > maxb ? ov : r;
    if (p->flags & F_FLUSH) r = r < (uint32_t)p->minnorm_bits ? 0u : r;
    r = r == 0 ? (uint32_t)p->zero_bits : r;
    uint32_t out;
    if (p->flags & F_NEG_NAN) {
        out = (sign && a) ? 0x7fc00000u : r;
    } else {
        uint32_t s = sign;
        if (p->flags & F_NO_NEGZERO) s = r == 0 ? 0u : s;
        out = r | s;
    }
    return a > 0x7f800000u ? (u | 0x400000u) : out;
}

/* Fast path for the formats kernel_params gives a fast_lo (1 <= M <= 22, emin >= -126, not
 * e8m0): rounding on the bit pattern itself. For |x| >= 2^q (q = emin - M, the target's smallest
 * subnormal) the target's quantum at x is a fixed number d <= 23 of trailing pattern bits
 * (d = 23 - M in the normal range, more below it), so rounding is integer arithmetic on the
 * pattern, and a carry into the exponent field is the correct next binade. Below 2^q the result
 * is 0 or 2^q. Overflow, inf and NaN follow q32's rules with selects, so every input takes this
 * path: about two dozen vector ops per element, no float maths, no data-dependent branches (tests
 * compare it with q32 bit for bit, fast_lo = 0 forcing q32). */
typedef struct {
    int32_t d0;        /* 23 - M: bits dropped in the normal range */
    int32_t dbase;     /* 23 - M + emin + 127: bits dropped are dbase - (biased exponent) below */
    int32_t q_bits;    /* pattern of 2^q */
    int32_t half_q;    /* pattern of 2^(q-1), 0 when below float32's range */
    int32_t tbase;     /* q + 118: 32 - (bits below 2^q of an input's last bit) + its exponent */
    int32_t maxb;      /* every pattern below is < 2^31: signed compares are exact (one AVX2 op) */
    int32_t minnorm;   /* flush threshold, 0 when not flushing */
    uint32_t ovfb;
    uint32_t zero_keep; /* sign mask for zero results: 0 for fnuz (no -0), else all ones */
    float magic;        /* 1.5 * 2^(q + 23): (x + magic) - magic rounds x to a multiple of 2^q */
    int32_t mixed;      /* nearest_mixed serves every element (see there) */
} fastp;

MP_INLINE uint32_t pow2_bits32(int32_t e) {
    return e >= -126 ? (uint32_t)(e + 127) << 23 : (e >= -149 ? 1u << (e + 149) : 0u);
}

MP_INLINE fastp make_fastp(const qparams *p) {
    const int32_t q = (int32_t)(p->emin - p->M), d0 = (int32_t)(23 - p->M);
    const int32_t minnorm = (p->flags & F_FLUSH) ? (int32_t)p->minnorm_bits : 0;
    /* magic's bits: 1.5 * 2^(q + 23) is normal for q >= -125 (only then is mixed set) */
    const uint32_t magic_bits = q >= -125 ? ((uint32_t)(q + 23 + 127) << 23) | 0x400000u : 0u;
    float magic;
    memcpy(&magic, &magic_bits, sizeof magic);
    const int32_t mixed = q >= -125 && !(p->flags & (F_FLUSH | F_NO_NEGZERO | F_NEG_NAN));
    fastp f = {d0, d0 + (int32_t)p->emin + 127, (int32_t)pow2_bits32(q),
               (int32_t)pow2_bits32(q - 1), q + 118, (int32_t)p->max_bits, minnorm,
               (uint32_t)p->ovf_bits, (p->flags & F_NO_NEGZERO) ? 0u : ~0u, magic, mixed};
    return f;
}

/* Stochastic rounding below 2^q, as q32: 2^q when rnd < floor(|x| / 2^q * 2^32) (q32's
 * threshold, which fits 32 bits there), else 0. With d = q - (exponent of x's last bit) >= 1,
 * that threshold is m << (32 - d) or m >> (d - 32); t = 32 - d. For larger x the value is
 * unused, only kept free of out-of-range shifts. */
MP_INLINE uint32_t tiny_stochastic(uint32_t a, uint32_t ef, int32_t efc, const fastp *f,
                                   uint32_t rnd) {
    const uint32_t m = ef != 0u ? ((a & 0x7fffffu) | 0x800000u) : a;
    const int32_t t = efc - f->tbase;
    const int32_t sl = t < 0 ? 0 : (t > 31 ? 31 : t), sr = -t < 0 ? 0 : (-t > 31 ? 31 : -t);
    return rnd < ((m >> sr) << sl) ? (uint32_t)f->q_bits : 0u;
}

/* What an overflowing magnitude becomes (q32's rule): the overflow value, or max in a directed
 * mode rounding toward zero from a finite input. neg_mask: all ones for negative inputs. */
MP_INLINE uint32_t overflow32(uint32_t a, uint32_t neg_mask, const int mode, const fastp *f) {
    const uint32_t inf = a == 0x7f800000u ? ~0u : 0u, maxb = (uint32_t)f->maxb;
    if (mode == R_NEAREST || mode == R_STOCHASTIC) return f->ovfb;
    if (mode == R_UP) return (inf | ~neg_mask) != 0u ? f->ovfb : maxb;
    if (mode == R_DOWN) return (inf | neg_mask) != 0u ? f->ovfb : maxb;
    return inf != 0u ? f->ovfb : maxb;
}

MP_INLINE uint32_t fast32(uint32_t u, const int mode, const fastp *f, uint32_t rnd) {
    /* 32-bit lanes, signed compares where both sides are below 2^31, selects only: about 30
     * vector ops per element, no float maths, no branches */
    const uint32_t a = u & 0x7fffffffu;
    const int32_t ai = (int32_t)a;
    const uint32_t neg_mask = (uint32_t)((int32_t)u >> 31), pos_mask = ~neg_mask;
    const uint32_t ef = a >> 23;
    const int32_t efc = ef > 1u ? (int32_t)ef : 1; /* subnormals: the exponent of 2^-126 */
    const int32_t dd = f->dbase - efc; /* the target's quantum is 2^d input ulps at x */
    const uint32_t d = (uint32_t)(dd < f->d0 ? f->d0 : (dd > 23 ? 23 : dd)); /* > 23: tiny x */
    const uint32_t mask = (1u << d) - 1u;
    /* the last kept significand bit; at d = 23 the implicit bit (a non-tiny x with d = 23 is
     * normal), not the exponent field's low bit */
    const uint32_t lsb = ((a | 0x800000u) >> d) & 1u;
    uint32_t r;
    if (mode == R_NEAREST) r = (a + (mask >> 1) + lsb) & ~mask;
    else if (mode == R_STOCHASTIC) r = (a + (mask ^ (rnd >> (32 - d)))) & ~mask; /* as q32 */
    else if (mode == R_UP) r = (a + (mask & pos_mask)) & ~mask;
    else if (mode == R_DOWN) r = (a + (mask & neg_mask)) & ~mask;
    else if (mode == R_ODD) r = (a & ~mask) | (((a & mask) != 0u ? (lsb ^ 1u) : 0u) << d);
    else r = a & ~mask;
    /* below 2^q (the target's smallest subnormal) the result is 0 or 2^q */
    const uint32_t q_bits = (uint32_t)f->q_bits;
    uint32_t rt;
    if (mode == R_NEAREST) rt = ai > f->half_q ? q_bits : 0u;
    else if (mode == R_STOCHASTIC) rt = tiny_stochastic(a, ef, efc, f, rnd);
    else if (mode == R_UP) rt = a != 0u ? (q_bits & pos_mask) : 0u;
    else if (mode == R_DOWN) rt = a != 0u ? (q_bits & neg_mask) : 0u;
    else if (mode == R_ODD) rt = a != 0u ? q_bits : 0u;
    else rt = 0u;
    r = ai < f->q_bits ? rt : r;
    /* r < 2^31 except for NaN inputs, whose result is replaced last */
    if (f->minnorm) r = (int32_t)r < f->minnorm ? 0u : r; /* loop-invariant: unswitched */
    r = (int32_t)r > f->maxb ? overflow32(a, neg_mask, mode, f) : r; /* inf stays inf */
    const uint32_t sign = u & 0x80000000u;
    const uint32_t out = f->zero_keep ? (r | sign) : (r | (r != 0u ? sign : 0u));
    return ai > 0x7f800000 ? (u | 0x400000u) : out; /* NaN in: quiet NaN out */
}

/* Round to nearest in blocks. In a block whose every element is a normal of the target
 * (2^emin <= |x| <= max) the target's quantum is the same d0 trailing pattern bits everywhere and
 * no overflow, zero, flush or NaN rule applies, so rounding is three integer ops on the pattern
 * (the sign bit untouched: a rounded magnitude stays <= max < 2^31), about a third of fast32's
 * work with the range check. Where the data is such (activations in bf16, fp16, fp8), that
 * keeps AVX2 machines memory-bound; a block with any other element takes fast32, so it only
 * pays for formats whose normal range is wide (>= 2^8): in fp6/fp4 most blocks hold values
 * outside it. Same bits either way (tests compare in-range blocks, mixed ones and every
 * pattern with q32). */
/* Is the target's normal range under 2^8 wide (most blocks then hold other values)? */
MP_INLINE int narrow_range(const fastp *f, uint32_t lo) {
    return (((uint32_t)f->maxb >> 23) - (lo >> 23)) < 8u;
}

MP_INLINE int normal_blocks_pay(const fastp *f, uint32_t lo, uint64_t flags) {
    return f->mixed || (!(flags & F_NEG_NAN) && !narrow_range(f, lo));
}

/* Round to nearest (ties to even) where the target's quantum is the last d0 bits of u's pattern:
 * a normal of the target, or a pattern beyond its largest (the caller's overflow rule then).
 * The sign bit is untouched while the rounded magnitude stays below 2^31. */
MP_INLINE uint32_t nearest_normal(uint32_t u, uint32_t d0) {
    const uint32_t keep = ~0u << d0, inc = (~keep) >> 1;
    return (u + inc + ((u >> d0) & 1u)) & keep;
}

/* Round to nearest (ties to even) in one branch-free form for every input, where the format
 * keeps -0, has subnormals, no NaN for negative zero, and 2^(q-1) (half its smallest
 * subnormal) is a normal float32 (f->mixed): the integer rounding of nearest_normal where
 * |x| >= 2^emin (lo), the float sum (|x| + magic) - magic below it, whose sum lies in magic's
 * binade, where float32's quantum is the target's 2^q: IEEE addition then rounds |x| to the
 * nearest multiple of 2^q, ties to even, and the subtraction is exact. fast32's overflow rule
 * (r > max: the overflow value, infinity included), the sign, and a quiet NaN for NaN. Every
 * operand of the float sum that matters (|x| >= 2^(q-1)) and every result is a normal float32,
 * so flush-to-zero and denormals-are-zero modes give the same bits (a float32 subnormal input
 * rounds to zero either way); the rounding mode must be the default, to nearest. About a dozen
 * vector ops per element against fast32's thirty (tests compare with q32 over every pattern of
 * the formats that take it). */
MP_INLINE uint32_t nearest_mixed(uint32_t u, const fastp *f, uint32_t lo) {
    const uint32_t a = u & 0x7fffffffu;
    const uint32_t rn = nearest_normal(a, (uint32_t)f->d0);
    float af, rf;
    memcpy(&af, &a, sizeof af);
    rf = (af + f->magic) - f->magic;
    uint32_t rs;
    memcpy(&rs, &rf, sizeof rs);
    /* selects as masks: with ternaries gcc kept branches (no AVX2 or SSE2 vectorisation) */
    const uint32_t below = 0u - (uint32_t)((int32_t)a < (int32_t)lo);
    uint32_t r = (rs & below) | (rn & ~below);
    const uint32_t over = 0u - (uint32_t)((int32_t)r > f->maxb);
    r = (f->ovfb & over) | (r & ~over);
    const uint32_t nan = 0u - (uint32_t)((int32_t)a > 0x7f800000);
    return ((u | 0x400000u) & nan) | ((r | (u & 0x80000000u)) & ~nan);
}

MP_INLINE void nearest_block(const uint32_t *src, uint32_t *dst, const fastp *f, uint32_t lo) {
    const int32_t lo_i = (int32_t)lo, max_i = f->maxb; /* magnitudes are < 2^31: signed */
    uint32_t outside = 0;
    for (int i = 0; i < NBLOCK; i++) {
        const int32_t a = (int32_t)(src[i] & 0x7fffffffu);
        outside |= (a < lo_i) | (a > max_i);
    }
    if (outside) {
        for (int i = 0; i < NBLOCK; i++) dst[i] = fast32(src[i], R_NEAREST, f, 0u);
        return;
    }
    const uint32_t d0 = (uint32_t)f->d0;
    for (int i = 0; i < NBLOCK; i++) dst[i] = nearest_normal(src[i], d0);
}

/* nearest_block for the formats nearest_mixed serves (f->mixed): a block of normals takes
 * nearest_normal, any other nearest_mixed instead of fast32. A function of its own: folding
 * the choice into nearest_block cost the other formats' loop ~15% (bf16 at 128k elements). */
MP_INLINE void nearest_block_mixed(const uint32_t *src, uint32_t *dst, const fastp *f,
                                   uint32_t lo) {
    const int32_t lo_i = (int32_t)lo, max_i = f->maxb;
    uint32_t outside = 0;
    for (int i = 0; i < NBLOCK; i++) {
        const int32_t a = (int32_t)(src[i] & 0x7fffffffu);
        outside |= (a < lo_i) | (a > max_i);
    }
    if (outside) {
        for (int i = 0; i < NBLOCK; i++) dst[i] = nearest_mixed(src[i], f, lo);
        return;
    }
    const uint32_t d0 = (uint32_t)f->d0;
    for (int i = 0; i < NBLOCK; i++) dst[i] = nearest_normal(src[i], d0);
}

/* nearest_mixed on every element, without first looking for a block of normals: for a normal
 * range under 2^8 wide (fp6, fp4), where most blocks hold other values. */
MP_INLINE void mixed_block(const uint32_t *src, uint32_t *dst, const fastp *f, uint32_t lo) {
    for (int i = 0; i < NBLOCK; i++) dst[i] = nearest_mixed(src[i], f, lo);
}

#define NEAREST_BLOCKS(BLOCK_FN)                                                                \
    for (; i0 + NBLOCK <= n; i0 += NBLOCK) {                                                    \
        prefetch_ahead(src + i0, n - i0, 4);                                                    \
        BLOCK_FN(src + i0, dst + i0, f, lo);                                                    \
    }
MP_INLINE void nearest_blocks(const uint32_t *src, uint32_t *dst, int64_t n, const fastp *f,
                              uint32_t lo) {
    int64_t i0 = 0;
    if (f->mixed && narrow_range(f, lo)) NEAREST_BLOCKS(mixed_block)
    else if (f->mixed) NEAREST_BLOCKS(nearest_block_mixed)
    else NEAREST_BLOCKS(nearest_block)
    for (; i0 < n; i0++) dst[i0] = fast32(src[i0], R_NEAREST, f, 0u);
}

/* Deterministic modes: one pass. in == out (quantize_) gets its own loop: with one pointer the
 * vectoriser needs no overlap check (which an aliased pair fails, falling back to scalar). */
#define FAST_LOOP(SRC, DST, MODE) BLOCK_LOOP(SRC, 4, (DST)[i] = fast32((SRC)[i], MODE, &fp, 0u))
#define DEFINE_LOOP32(NAME, ATTR, MODE)                                                         \
    ATTR static void NAME(const uint32_t *in, uint32_t *out, int64_t n, const qparams *p,       \
                          uint32_t lo) {                                                        \
        const qparams pp = *p;                                                                  \
        if (lo == 0) { /* no fast path for this format: the general algorithm */               \
            for (int64_t i = 0; i < n; i++) out[i] = q32(in[i], &pp, MODE, (uint64_t)i);       \
            return;                                                                             \
        }                                                                                       \
        const fastp fp = make_fastp(&pp);                                                       \
        if (MODE == R_NEAREST && normal_blocks_pay(&fp, lo, pp.flags)) {                        \
            if ((const uint32_t *)out == in) nearest_blocks(out, out, n, &fp, lo);              \
            else nearest_blocks(in, out, n, &fp, lo);                                           \
        } else if ((const uint32_t *)out == in) {                                               \
            FAST_LOOP(out, out, MODE);                                                          \
        } else {                                                                                \
            FAST_LOOP(in, out, MODE);                                                           \
        }                                                                                       \
    }
MP_VARIANTS(DEFINE_LOOP32, loop32_nearest, R_NEAREST)
MP_VARIANTS(DEFINE_LOOP32, loop32_toward_zero, R_TOWARD_ZERO)
MP_VARIANTS(DEFINE_LOOP32, loop32_up, R_UP)
MP_VARIANTS(DEFINE_LOOP32, loop32_down, R_DOWN)
MP_VARIANTS(DEFINE_LOOP32, loop32_odd, R_ODD)

/* Stochastic rounding: rand32's hash (4 multiplies) on top of fast32 is more than gcc's
 * auto-vectoriser keeps in registers (it spills and re-broadcasts constants on AVX2), so x86
 * gets the loop written with intrinsics for AVX-512 and AVX2, chosen once at import from the
 * CPU (one build serves both), and everything else gets the portable two-loop version. Every
 * version computes fast32's bits and rand32's draws exactly. */

/* rand32's words for a run of indices whose high word is constant: lo0 + i is the low word,
 * c = high word + the seed's high word. */
MP_INLINE uint32_t rand_run(uint32_t lo0, uint32_t i, uint32_t s_lo, uint32_t c) {
    return mix32(mix32((lo0 + i) ^ s_lo) + c);
}

/* Portable: hash a block of random words into a stack buffer, then round the block (two simple
 * loops vectorise where one fused loop does not). */
#define BLOCK 512
static int64_t sr_portable(const uint32_t *s, uint32_t *t, int64_t n, const fastp *fp,
                           uint32_t lo0, uint32_t s_lo, uint32_t c) {
    const fastp f = *fp;
    uint32_t rnd[BLOCK];
    for (int64_t i0 = 0; i0 < n; i0 += BLOCK) {
        const uint32_t len = (uint32_t)(n - i0 < BLOCK ? n - i0 : BLOCK), base = (uint32_t)i0;
        for (uint32_t i = 0; i < len; i++) rnd[i] = rand_run(lo0, base + i, s_lo, c);
        for (uint32_t i = 0; i < len; i++) t[i0 + i] = fast32(s[i0 + i], R_STOCHASTIC, &f, rnd[i]);
    }
    return n;
}

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define MP_X86_SIMD 1
#include <immintrin.h>

#define MP_AVX512 __attribute__((target("avx512f")))
MP_AVX512 static inline __m512i mix32_512(__m512i x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x846ca68bU));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

/* fast32(u, R_STOCHASTIC, f, rnd) on 16 lanes; variable shifts by 32 or more give 0, which the
 * tiny-input threshold relies on (fast32 clamps instead). */
MP_AVX512 static inline __m512i sr32_512(__m512i u, __m512i rnd, const fastp *f) {
    const __m512i one = _mm512_set1_epi32(1), zero = _mm512_setzero_si512();
    const __m512i qb = _mm512_set1_epi32(f->q_bits);
    const __m512i a = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
    const __m512i efc = _mm512_max_epu32(_mm512_srli_epi32(a, 23), one);
    const __m512i d = _mm512_min_epi32(
        _mm512_max_epi32(_mm512_sub_epi32(_mm512_set1_epi32(f->dbase), efc),
                         _mm512_set1_epi32(f->d0)), _mm512_set1_epi32(23));
    const __m512i keep = _mm512_sllv_epi32(_mm512_set1_epi32(-1), d); /* ~mask */
    const __m512i rs = _mm512_srlv_epi32(rnd, _mm512_sub_epi32(_mm512_set1_epi32(32), d));
    /* (a + (mask ^ rs)) & ~mask; 0xC3 is ~A ^ B */
    __m512i r = _mm512_and_si512(
        _mm512_add_epi32(a, _mm512_ternarylogic_epi32(keep, rs, rs, 0xC3)), keep);
    /* below 2^q: 2^q when rnd < (m >> max(-t, 0)) << max(t, 0), t = 32 - d; rare outside
     * fp6 / fp4, so most vectors skip it */
    const __mmask16 tiny = _mm512_cmplt_epi32_mask(a, qb);
    if (tiny) {
        const __m512i tt = _mm512_sub_epi32(efc, _mm512_set1_epi32(f->tbase));
        const __m512i m = _mm512_sub_epi32(a, _mm512_slli_epi32(_mm512_sub_epi32(efc, one), 23));
        const __m512i thr = _mm512_sllv_epi32(
            _mm512_srlv_epi32(m, _mm512_max_epi32(_mm512_sub_epi32(zero, tt), zero)),
            _mm512_max_epi32(tt, zero));
        const __m512i rt = _mm512_maskz_mov_epi32(_mm512_cmplt_epu32_mask(rnd, thr), qb);
        r = _mm512_mask_mov_epi32(r, tiny, rt);
    }
    if (f->minnorm) /* loop-invariant branch */
        r = _mm512_mask_mov_epi32(r, _mm512_cmplt_epi32_mask(r, _mm512_set1_epi32(f->minnorm)),
                                  zero);
    r = _mm512_mask_mov_epi32(r, _mm512_cmpgt_epi32_mask(r, _mm512_set1_epi32(f->maxb)),
                              _mm512_set1_epi32((int)f->ovfb));
    r = _mm512_mask_mov_epi32(r, _mm512_cmpgt_epi32_mask(a, _mm512_set1_epi32(0x7f800000)),
                              _mm512_or_si512(a, _mm512_set1_epi32(0x400000)));
    const __m512i sign = _mm512_and_si512(u, _mm512_set1_epi32((int)0x80000000U));
    if (f->zero_keep) return _mm512_or_si512(r, sign);
    return _mm512_mask_or_epi32(r, _mm512_cmpneq_epi32_mask(r, zero), r, sign);
}

/* A run of n elements whose random indices are lo0, lo0 + 1, ... (high word constant): 16 lanes
 * at a time, rand32 hashed in registers; returns how many it did (the caller rounds the rest).
 * ROUND(u, rnd, f) rounds one vector. */
#define DEFINE_RUN512(NAME, ROUND)                                                              \
    MP_AVX512 static int64_t NAME(const uint32_t *s, uint32_t *t, int64_t n, const fastp *fp,   \
                                  uint32_t lo0, uint32_t s_lo, uint32_t c) {                    \
        const fastp f = *fp; /* a local copy: stores through t cannot alias it */               \
        const __m512i seed = _mm512_set1_epi32((int)s_lo), cc = _mm512_set1_epi32((int)c);      \
        __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int)lo0),                             \
                                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,  \
                                                         12, 13, 14, 15));                      \
        int64_t i = 0;                                                                          \
        for (; i + 16 <= n; i += 16) {                                                          \
            const __m512i h = mix32_512(_mm512_xor_si512(idx, seed));                           \
            const __m512i rnd = mix32_512(_mm512_add_epi32(h, cc));                             \
            idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));                                 \
            if ((i & (NBLOCK - 1)) == 0) prefetch_ahead(s + i, n - i, 4);                       \
            const __m512i u = _mm512_loadu_si512((const void *)(s + i));                        \
            _mm512_storeu_si512((void *)(t + i), ROUND(u, rnd, &f));                            \
        }                                                                                       \
        return i;                                                                               \
    }
DEFINE_RUN512(sr_avx512, sr32_512)

#define MP_AVX2 __attribute__((target("avx2")))
MP_AVX2 static inline __m256i mix32_256(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x846ca68bU));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

/* sr32_512 on 8 lanes: compares are signed (every operand but rnd and thr is below 2^31; those
 * two are compared with their sign bits flipped) and selects are blends. tiny_block: whether
 * the vector's block may hold an input below 2^q (any_tiny_256), else that path is skipped. */
MP_AVX2 static inline __m256i sr32_256(__m256i u, __m256i rnd, const fastp *f, int tiny_block) {
    const __m256i one = _mm256_set1_epi32(1), zero = _mm256_setzero_si256();
    const __m256i qb = _mm256_set1_epi32(f->q_bits), sbit = _mm256_set1_epi32((int)0x80000000U);
    const __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
    const __m256i efc = _mm256_max_epu32(_mm256_srli_epi32(a, 23), one);
    /* fast32's d without its clamp to 23: d > 23 only below 2^q, whose lanes the tiny path
     * replaces (and a block without them has no such lane); shifts by 32 or more give 0 */
    const __m256i d = _mm256_max_epi32(_mm256_sub_epi32(_mm256_set1_epi32(f->dbase), efc),
                                       _mm256_set1_epi32(f->d0));
    const __m256i mask = _mm256_sub_epi32(_mm256_sllv_epi32(one, d), one);
    const __m256i rs = _mm256_srlv_epi32(rnd, _mm256_sub_epi32(_mm256_set1_epi32(32), d));
    __m256i r = _mm256_andnot_si256(mask, _mm256_add_epi32(a, _mm256_xor_si256(mask, rs)));
    if (tiny_block) { /* below 2^q: rare outside fp6 / fp4 */
        const __m256i tiny = _mm256_cmpgt_epi32(qb, a);
        const __m256i tt = _mm256_sub_epi32(efc, _mm256_set1_epi32(f->tbase));
        const __m256i m = _mm256_sub_epi32(a, _mm256_slli_epi32(_mm256_sub_epi32(efc, one), 23));
        const __m256i thr = _mm256_sllv_epi32(
            _mm256_srlv_epi32(m, _mm256_max_epi32(_mm256_sub_epi32(zero, tt), zero)),
            _mm256_max_epi32(tt, zero));
        const __m256i up =
            _mm256_cmpgt_epi32(_mm256_xor_si256(thr, sbit), _mm256_xor_si256(rnd, sbit));
        r = _mm256_blendv_epi8(r, _mm256_and_si256(up, qb), tiny);
    }
    if (f->minnorm) /* loop-invariant branch */
        r = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(f->minnorm), r), r);
    if (f->ovfb == (uint32_t)f->maxb) /* saturating (fp6, fp4 always): a min, not a blend */
        r = _mm256_min_epi32(r, _mm256_set1_epi32(f->maxb));
    else
        r = _mm256_blendv_epi8(r, _mm256_set1_epi32((int)f->ovfb),
                               _mm256_cmpgt_epi32(r, _mm256_set1_epi32(f->maxb)));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(a, _mm256_set1_epi32(0x400000)),
                           _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7f800000)));
    __m256i sign = _mm256_and_si256(u, sbit);
    if (!f->zero_keep) sign = _mm256_andnot_si256(_mm256_cmpeq_epi32(r, zero), sign);
    return _mm256_or_si256(r, sign);
}

/* Whether any of the NBLOCK elements from s (fewer where left is smaller) is below 2^q in
 * magnitude: sr32_256 tests its rare path once a block, as a branch per vector mispredicts where
 * about half the vectors hold such an input (fp4 on data near 1: 2x slower). Magnitudes doubled
 * (u << 1) compare unsigned without a mask. */
MP_AVX2 static inline int any_tiny_256(const uint32_t *s, int64_t left, const fastp *f) {
    __m256i lo = _mm256_set1_epi32(-1);
    for (int64_t k = 0; k + 8 <= left && k < NBLOCK; k += 8) {
        const __m256i u = _mm256_loadu_si256((const __m256i *)(s + k));
        lo = _mm256_min_epu32(lo, _mm256_slli_epi32(u, 1));
    }
    const __m256i q2 = _mm256_set1_epi32((int)((uint32_t)f->q_bits << 1));
    return _mm256_movemask_epi8(_mm256_cmpeq_epi32(_mm256_max_epu32(lo, q2), lo)) != -1;
}

/* no block test: e8m0_256 has no rare path */
#define NO_SCAN(s, left, f) 0

/* DEFINE_RUN512's loop on 8 lanes; SCAN(s, left, f) is ROUND's block flag */
#define DEFINE_RUN256(NAME, ROUND, SCAN)                                                        \
    MP_AVX2 static int64_t NAME(const uint32_t *s, uint32_t *t, int64_t n, const fastp *fp,     \
                                uint32_t lo0, uint32_t s_lo, uint32_t c) {                      \
        const fastp f = *fp; /* a local copy: stores through t cannot alias it */               \
        const __m256i seed = _mm256_set1_epi32((int)s_lo), cc = _mm256_set1_epi32((int)c);      \
        __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)lo0),                             \
                                       _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));              \
        int64_t i = 0;                                                                          \
        int flag = 0;                                                                           \
        for (; i + 8 <= n; i += 8) {                                                            \
            const __m256i h = mix32_256(_mm256_xor_si256(idx, seed));                           \
            const __m256i rnd = mix32_256(_mm256_add_epi32(h, cc));                             \
            idx = _mm256_add_epi32(idx, _mm256_set1_epi32(8));                                  \
            if ((i & (NBLOCK - 1)) == 0) {                                                      \
                prefetch_ahead(s + i, n - i, 4);                                                \
                flag = SCAN(s + i, n - i, &f);                                                  \
            }                                                                                   \
            const __m256i u = _mm256_loadu_si256((const __m256i *)(s + i));                     \
            _mm256_storeu_si256((__m256i *)(t + i), ROUND(u, rnd, &f, flag));                   \
        }                                                                                       \
        return i;                                                                               \
    }
DEFINE_RUN256(sr_avx2, sr32_256, any_tiny_256)
#endif

typedef int64_t (*sr_run_fn)(const uint32_t *, uint32_t *, int64_t, const fastp *, uint32_t,
                             uint32_t, uint32_t);
enum { SIMD_PORTABLE = 0, SIMD_AVX2 = 1, SIMD_AVX512 = 2 };
static int simd_best = SIMD_PORTABLE; /* what this CPU runs, set at import */
static int simd_level = SIMD_PORTABLE; /* what runs: simd_best unless a test lowered it */

static sr_run_fn sr_run_for(int level) {
#ifdef MP_X86_SIMD
    if (level == SIMD_AVX512) return sr_avx512;
    if (level == SIMD_AVX2) return sr_avx2;
#endif
    (void)level;
    return sr_portable;
}

static void init_simd(void) {
#ifdef MP_X86_SIMD
    __builtin_cpu_init();
#ifdef MP_ISA_VARIANTS /* the levels' loops are built for whole ISA levels */
    if (__builtin_cpu_supports("x86-64-v4")) simd_best = SIMD_AVX512;
    else if (__builtin_cpu_supports("x86-64-v3")) simd_best = SIMD_AVX2;
#else
    if (__builtin_cpu_supports("avx512f")) simd_best = SIMD_AVX512;
    else if (__builtin_cpu_supports("avx2")) simd_best = SIMD_AVX2;
#endif
#endif
    simd_level = simd_best;
}

typedef uint32_t (*round1_fn)(uint32_t u, const fastp *f, uint32_t rnd);

/* Stochastic rounding of n elements: runs of indices whose high word is constant (it ticks once
 * every 2^32 elements), so the hash stays in 32-bit lanes (64-bit index arithmetic would halve
 * the vector width); run() does the bulk of each run, one() the last few elements. */
static void stochastic_runs(const uint32_t *in, uint32_t *out, int64_t n, const qparams *p,
                            const fastp *fp, sr_run_fn run, round1_fn one) {
    const uint32_t s_lo = (uint32_t)p->seed, s_hi = (uint32_t)(p->seed >> 32);
    for (int64_t start = 0; start < n;) {
        const uint64_t g = (uint64_t)start + p->offset;
        const uint32_t lo0 = (uint32_t)g, c = (uint32_t)(g >> 32) + s_hi;
        const int64_t left = (int64_t)((1ULL << 32) - lo0);
        const int64_t len = n - start < left ? n - start : left;
        const int64_t done = run(in + start, out + start, len, fp, lo0, s_lo, c);
        for (int64_t i = done; i < len; i++)
            out[start + i] = one(in[start + i], fp, rand_run(lo0, (uint32_t)i, s_lo, c));
        start += len;
    }
}

static uint32_t sr_one(uint32_t u, const fastp *f, uint32_t rnd) {
    return fast32(u, R_STOCHASTIC, f, rnd);
}

static void loop32_stochastic(const uint32_t *in, uint32_t *out, int64_t n, const qparams *p,
                              uint32_t lo) {
    if (lo == 0) { /* no fast path for this format: the general algorithm */
        const qparams pp = *p;
        for (int64_t i = 0; i < n; i++) out[i] = q32(in[i], &pp, R_STOCHASTIC, (uint64_t)i);
        return;
    }
    const fastp fp = make_fastp(p);
    stochastic_runs(in, out, n, p, &fp, sr_run_for(simd_level), sr_one);
}

/* ------------------------------------------------------------------------------------------ */
/* float64                                                                                     */
/* ------------------------------------------------------------------------------------------ */

MP_INLINE uint64_t f64_bits(double f) { uint64_t b; memcpy(&b, &f, 8); return b; }

MP_INLINE uint64_t q64(uint64_t u, const qparams *p, const int mode, uint64_t idx) {
    const uint64_t sign = u & 0x8000000000000000ULL;
    const uint64_t a = u & 0x7fffffffffffffffULL;
    const uint64_t INF = 0x7ff0000000000000ULL, MANT = 0xfffffffffffffULL;
    const int64_t ef = (int64_t)(a >> 52);
    const uint64_t m = ef ? ((a & MANT) | (MANT + 1)) : (a & MANT);
    const int64_t ulp_in = (ef ? ef : 1) - 1075;
    const int64_t lg = (int64_t)(f64_bits((double)(int64_t)m) >> 52) - 1023;
    const int64_t e = lg + ulp_in;
    const int64_t qe = (e > p->emin ? e : p->emin) - p->M;
    const int64_t d = qe - ulp_in;
    const int64_t dc = d < 1 ? 1 : (d > 54 ? 54 : d);
    uint64_t k = m >> dc;
    const uint64_t rem = m & ((1ULL << dc) - 1ULL);
    const uint64_t half = 1ULL << (dc - 1);
    const uint64_t inexact = rem != 0;
    if (mode == R_NEAREST) {
        k = (m + (half - 1u) + ((m >> dc) & 1u)) >> dc;
    } else if (mode == R_STOCHASTIC) {
        /* 62 random bits against the scaled remainder */
        const uint64_t rnd = mix64(mix64(idx + p->offset) ^ p->seed) >> 2;
        const int64_t dd = d < 1 ? 1 : (d > 126 ? 126 : d);
        const uint64_t thr = dd <= 62 ? (rem << (62 - dd)) : (dd - 62 > 63 ? 0 : (m >> (dd - 62)));
        k += rnd < thr;
    } else if (mode == R_UP) {
        k += inexact & (sign == 0);
    } else if (mode == R_DOWN) {
        k += inexact & (sign != 0);
    } else if (mode == R_ODD) {
        k |= inexact;
    }
    const uint64_t kb = f64_bits((double)(int64_t)k);
    const int64_t E = (int64_t)(kb >> 52) - 1023 + qe;
    int64_t sh = qe + 1074;
    sh = sh < 0 ? 0 : (sh > 63 ? 63 : sh);
    uint64_t r = E >= -1022 ? (((uint64_t)(E + 1023) << 52) | (kb & MANT)) : (k << sh);
    r = E > 1023 ? INF : r;
    r = k == 0 ? 0ULL : r;
    r = d <= 0 ? a : r;

    const uint64_t is_inf = a == INF;
    const uint64_t maxb = p->max_bits, ovfb = p->ovf_bits;
    uint64_t ov;
    if (mode == R_NEAREST || mode == R_STOCHASTIC) ov = ovfb;
    else if (mode == R_UP) ov = (is_inf | (sign == 0)) ? ovfb : maxb;
    else if (mode == R_DOWN) ov = (is_inf | (sign != 0)) ? ovfb : maxb;
    else ov = is_inf ? ovfb : maxb;
    r = r > maxb ? ov : r;
    if (p->flags & F_FLUSH) r = r < p->minnorm_bits ? 0ULL : r;
    r = r == 0 ? p->zero_bits : r;
    uint64_t out;
    if (p->flags & F_NEG_NAN) {
        out = (sign && a) ? 0x7ff8000000000000ULL : r;
    } else {
        uint64_t s = sign;
        if (p->flags & F_NO_NEGZERO) s = r == 0 ? 0ULL : s;
        out = r | s;
    }
    return a > INF ? (u | 0x8000000000000ULL) : out;
}

#define DEFINE_LOOP64(NAME, ATTR, MODE)                                                         \
    ATTR static void NAME(const uint64_t *in, uint64_t *out, int64_t n, const qparams *p) {      \
        const qparams pp = *p;                                                                  \
        for (int64_t i = 0; i < n; i++) out[i] = q64(in[i], &pp, MODE, (uint64_t)i);           \
    }
MP_VARIANTS(DEFINE_LOOP64, loop64_nearest, R_NEAREST)
MP_VARIANTS(DEFINE_LOOP64, loop64_stochastic, R_STOCHASTIC)
MP_VARIANTS(DEFINE_LOOP64, loop64_toward_zero, R_TOWARD_ZERO)
MP_VARIANTS(DEFINE_LOOP64, loop64_up, R_UP)
MP_VARIANTS(DEFINE_LOOP64, loop64_down, R_DOWN)
MP_VARIANTS(DEFINE_LOOP64, loop64_odd, R_ODD)

/* ------------------------------------------------------------------------------------------ */
/* e8m0 fast path                                                                              */
/* ------------------------------------------------------------------------------------------ */

/* e8m0 (M = 0, emin = -127) has no fast32 path: its one-bit significand is always odd, so ties go
 * up and odd truncates, and its bottom binade [2^-127, 2^-126) lies in float32's subnormal
 * range, where the quantum is not a fixed number of pattern bits. Its grid is simple enough for
 * a closed form instead: a positive x in [2^e, 2^(e+1)) becomes 2^e or 2^(e+1), i.e. its pattern
 * with the mantissa field cleared, plus one exponent step when rounding up. The rules below are
 * q32 / q64 specialised to e8m0 (same bits, same random draws), with selects only, so they
 * vectorise and need no fallback: a few integer ops per element, memory-bound. */

MP_INLINE int is_e8m0(const qparams *p, int width) {
    /* the parameters kernel_params gives float8_e8m0fnu: checked in full, so a custom format
     * that only looks similar keeps the general path */
    const uint64_t lo = width == 32 ? 0x400000ULL : 896ULL << 52;     /* 2^-127 */
    const uint64_t mx = width == 32 ? 0x7f000000ULL : 1150ULL << 52;  /* 2^127 */
    const uint64_t nan = width == 32 ? 0x7fc00000ULL : 0x7ff8000000000000ULL;
    return p->M == 0 && p->emin == -127 && p->flags == F_NEG_NAN && p->zero_bits == lo &&
           p->max_bits == mx && (p->ovf_bits == mx || p->ovf_bits == nan); /* e8m0_256 needs */
}

MP_INLINE uint32_t e8m0_32(uint32_t u, const int mode, uint32_t rnd, uint32_t maxb, uint32_t ovfb) {
    const uint32_t MASK = 0x7fffffu, LO = 0x400000u, NEXT = 0x800000u, INF = 0x7f800000u;
    const uint32_t a = u & 0x7fffffffu;
    /* normal inputs (a >= 2^-126): the mantissa field decides, in units of 2^e */
    uint32_t r;
    if (mode == R_NEAREST) r = (a + (MASK >> 1) + 1u) & ~MASK; /* up iff m >= half: ties up */
    else if (mode == R_UP) r = (a + MASK) & ~MASK;
    else if (mode == R_STOCHASTIC) r = (a & ~MASK) + (rnd < ((a & MASK) << 9) ? NEXT : 0u);
    else r = a & ~MASK; /* toward_zero, down (negatives become NaN), odd (k = 1 stays odd) */
    /* float32 subnormals: [2^-127, 2^-126) is 2^-127 plus a 22-bit remainder; below 2^-127 and
     * at zero every mode gives 2^-127 (the grid's 0 stands for "no value") */
    uint32_t s;
    if (mode == R_NEAREST) s = a >= (LO | (LO >> 1)) ? NEXT : LO;
    else if (mode == R_UP) s = a > LO ? NEXT : LO;
    else if (mode == R_STOCHASTIC) s = rnd < ((a & (LO - 1u)) << 10) ? NEXT : LO;
    else s = LO;
    s = a < LO ? LO : s;
    r = a < NEXT ? s : r;
    /* overflow: only a finite input rounded toward zero saturates (as q32); negatives are NaN */
    const uint32_t ov = (mode == R_NEAREST || mode == R_STOCHASTIC || mode == R_UP)
                            ? ovfb : (a == INF ? ovfb : maxb);
    r = r > maxb ? ov : r;
    r = ((u >> 31) != 0u && a != 0u) ? 0x7fc00000u : r;
    return a > INF ? (u | 0x400000u) : r;
}

MP_INLINE uint64_t e8m0_64(uint64_t u, const int mode, uint64_t rnd, uint64_t maxb, uint64_t ovfb) {
    const uint64_t MASK = 0xfffffffffffffULL, LO = 896ULL << 52, INF = 0x7ff0000000000000ULL;
    const uint64_t a = u & 0x7fffffffffffffffULL;
    /* 2^-127 is normal in float64: one rule from it up; everything below gives 2^-127 */
    uint64_t r;
    if (mode == R_NEAREST) r = (a + (MASK >> 1) + 1u) & ~MASK;
    else if (mode == R_UP) r = (a + MASK) & ~MASK;
    else if (mode == R_STOCHASTIC) r = (a & ~MASK) + (rnd < ((a & MASK) << 10) ? MASK + 1u : 0u);
    else r = a & ~MASK;
    r = a < LO ? LO : r;
    const uint64_t ov = (mode == R_NEAREST || mode == R_STOCHASTIC || mode == R_UP)
                            ? ovfb : (a == INF ? ovfb : maxb);
    r = r > maxb ? ov : r;
    r = ((u >> 63) != 0u && a != 0u) ? 0x7ff8000000000000ULL : r;
    return a > INF ? (u | 0x8000000000000ULL) : r;
}

/* float32 stochastic: e8m0_32 with rand32's draws, through stochastic_runs like loop32_stochastic:
 * AVX-512 / AVX2 versions of e8m0_32 on x86, the auto-vectorised loop elsewhere. */
static uint32_t e8m0_one(uint32_t u, const fastp *f, uint32_t rnd) {
    return e8m0_32(u, R_STOCHASTIC, rnd, (uint32_t)f->maxb, f->ovfb);
}

static int64_t e8m0_portable(const uint32_t *s, uint32_t *t, int64_t n, const fastp *fp,
                             uint32_t lo0, uint32_t s_lo, uint32_t c) {
    const uint32_t maxb = (uint32_t)fp->maxb, ovfb = fp->ovfb;
    for (int64_t i = 0; i < n; i++)
        t[i] = e8m0_32(s[i], R_STOCHASTIC, rand_run(lo0, (uint32_t)i, s_lo, c), maxb, ovfb);
    return n;
}

#ifdef MP_X86_SIMD
/* e8m0_32(u, R_STOCHASTIC, rnd, ...) on 16 lanes: compares of a and r are signed (below 2^31
 * but for NaN inputs, replaced last), the two against rnd unsigned */
MP_AVX512 static inline __m512i e8m0_512(__m512i u, __m512i rnd, const fastp *f) {
    const __m512i lo = _mm512_set1_epi32(0x400000), next = _mm512_set1_epi32(0x800000);
    const __m512i a = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
    const __m512i frac = _mm512_and_si512(a, _mm512_set1_epi32(0x7fffff));
    const __m512i base = _mm512_andnot_si512(_mm512_set1_epi32(0x7fffff), a);
    __m512i r = _mm512_mask_add_epi32(
        base, _mm512_cmplt_epu32_mask(rnd, _mm512_slli_epi32(frac, 9)), base, next);
    const __m512i sub_frac = _mm512_and_si512(a, _mm512_set1_epi32(0x3fffff));
    __m512i s = _mm512_mask_mov_epi32(
        lo, _mm512_cmplt_epu32_mask(rnd, _mm512_slli_epi32(sub_frac, 10)), next);
    s = _mm512_mask_mov_epi32(s, _mm512_cmplt_epi32_mask(a, lo), lo);
    r = _mm512_mask_mov_epi32(r, _mm512_cmplt_epi32_mask(a, next), s);
    r = _mm512_mask_mov_epi32(r, _mm512_cmpgt_epi32_mask(r, _mm512_set1_epi32(f->maxb)),
                              _mm512_set1_epi32((int)f->ovfb));
    const __mmask16 neg = _mm512_cmplt_epi32_mask(u, _mm512_setzero_si512()) &
                          _mm512_test_epi32_mask(a, a);
    r = _mm512_mask_mov_epi32(r, neg, _mm512_set1_epi32(0x7fc00000));
    return _mm512_mask_mov_epi32(r, _mm512_cmpgt_epi32_mask(a, _mm512_set1_epi32(0x7f800000)),
                                 _mm512_or_si512(u, lo));
}
DEFINE_RUN512(e8m0_avx512, e8m0_512)

/* e8m0_512 on 8 lanes */
MP_AVX2 static inline __m256i e8m0_256(__m256i u, __m256i rnd, const fastp *f, int unused) {
    (void)unused; /* DEFINE_RUN256's block flag */
    const __m256i lo = _mm256_set1_epi32(0x400000), next = _mm256_set1_epi32(0x800000);
    const __m256i sbit = _mm256_set1_epi32((int)0x80000000U), zero = _mm256_setzero_si256();
    const __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
    const __m256i rs = _mm256_xor_si256(rnd, sbit); /* unsigned rnd < x: signed with flips */
    const __m256i frac = _mm256_and_si256(a, _mm256_set1_epi32(0x7fffff));
    const __m256i up = _mm256_cmpgt_epi32(_mm256_xor_si256(_mm256_slli_epi32(frac, 9), sbit), rs);
    __m256i r = _mm256_add_epi32(_mm256_andnot_si256(_mm256_set1_epi32(0x7fffff), a),
                                 _mm256_and_si256(up, next));
    const __m256i sub_frac = _mm256_and_si256(a, _mm256_set1_epi32(0x3fffff));
    __m256i up2 =
        _mm256_cmpgt_epi32(_mm256_xor_si256(_mm256_slli_epi32(sub_frac, 10), sbit), rs);
    up2 = _mm256_andnot_si256(_mm256_cmpgt_epi32(lo, a), up2); /* below 2^-127: stays lo */
    const __m256i s = _mm256_add_epi32(lo, _mm256_and_si256(up2, lo)); /* lo or next = 2 lo */
    r = _mm256_blendv_epi8(r, s, _mm256_cmpgt_epi32(next, a));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32((int)f->ovfb),
                           _mm256_cmpgt_epi32(r, _mm256_set1_epi32(f->maxb)));
    const __m256i neg = _mm256_andnot_si256(_mm256_cmpeq_epi32(a, zero),
                                            _mm256_cmpgt_epi32(zero, u));
    /* every r here (a power of two, max, NaN) has its bits inside 0x7fc00000's: an or is the
     * select (blends cost 2-3 uops) */
    r = _mm256_or_si256(r, _mm256_and_si256(neg, _mm256_set1_epi32(0x7fc00000)));
    return _mm256_blendv_epi8(r, _mm256_or_si256(u, lo),
                              _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7f800000)));
}
DEFINE_RUN256(e8m0_avx2, e8m0_256, NO_SCAN)
#endif

static void e8m0_32_stochastic(const uint32_t *in, uint32_t *out, int64_t n, const qparams *p) {
    const fastp fp = make_fastp(p); /* only maxb and ovfb are used */
    sr_run_fn run = e8m0_portable;
#ifdef MP_X86_SIMD
    if (simd_level == SIMD_AVX512) run = e8m0_avx512;
    else if (simd_level == SIMD_AVX2) run = e8m0_avx2;
#endif
    stochastic_runs(in, out, n, p, &fp, run, e8m0_one);
}

/* in == out (quantize_) gets its own loop: with one pointer the vectoriser needs no overlap
 * check. The random draws are q32's / q64's, indexed the same way. */
#define DEFINE_E8M0_LOOP(NAME, ATTR, MODE, T, FN, RND)                                          \
    ATTR static void NAME(const T *in, T *out, int64_t n, const qparams *p) {                   \
        const qparams pp = *p;                                                                  \
        const T maxb = (T)pp.max_bits, ovfb = (T)pp.ovf_bits;                                   \
        if ((const T *)out == in) {                                                             \
            BLOCK_LOOP(out, (int)sizeof(T),                                                     \
                       out[i] = FN(out[i], MODE, MODE == R_STOCHASTIC ? RND : 0u, maxb, ovfb)); \
        } else {                                                                                \
            BLOCK_LOOP(in, (int)sizeof(T),                                                      \
                       out[i] = FN(in[i], MODE, MODE == R_STOCHASTIC ? RND : 0u, maxb, ovfb));  \
        }                                                                                       \
    }
#define RND64 (mix64(mix64((uint64_t)i + pp.offset) ^ pp.seed) >> 2)
#define DEFINE_E8M0_LOOPS(SUFFIX, MODE)                                                         \
    MP_VARIANTS(DEFINE_E8M0_LOOP, e8m0_32_##SUFFIX, MODE, uint32_t, e8m0_32, 0u)                \
    MP_VARIANTS(DEFINE_E8M0_LOOP, e8m0_64_##SUFFIX, MODE, uint64_t, e8m0_64, RND64)
DEFINE_E8M0_LOOPS(nearest, R_NEAREST)
MP_VARIANTS(DEFINE_E8M0_LOOP, e8m0_64_stochastic, R_STOCHASTIC, uint64_t, e8m0_64, RND64)
DEFINE_E8M0_LOOPS(toward_zero, R_TOWARD_ZERO)
DEFINE_E8M0_LOOPS(up, R_UP)
DEFINE_E8M0_LOOPS(down, R_DOWN)
DEFINE_E8M0_LOOPS(odd, R_ODD)

/* ------------------------------------------------------------------------------------------ */
/* Python binding                                                                              */
/* ------------------------------------------------------------------------------------------ */

typedef void (*loop32_fn)(const uint32_t *, uint32_t *, int64_t, const qparams *, uint32_t);
typedef void (*loop64_fn)(const uint64_t *, uint64_t *, int64_t, const qparams *);
typedef void (*e8m0_32_fn)(const uint32_t *, uint32_t *, int64_t, const qparams *);
/* [rounding mode][simd level]; float32 stochastic loops pick their intrinsics by the level */
static const loop32_fn LOOPS32[6][3] = {
    MP_TABLE(loop32_nearest), {loop32_stochastic, loop32_stochastic, loop32_stochastic},
    MP_TABLE(loop32_toward_zero), MP_TABLE(loop32_up), MP_TABLE(loop32_down),
    MP_TABLE(loop32_odd)};
static const loop64_fn LOOPS64[6][3] = {
    MP_TABLE(loop64_nearest), MP_TABLE(loop64_stochastic), MP_TABLE(loop64_toward_zero),
    MP_TABLE(loop64_up), MP_TABLE(loop64_down), MP_TABLE(loop64_odd)};
static const e8m0_32_fn E8M0_32[6][3] = {
    MP_TABLE(e8m0_32_nearest), {e8m0_32_stochastic, e8m0_32_stochastic, e8m0_32_stochastic},
    MP_TABLE(e8m0_32_toward_zero), MP_TABLE(e8m0_32_up), MP_TABLE(e8m0_32_down),
    MP_TABLE(e8m0_32_odd)};
static const loop64_fn E8M0_64[6][3] = {
    MP_TABLE(e8m0_64_nearest), MP_TABLE(e8m0_64_stochastic), MP_TABLE(e8m0_64_toward_zero),
    MP_TABLE(e8m0_64_up), MP_TABLE(e8m0_64_down), MP_TABLE(e8m0_64_odd)};

/* MX blocks with the "floor" scale rule (mx_quantize's defaults on float32: nearest, saturating,
 * subnormals), fused into one call: blocks._round_in_views' torch ops, the same float32
 * operations in the same order, so the same bits. x is (outer, n, inner) contiguous; a block is
 * `block` consecutive indices along n (the last one shorter), one per inner column; blocks are
 * processed a chunk of `per_chunk` along n at a time. Per block:
 * amax = max |x| (the largest magnitude pattern: for floats the same order), the scale
 * max(2^floor(log2 amax) * down, smallest) (amax's exponent bits times down, a float32 product,
 * clamped); then y = x / scale, rounded to the element format by the loop quantize() runs (in
 * place on the block's contiguous slab), times scale. A block holding inf or NaN has a NaN
 * scale in torch, and torch's vectorised division and product leave its NaN, 0x7fc00000, in
 * every element, input NaNs with a payload included (its scalar kernels keep such a payload);
 * written here directly. `scale` and `bad` are caller scratch of per_chunk * inner entries
 * (`bad` twice that: MX_COL_BLOCKS keeps minima in its second half). One pass over the input
 * for the maxima, one to scale, the rounding loop, one to scale back, all on a chunk that stays
 * in cache. */
#define MX_CHUNK 8192 /* elements per chunk of the fused kernels (32 KiB: in L1/L2) */

/* One pass over a chunk's blocks: for block b, rows j0..j1 (indices along n), BODY(k, c) for
 * the element at k = j * inner + i and its block column c = b * inner + i. Blocks along the last
 * axis (inner == 1) take LAST(j0, j1, b) instead, a loop with the block's value in a local,
 * which vectorises (a per-element index into the scratch arrays would not). */
#define MX_BLOCK_PASS(BODY, LAST)                                                               \
    for (int64_t b = 0; b < nb; b++) {                                                          \
        const int64_t j0 = b * block, j1 = j0 + block < len ? j0 + block : len;                 \
        if (inner == 1 && j1 - j0 == 32) {                                                      \
            LAST(j0, j0 + 32, b); /* the MX block size: a constant trip count, unrolled */      \
        } else if (inner == 1) {                                                                \
            LAST(j0, j1, b);                                                                    \
        } else {                                                                                \
            for (int64_t j = j0; j < j1; j++)                                                   \
                for (int64_t i = 0; i < inner; i++) BODY(j * inner + i, b * inner + i);         \
        }                                                                                       \
    }
#define MX_MAX(k, c) bad[c] = (xu[k] & 0x7fffffffu) > bad[c] ? (xu[k] & 0x7fffffffu) : bad[c]
#define MX_MAX1(j0, j1, b)                                                                      \
    do {                                                                                        \
        uint32_t m = 0u;                                                                        \
        for (int64_t k = j0; k < j1; k++) {                                                     \
            const uint32_t a = xu[k] & 0x7fffffffu;                                             \
            m = a > m ? a : m;                                                                  \
        }                                                                                       \
        bad[b] = m;                                                                             \
    } while (0)
/* x / scale as x * (1 / scale): scale is a power of two in [2^-127, 2^127], so its reciprocal
 * is exact and both are the correctly rounded x * 2^-k, bit for bit (a multiply, not a divide) */
#define MX_DIV(k, c) yc[k] = xc[k] * inv[c]
#define MX_DIV1(j0, j1, b)                                                                      \
    do {                                                                                        \
        const float r = inv[b];                                                                 \
        for (int64_t k = j0; k < j1; k++) yc[k] = xc[k] * r;                                    \
    } while (0)
#define MX_MUL(k, c) yc[k] *= scale[c]
#define MX_MUL1(j0, j1, b)                                                                      \
    do {                                                                                        \
        const float s = scale[b];                                                               \
        for (int64_t k = j0; k < j1; k++) yc[k] *= s;                                           \
    } while (0)
#define MX_NAN(k, c) yu[k] = bad[c] ? 0x7fc00000u : yu[k]
#define MX_NAN1(j0, j1, b)                                                                      \
    do {                                                                                        \
        if (bad[b])                                                                             \
            for (int64_t k = j0; k < j1; k++) yu[k] = 0x7fc00000u;                              \
    } while (0)
/* An MX element scaled into its block's normals of the target or above: nearest_normal on the
 * magnitude, fast32's overflow rule (r > max), then the sign (a non-zero result: no zero, flush
 * or NaN rule applies). The blocks below take it where every element of a block is such. */
MP_INLINE uint32_t mx_nearest_normal(uint32_t t, uint32_t d0, const fastp *f) {
    const uint32_t q = nearest_normal(t & 0x7fffffffu, d0);
    return ((int32_t)q > f->maxb ? f->ovfb : q) | (t & 0x80000000u);
}
/* One block of a row along the last axis in one pass, for formats with a fast path (lo != 0):
 * the block's largest magnitude, its scale, then each element divided (a multiply by the exact
 * reciprocal), rounded and multiplied back, in registers: the same float32 operations and the
 * same nearest rounding as the passes of DEFINE_MX_FLOOR, so the same bits, with one read and
 * one write per element instead of a read and a write per pass. The rounding is fast32's, or
 * where every scaled element is a normal of the target or above its range (the smallest
 * magnitude scaled is >= lo: scaling is monotonic) and such blocks pay (nearest_block's rule),
 * fast32's steps for exactly those (mx_nearest_normal); any other block of a format
 * nearest_mixed serves takes nearest_mixed instead of fast32.
 * A block holding inf or NaN is NaN. */
#define MX_ROW_BLOCK(X, Y, LEN)                                                                 \
    do {                                                                                        \
        const uint32_t *restrict xb = (const uint32_t *)(X);                                    \
        uint32_t m = 0u, mn = 0x7fffffffu;                                                      \
        for (int64_t k = 0; k < (LEN); k++) {                                                   \
            const uint32_t a = xb[k] & 0x7fffffffu;                                             \
            m = a > m ? a : m;                                                                  \
            mn = a < mn ? a : mn;                                                               \
        }                                                                                       \
        uint32_t *yb = (uint32_t *)(Y);                                                         \
        if (m >= 0x7f800000u) {                                                                 \
            for (int64_t k = 0; k < (LEN); k++) yb[k] = 0x7fc00000u;                            \
        } else {                                                                                \
            const float sc0 = f32_of(m & 0x7f800000u) * down;                                   \
            const float sc = sc0 < smallest ? smallest : sc0, r = 1.0f / sc;                    \
            /* each element in one loop, its bits moved by value (no scratch array: gcc     */  \
            /* copied one with `rep movsq`, a third of the block's time)                    */  \
            if (normal && f32_bits(f32_of(mn) * r) >= lo) {                                     \
                for (int64_t k = 0; k < (LEN); k++)                                             \
                    (Y)[k] = f32_of(mx_nearest_normal(f32_bits((X)[k] * r), d0, &fp)) * sc;     \
            } else if (fp.mixed) {                                                              \
                for (int64_t k = 0; k < (LEN); k++)                                             \
                    (Y)[k] = f32_of(nearest_mixed(f32_bits((X)[k] * r), &fp, lo)) * sc;         \
            } else {                                                                            \
                for (int64_t k = 0; k < (LEN); k++)                                             \
                    (Y)[k] = f32_of(fast32(f32_bits((X)[k] * r), R_NEAREST, &fp, 0u)) * sc;     \
            }                                                                                   \
        }                                                                                       \
    } while (0)
/* The blocks of one block row (rows j0..j0+R of a slab, R <= block) across `inner` columns, for a
 * non-last axis with inner >= 16 and formats with a fast path: MX_ROW_BLOCK's steps with the
 * columns in the vector lanes. The per-column largest and smallest magnitudes (`bad` and its
 * second half), the scales, then every element divided (a multiply by the exact reciprocal),
 * rounded and multiplied back in one pass: the same float32 operations and nearest rounding as
 * the chunked passes below, so the same bits, in two reads and one write instead of five
 * passes. One rounding for the whole row of blocks: nearest_normal where every column's block
 * scales to normals of the target or above (and such blocks pay), else nearest_mixed where it
 * serves, else fast32; columns holding inf or NaN are overwritten with NaN afterwards. */
#define MX_COL_BLOCKS(XS, YS, R)                                                                \
    do {                                                                                        \
        uint32_t *restrict mx = bad, *restrict mn = bad + per_chunk * inner; /* 2nd half */    \
        for (int64_t i = 0; i < inner; i++) {                                                   \
            mx[i] = 0u;                                                                         \
            mn[i] = 0x7fffffffu;                                                                \
        }                                                                                       \
        for (int64_t j = 0; j < (R); j++) {                                                     \
            const uint32_t *restrict xr = (const uint32_t *)((XS) + j * inner);                 \
            for (int64_t i = 0; i < inner; i++) {                                               \
                const uint32_t a = xr[i] & 0x7fffffffu;                                         \
                mx[i] = a > mx[i] ? a : mx[i];                                                  \
                mn[i] = a < mn[i] ? a : mn[i];                                                  \
            }                                                                                   \
        }                                                                                       \
        int all_normal = normal, any_bad = 0;                                                   \
        for (int64_t i = 0; i < inner; i++) {                                                   \
            const uint32_t m = mx[i], b_ = m >= 0x7f800000u;                                    \
            const float sc0 = f32_of(m & 0x7f800000u) * down;                                   \
            const float sc = b_ ? 1.0f : (sc0 < smallest ? smallest : sc0), r = 1.0f / sc;     \
            all_normal &= b_ || f32_bits(f32_of(mn[i]) * r) >= lo;                              \
            scale[i] = sc;                                                                      \
            inv[i] = r;                                                                         \
            bad[i] = b_;                                                                        \
            any_bad |= (int)b_;                                                                 \
        }                                                                                       \
        for (int64_t j = 0; j < (R); j++) {                                                     \
            const float *restrict xr = (XS) + j * inner;                                        \
            float *restrict yr = (YS) + j * inner;                                              \
            if (all_normal) {                                                                   \
                for (int64_t i = 0; i < inner; i++)                                             \
                    yr[i] = f32_of(mx_nearest_normal(f32_bits(xr[i] * inv[i]), d0, &fp)) *      \
                            scale[i];                                                           \
            } else if (fp.mixed) {                                                              \
                for (int64_t i = 0; i < inner; i++)                                             \
                    yr[i] = f32_of(nearest_mixed(f32_bits(xr[i] * inv[i]), &fp, lo)) * scale[i]; \
            } else {                                                                            \
                for (int64_t i = 0; i < inner; i++)                                             \
                    yr[i] = f32_of(fast32(f32_bits(xr[i] * inv[i]), R_NEAREST, &fp, 0u)) *      \
                            scale[i];                                                           \
            }                                                                                   \
            if (any_bad) {                                                                      \
                uint32_t *yu = (uint32_t *)yr;                                                  \
                for (int64_t i = 0; i < inner; i++) yu[i] = bad[i] ? 0x7fc00000u : yu[i];      \
            }                                                                                   \
        }                                                                                       \
    } while (0)
#define DEFINE_MX_FLOOR(NAME, ATTR, ...)                                                        \
    ATTR static void NAME(const float *x, float *y, int64_t outer, int64_t n, int64_t inner,   \
                          int64_t block, int64_t per_chunk, const qparams *p, uint32_t lo,     \
                          float down, float smallest, float *scale, float *inv, uint32_t *bad, \
                          loop32_fn round) {                                                   \
        const qparams pp = *p;                                                                  \
        const fastp fp = make_fastp(&pp);                                                       \
        const int normal = normal_blocks_pay(&fp, lo, pp.flags);                                \
        const uint32_t d0 = (uint32_t)fp.d0;                                                    \
        if (inner >= 16 && lo != 0u) {                                                         \
            for (int64_t o = 0; o < outer; o++)                                                 \
                for (int64_t j0 = 0; j0 < n; j0 += block) {                                     \
                    const int64_t at = (o * n + j0) * inner;                                    \
                    MX_COL_BLOCKS(x + at, y + at, (n - j0 < block ? n - j0 : block));           \
                }                                                                               \
            return;                                                                             \
        }                                                                                       \
        if (inner == 1 && block == 32 && lo != 0u) {                                            \
            for (int64_t o = 0; o < outer; o++) {                                               \
                const float *restrict xr = x + o * n;                                           \
                float *restrict yr = y + o * n;                                                 \
                int64_t j = 0;                                                                  \
                for (; j + 32 <= n; j += 32) MX_ROW_BLOCK(xr + j, yr + j, 32);                  \
                if (n - j == 16) { /* short rows of 16 (attention heads): a constant trip count */ \
                    MX_ROW_BLOCK(xr + j, yr + j, 16);                                           \
                } else if (j < n) { /* other short blocks: padded to 32 with their first element */ \
                    const int64_t len = n - j;                                                  \
                    float xt[32], yt[32];                                                       \
                    memcpy(xt, xr + j, (size_t)len * 4);                                        \
                    for (int64_t k = len; k < 32; k++) xt[k] = xr[j];                           \
                    MX_ROW_BLOCK(xt, yt, 32);                                                   \
                    memcpy(yr + j, yt, (size_t)len * 4);                                        \
                }                                                                               \
            }                                                                                   \
            return;                                                                             \
        }                                                                                       \
        const int64_t span = per_chunk * block; /* indices along n per chunk */                 \
        for (int64_t o = 0; o < outer; o++) {                                                   \
            for (int64_t c0 = 0; c0 < n; c0 += span) {                                          \
                const int64_t len = n - c0 < span ? n - c0 : span;                              \
                const int64_t nb = (len + block - 1) / block;                                   \
                const float *restrict xc = x + (o * n + c0) * inner;                            \
                float *yc = y + (o * n + c0) * inner;                                           \
                const uint32_t *restrict xu = (const uint32_t *)xc;                             \
                uint32_t *yu = (uint32_t *)yc;                                                  \
                /* block maxima: bad[c] = the largest magnitude pattern of block column c */    \
                for (int64_t c = 0; c < nb * inner; c++) bad[c] = 0u;                           \
                MX_BLOCK_PASS(MX_MAX, MX_MAX1)                                                  \
                int any_bad = 0;                                                                \
                for (int64_t c = 0; c < nb * inner; c++) {                                      \
                    const uint32_t e = bad[c] & 0x7f800000u;                                    \
                    float p2;                                                                   \
                    memcpy(&p2, &e, sizeof p2);                                                 \
                    const float sc = p2 * down;                                                 \
                    bad[c] = bad[c] >= 0x7f800000u; /* inf or NaN in the block */               \
                    any_bad |= (int)bad[c];                                                     \
                    /* a bad block's elements are overwritten below */                          \
                    scale[c] = bad[c] ? 1.0f : (sc < smallest ? smallest : sc);                 \
                    inv[c] = 1.0f / scale[c];                                                   \
                }                                                                               \
                MX_BLOCK_PASS(MX_DIV, MX_DIV1)                                                  \
                round((const uint32_t *)yc, yu, len * inner, p, lo);                            \
                MX_BLOCK_PASS(MX_MUL, MX_MUL1)                                                  \
                if (any_bad) MX_BLOCK_PASS(MX_NAN, MX_NAN1)                                     \
            }                                                                                   \
        }                                                                                       \
    }
MP_VARIANTS(DEFINE_MX_FLOOR, mx_floor32)
typedef void (*mx_floor_fn)(const float *, float *, int64_t, int64_t, int64_t, int64_t, int64_t,
                            const qparams *, uint32_t, float, float, float *, float *, uint32_t *,
                            loop32_fn);
static const mx_floor_fn MX_FLOOR32[3] = MP_TABLE(mx_floor32);

/* The fused kernels round with the float32 loops, which e8m0 (a scale format) does not take:
 * 0 with a ValueError for its parameters. */
static int element_format(const qparams *p, const char *who) {
    if (!is_e8m0(p, 32)) return 1;
    PyErr_Format(PyExc_ValueError, "%s: e8m0 is a scale format, not an element format", who);
    return 0;
}

/* Per-tensor current scaling (fp8 recipes): amax = max |x|, the scale s = fmax / amax as torch
 * computes it in float32 (1.0 where that is not a positive finite number), then
 * y = round(x * s) / s: the float32 product, the rounding loop quantize() runs and the float32
 * quotient, as mixprec.quantization.scaled's torch ops compute them. With a fast path for the
 * format (lo != 0) the three steps run NBLOCK elements at a time in registers, one read and one
 * write per element, the block rounded as the rounding loop rounds it (mixed_block or
 * nearest_block_mixed where nearest_mixed serves, nearest_block where normal blocks pay, else
 * fast32); otherwise (the general algorithm) a chunk at a time, so that three passes stay in
 * cache. The same bits either way. x and y must not overlap.
 *
 * The quotient without a division where the format has at most 3 mantissa bits (every fp8, fp6
 * and fp4 format): q / s is then q * (1 / s) in double, rounded to float32, the same bits. Proof:
 * write q = a 2^e (integer a <= 15) and s = b 2^f (integer b < 2^24), Q = q / s = (a / b) 2^k.
 * The double result D errs by at most |Q| (2^-52 + 2^-106). A float32 rounding boundary M
 * (a midpoint between neighbours, or the overflow threshold) is m 2^j with m odd of 25 bits, and
 * j >= k - 48 because Q >= 2^(k-24). M = Q is impossible (the odd part of a 2^(k-j) is at most
 * 15, that of b m at least 2^24); otherwise |Q - M| = |a 2^k - b m 2^j| / b >= 2^min(k,j) / b,
 * which exceeds the error bound a 2^(k-52) / b (1 + 2^-54) since a < 16 and k - j <= 48. So D
 * and Q round to the same float32 (subnormal results: j is larger still, the bound easier).
 * Division costs a few cycles per element even vectorised, more than the rounding itself. */
/* One NBLOCK-element (or shorter, LEN) block of DEFINE_SCALED_ROUND's fast path, rounded by
 * ROUND_BODY on the patterns tu. */
#define SCALED_BLOCK(X, Y, LEN, ROUND_BODY)                                                     \
    do {                                                                                        \
        float tf[NBLOCK];                                                                       \
        uint32_t tu[NBLOCK];                                                                    \
        for (int64_t k = 0; k < (LEN); k++) tf[k] = (X)[k] * s;                                 \
        memcpy(tu, tf, sizeof tu);                                                              \
        ROUND_BODY;                                                                             \
        memcpy(tf, tu, sizeof tf);                                                              \
        if (narrow)                                                                             \
            for (int64_t k = 0; k < (LEN); k++) (Y)[k] = (float)((double)tf[k] * rs);           \
        else                                                                                    \
            for (int64_t k = 0; k < (LEN); k++) (Y)[k] = tf[k] / s;                             \
    } while (0)
#define DEFINE_SCALED_ROUND(NAME, ATTR, ...)                                                    \
    ATTR static void NAME(const float *restrict x, float *y, int64_t n, float s,               \
                          const qparams *p, uint32_t lo, loop32_fn round) {                    \
        const double rs = 1.0 / (double)s;                                                      \
        const int narrow = p->M <= 3;                                                           \
        if (lo != 0u) {                                                                         \
            const qparams pp = *p;                                                              \
            const fastp fp = make_fastp(&pp);                                                   \
            const int normal = normal_blocks_pay(&fp, lo, pp.flags);                            \
            const int narrow = narrow_range(&fp, lo);                                           \
            int64_t i0 = 0;                                                                     \
            for (; i0 + NBLOCK <= n; i0 += NBLOCK) {                                            \
                prefetch_ahead(x + i0, n - i0, 4);                                              \
                if (fp.mixed && narrow)                                                         \
                    SCALED_BLOCK(x + i0, y + i0, NBLOCK, mixed_block(tu, tu, &fp, lo));         \
                else if (fp.mixed)                                                              \
                    SCALED_BLOCK(x + i0, y + i0, NBLOCK, nearest_block_mixed(tu, tu, &fp, lo)); \
                else if (normal)                                                                \
                    SCALED_BLOCK(x + i0, y + i0, NBLOCK, nearest_block(tu, tu, &fp, lo));       \
                else                                                                            \
                    SCALED_BLOCK(x + i0, y + i0, NBLOCK,                                        \
                                 for (int k = 0; k < NBLOCK; k++) tu[k] =                       \
                                     fast32(tu[k], R_NEAREST, &fp, 0u));                        \
            }                                                                                   \
            const int64_t left = n - i0;                                                        \
            if (left > 0)                                                                       \
                SCALED_BLOCK(x + i0, y + i0, left,                                              \
                             for (int64_t k = 0; k < left; k++) tu[k] =                         \
                                 fast32(tu[k], R_NEAREST, &fp, 0u));                            \
            return;                                                                             \
        }                                                                                       \
        for (int64_t c0 = 0; c0 < n; c0 += MX_CHUNK) {                                          \
            const int64_t len = n - c0 < MX_CHUNK ? n - c0 : MX_CHUNK;                          \
            float *restrict yc = y + c0;                                                        \
            const float *restrict xc = x + c0;                                                  \
            for (int64_t k = 0; k < len; k++) yc[k] = xc[k] * s;                                \
            round((const uint32_t *)yc, (uint32_t *)yc, len, p, lo);                            \
            if (narrow)                                                                         \
                for (int64_t k = 0; k < len; k++) yc[k] = (float)((double)yc[k] * rs);          \
            else                                                                                \
                for (int64_t k = 0; k < len; k++) yc[k] = yc[k] / s;                            \
        }                                                                                       \
    }
MP_VARIANTS(DEFINE_SCALED_ROUND, scaled_round32)
typedef void (*scaled_round_fn)(const float *, float *, int64_t, float, const qparams *,
                                uint32_t, loop32_fn);
static const scaled_round_fn SCALED_ROUND32[3] = MP_TABLE(scaled_round32);

/* The largest |x| as a bit pattern (sign cleared): float magnitudes order as their patterns,
 * and any pattern above inf's is a NaN. One vectorised integer pass. */
#define DEFINE_ABSMAX(NAME, ATTR, ...)                                                          \
    ATTR static uint32_t NAME(const uint32_t *restrict x, int64_t n) {                         \
        uint32_t m = 0;                                                                         \
        for (int64_t k = 0; k < n; k++) {                                                       \
            const uint32_t v = x[k] & 0x7fffffffu;                                              \
            m = v > m ? v : m;                                                                  \
        }                                                                                       \
        return m;                                                                               \
    }
MP_VARIANTS(DEFINE_ABSMAX, absmax32)
typedef uint32_t (*absmax_fn)(const uint32_t *, int64_t);
static const absmax_fn ABSMAX32[3] = MP_TABLE(absmax32);

/* scaled.py's amax_to_scale_value in C, the same IEEE operations: the float32 reciprocal of
 * amax (inf for 0) times fmax, rounded to float32; 1.0 unless that is positive and finite (NaN
 * amax included). */
static float plain_scale(uint32_t amax_bits, double fmax) {
    if (amax_bits > 0x7f800000u) return 1.0f;
    float amax;
    memcpy(&amax, &amax_bits, sizeof amax);
    const float r = amax != 0.0f ? (float)(1.0 / (double)amax) : (float)HUGE_VAL;
    const float sc = (float)((double)r * fmax);
    return sc > 0.0f && sc < (float)HUGE_VAL ? sc : 1.0f;
}

/* current_scaled_round(in_ptr, out_ptr, n, fmax, M, emin, max_bits, ovf_bits, minnorm_bits,
 *                      zero_bits, flags, fast_lo) -> scale: see DEFINE_SCALED_ROUND; nearest,
 * with the format's parameters as quantize() gets them (saturating for fp8 recipes).
 * scaled_round_amax(in_ptr, out_ptr, n, fmax, amax_bits, M, ...): the same with the amax given
 * (the largest absmax32 of a tensor's parts: a part rounds as the whole's call would). */
static PyObject *scaled_round_call(PyObject *args, int given) {
    unsigned long long in_ptr, out_ptr, amax_bits = 0, max_bits, ovf_bits, minnorm_bits,
        zero_bits, flags, fast_lo;
    long long n, M, emin;
    double fmax;
    const int ok = given ? PyArg_ParseTuple(args, "KKLdKLLKKKKKK", &in_ptr, &out_ptr, &n, &fmax,
                                            &amax_bits, &M, &emin, &max_bits, &ovf_bits,
                                            &minnorm_bits, &zero_bits, &flags, &fast_lo)
                         : PyArg_ParseTuple(args, "KKLdLLKKKKKK", &in_ptr, &out_ptr, &n, &fmax,
                                            &M, &emin, &max_bits, &ovf_bits, &minnorm_bits,
                                            &zero_bits, &flags, &fast_lo);
    if (!ok) return NULL;
    if (n < 0 || amax_bits > 0xffffffffULL) {
        PyErr_SetString(PyExc_ValueError, "negative element count or bad amax pattern");
        return NULL;
    }
    qparams p = {M, emin, max_bits, ovf_bits, minnorm_bits, zero_bits, flags, 0, 0};
    if (!element_format(&p, "current_scaled_round")) return NULL;
    const int level = simd_level;
    float scale;
    Py_BEGIN_ALLOW_THREADS
    const float *x = (const float *)(uintptr_t)in_ptr;
    scale = plain_scale(given ? (uint32_t)amax_bits : ABSMAX32[level]((const uint32_t *)x, n),
                        fmax);
    SCALED_ROUND32[level](x, (float *)(uintptr_t)out_ptr, n, scale, &p, (uint32_t)fast_lo,
                          LOOPS32[R_NEAREST][level]);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble((double)scale);
}

static PyObject *py_current_scaled_round(PyObject *self, PyObject *args) {
    (void)self;
    return scaled_round_call(args, 0);
}

static PyObject *py_scaled_round_amax(PyObject *self, PyObject *args) {
    (void)self;
    return scaled_round_call(args, 1);
}

/* absmax32(in_ptr, n) -> the largest |x| bit pattern (x & 0x7fffffff) of n float32 values: NaN
 * patterns lie above inf's, so the largest of its parts' results is the whole tensor's */
static PyObject *py_absmax32(PyObject *self, PyObject *args) {
    unsigned long long in_ptr;
    long long n;
    (void)self;
    if (!PyArg_ParseTuple(args, "KL", &in_ptr, &n)) return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "negative element count");
        return NULL;
    }
    uint32_t m;
    const int level = simd_level;
    Py_BEGIN_ALLOW_THREADS
    m = ABSMAX32[level]((const uint32_t *)(uintptr_t)in_ptr, n);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLong((unsigned long)m);
}

/* mx_floor(in_ptr, out_ptr, outer, n, inner, block, down, smallest, M, emin, max_bits, ovf_bits,
 *          minnorm_bits, zero_bits, flags, fast_lo): see DEFINE_MX_FLOOR; in and out must not
 * overlap. The element format's parameters are quantize()'s (nearest, saturating). */
static PyObject *py_mx_floor(PyObject *self, PyObject *args) {
    unsigned long long in_ptr, out_ptr, max_bits, ovf_bits, minnorm_bits, zero_bits, flags, fast_lo;
    long long outer, n, inner, block, M, emin;
    double down, smallest;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKLLLLddLLKKKKKK", &in_ptr, &out_ptr, &outer, &n, &inner, &block,
                          &down, &smallest, &M, &emin, &max_bits, &ovf_bits, &minnorm_bits,
                          &zero_bits, &flags, &fast_lo))
        return NULL;
    if (outer < 0 || n < 0 || inner < 1 || block < 1) {
        PyErr_SetString(PyExc_ValueError, "mx_floor: bad shape or block size");
        return NULL;
    }
    qparams p = {M, emin, max_bits, ovf_bits, minnorm_bits, zero_bits, flags, 0, 0};
    if (!element_format(&p, "mx_floor")) return NULL;
    /* chunks of whole blocks of about MX_CHUNK elements: each pass over a chunk stays in cache,
     * and the rounding loop gets long runs (a lone 32-element block would take its scalar tail) */
    const int64_t per_block = block * inner;
    const int64_t per_chunk = per_block >= MX_CHUNK ? 1 : MX_CHUNK / per_block;
    float *scale = (float *)malloc((size_t)(2 * per_chunk * inner) * sizeof(float));
    uint32_t *bad = (uint32_t *)malloc((size_t)(2 * per_chunk * inner) * sizeof(uint32_t));
    if (scale == NULL || bad == NULL) {
        free(scale);
        free(bad);
        return PyErr_NoMemory();
    }
    float *inv = scale + per_chunk * inner;
    const int level = simd_level;
    Py_BEGIN_ALLOW_THREADS
    MX_FLOOR32[level]((const float *)(uintptr_t)in_ptr, (float *)(uintptr_t)out_ptr, outer, n,
                      inner, block, per_chunk, &p, (uint32_t)fast_lo, (float)down,
                      (float)smallest, scale, inv, bad, LOOPS32[R_NEAREST][level]);
    Py_END_ALLOW_THREADS
    free(scale);
    free(bad);
    Py_RETURN_NONE;
}

/* quantize(width, in_ptr, out_ptr, n, mode, M, emin, max_bits, ovf_bits, minnorm_bits,
 *          zero_bits, flags, seed, offset, fast_lo)
 * fast_lo: nonzero when the float32 fast path is valid for this format (1 <= M <= 22, emin >= -126,
 * not e8m0); 0 disables it. e8m0 is recognised from its parameters and takes its own path, for
 * both widths. */
static PyObject *py_quantize(PyObject *self, PyObject *args) {
    int width, mode;
    unsigned long long in_ptr, out_ptr;
    long long n, M, emin;
    unsigned long long max_bits, ovf_bits, minnorm_bits, zero_bits, flags, seed, offset, fast_lo;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKKLiLLKKKKKKKK", &width, &in_ptr, &out_ptr, &n, &mode, &M, &emin,
                          &max_bits, &ovf_bits, &minnorm_bits, &zero_bits, &flags, &seed,
                          &offset, &fast_lo))
        return NULL;
    if (mode < 0 || mode > 5) {
        PyErr_Format(PyExc_ValueError, "rounding mode code %d out of range", mode);
        return NULL;
    }
    if (width != 32 && width != 64) {
        PyErr_Format(PyExc_ValueError, "width must be 32 or 64, got %d", width);
        return NULL;
    }
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "negative element count");
        return NULL;
    }
    qparams p = {M, emin, max_bits, ovf_bits, minnorm_bits, zero_bits, flags, seed, offset};
    const int e8m0 = is_e8m0(&p, width);
    const uint32_t *in32 = (const uint32_t *)(uintptr_t)in_ptr;
    uint32_t *out32 = (uint32_t *)(uintptr_t)out_ptr;
    const uint64_t *in64 = (const uint64_t *)(uintptr_t)in_ptr;
    uint64_t *out64 = (uint64_t *)(uintptr_t)out_ptr;
    const int level = simd_level; /* one read: a concurrent simd() call changes only later calls */
    Py_BEGIN_ALLOW_THREADS
    if (e8m0 && width == 32) E8M0_32[mode][level](in32, out32, n, &p);
    else if (e8m0) E8M0_64[mode][level](in64, out64, n, &p);
    else if (width == 32) LOOPS32[mode][level](in32, out32, n, &p, (uint32_t)fast_lo);
    else LOOPS64[mode][level](in64, out64, n, &p);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* simd([name]) -> name: the instruction set the loops run ("avx512": x86-64-v4, "avx2":
 * x86-64-v3, "portable": the baseline); with a name, selects it (tests and benchmarks run every
 * version this CPU has). */
static const char *const SIMD_NAMES[3] = {"portable", "avx2", "avx512"};

static PyObject *py_simd(PyObject *self, PyObject *args) {
    const char *name = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "|s", &name)) return NULL;
    if (name != NULL) {
        int level = -1;
        for (int i = 0; i < 3; i++)
            if (strcmp(name, SIMD_NAMES[i]) == 0) level = i;
        if (level < 0 || level > simd_best) {
            PyErr_Format(PyExc_ValueError,
                         "simd level '%s' not available on this CPU; valid: 'portable' up to '%s'",
                         name, SIMD_NAMES[simd_best]);
            return NULL;
        }
        simd_level = level;
    }
    return PyUnicode_FromString(SIMD_NAMES[simd_level]);
}

static PyMethodDef methods[] = {
    {"quantize", py_quantize, METH_VARARGS,
     "Round n contiguous floats at in_ptr into out_ptr (may alias). Internal to mixprec."},
    {"mx_floor", py_mx_floor, METH_VARARGS,
     "Round float32 MX blocks (floor scale rule, nearest, saturating). Internal to mixprec."},
    {"current_scaled_round", py_current_scaled_round, METH_VARARGS,
     "round(x * s) / s of n float32 values, s = fmax / max|x| (fp8 current scaling); returns s."
     " Internal to mixprec."},
    {"scaled_round_amax", py_scaled_round_amax, METH_VARARGS,
     "current_scaled_round with the amax bit pattern given. Internal to mixprec."},
    {"absmax32", py_absmax32, METH_VARARGS,
     "The largest |x| bit pattern of float32 values. Internal to mixprec."},
    {"simd", py_simd, METH_VARARGS,
     "simd([name]) -> the loops' instruction set; with a name, select it (tests, benchmarks)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels",
                                    "mixprec CPU quantization kernels", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    init_simd();
    return PyModule_Create(&module);
}
