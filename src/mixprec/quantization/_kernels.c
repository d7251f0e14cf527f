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
#include <string.h>

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

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MP_CLONES
#endif
#define MP_INLINE static inline __attribute__((always_inline))

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

/* Fast path for finite results: rounding on the bit pattern itself. For |x| >= 2^q (q = emin - M,
 * the target's smallest subnormal) the target's quantum at x is a fixed number d <= 23 of
 * trailing pattern bits (d = 23 - M in the normal range, more below it), so rounding is integer
 * arithmetic on the pattern, and a carry into the exponent field is the correct next binade.
 * Below 2^q the result is 0 or 2^q. About a dozen vector ops per element, no float maths.
 * Overflow, inf/NaN inputs, and tiny inputs under stochastic rounding raise the block's flag;
 * such a block is redone with the general q32, so results never depend on which path ran. */
typedef struct {
    uint32_t d0;       /* 23 - M */
    int32_t emin_b;    /* emin + 127: biased exponent of the target's smallest normal */
    uint32_t q_bits;   /* pattern of 2^q */
    uint32_t half_q;   /* pattern of 2^(q-1), 0 when below float32's range */
    uint32_t maxb, minnorm, flush, no_negzero;
} fastp;

MP_INLINE uint32_t pow2_bits32(int32_t e) {
    return e >= -126 ? (uint32_t)(e + 127) << 23 : (e >= -149 ? 1u << (e + 149) : 0u);
}

MP_INLINE fastp make_fastp(const qparams *p) {
    const int32_t q = (int32_t)(p->emin - p->M);
    fastp f = {(uint32_t)(23 - p->M), (int32_t)p->emin + 127, pow2_bits32(q), pow2_bits32(q - 1),
               (uint32_t)p->max_bits, (uint32_t)p->minnorm_bits,
               (uint32_t)((p->flags & F_FLUSH) != 0), (uint32_t)((p->flags & F_NO_NEGZERO) != 0)};
    return f;
}

MP_INLINE uint32_t fast32(uint32_t u, const int mode, const fastp *f, uint32_t rnd,
                          uint32_t *flag) {
    /* written with uint32 arithmetic and selects only: mixed-width booleans stop gcc's
     * vectoriser */
    const uint32_t a = u & 0x7fffffffu;
    const uint32_t neg = u >> 31;                 /* 0/1: conditions use it, never `sign` */
    const uint32_t pos_mask = neg - 1u, neg_mask = 0u - neg;
    const uint32_t ef = a >> 23;
    const uint32_t efc = ef > 1u ? ef : 1u;
    const uint32_t emb = (uint32_t)f->emin_b;
    const uint32_t below = emb > efc ? emb - efc : 0u;
    const uint32_t dd = f->d0 + below;
    const uint32_t d = dd < 23u ? dd : 23u; /* only tiny inputs exceed 23; replaced below */
    const uint32_t mask = (1u << d) - 1u;
    /* the last kept significand bit: bit d of the pattern, except at d = 23 where it is the
     * implicit bit (1 for a normal input), not the exponent field's low bit */
    const uint32_t lsb = d == 23u ? (ef != 0u ? 1u : 0u) : ((a >> d) & 1u);
    uint32_t r;
    if (mode == R_NEAREST) r = (a + (mask >> 1) + lsb) & ~mask;
    else if (mode == R_STOCHASTIC) r = (a + (mask ^ (rnd >> (32 - d)))) & ~mask; /* as q32 */
    else if (mode == R_UP) r = (a + (mask & pos_mask)) & ~mask;
    else if (mode == R_DOWN) r = (a + (mask & neg_mask)) & ~mask;
    else if (mode == R_ODD) r = (a & ~mask) | (((a & mask) != 0u ? (lsb ^ 1u) : 0u) << d);
    else r = a & ~mask;
    uint32_t rt;
    if (mode == R_NEAREST) rt = a > f->half_q ? f->q_bits : 0u;
    else if (mode == R_UP) rt = a != 0u ? (f->q_bits & pos_mask) : 0u;
    else if (mode == R_DOWN) rt = a != 0u ? (f->q_bits & neg_mask) : 0u;
    else if (mode == R_ODD) rt = a != 0u ? f->q_bits : 0u;
    else rt = 0u;
    uint32_t bad = 0u;
    if (mode == R_STOCHASTIC) bad = a < f->q_bits ? (a != 0u ? 1u : 0u) : 0u;
    r = a < f->q_bits ? rt : r;
    r = r < (f->minnorm & (0u - f->flush)) ? 0u : r; /* minnorm is 0 unless flushing */
    bad |= r > f->maxb ? 1u : 0u;
    *flag = bad;
    return r | ((r != 0u ? neg : (neg & (f->no_negzero ^ 1u))) << 31); /* vectorises */
}

#define BLOCK 64
#define DEFINE_LOOP32(NAME, MODE)                                                               \
    MP_CLONES static void NAME(const uint32_t *in, uint32_t *out, int64_t n, const qparams *p,  \
                               uint32_t lo) {                                                   \
        const qparams pp = *p;                                                                  \
        const fastp fp = make_fastp(&pp);                                                       \
        uint32_t tmp[BLOCK];                                                                    \
        for (int64_t i0 = 0; i0 < n; i0 += BLOCK) {                                             \
            const int64_t len = n - i0 < BLOCK ? n - i0 : BLOCK;                                \
            uint32_t flag = lo == 0;                                                            \
            if (!flag) {                                                                        \
                uint32_t acc = 0, bad[BLOCK];                                                   \
                for (int64_t i = 0; i < len; i++) {                                            \
                    const uint32_t rnd = MODE == R_STOCHASTIC ? rand32(&pp, (uint64_t)(i0 + i)) \
                                                              : 0u;                             \
                    tmp[i] = fast32(in[i0 + i], MODE, &fp, rnd, &bad[i]);                       \
                }                                                                               \
                for (int64_t i = 0; i < len; i++) acc |= bad[i];                                \
                flag = acc;                                                                     \
            }                                                                                   \
            if (flag) {                                                                         \
                for (int64_t i = 0; i < len; i++)                                               \
                    out[i0 + i] = q32(in[i0 + i], &pp, MODE, (uint64_t)(i0 + i));               \
            } else {                                                                            \
                memcpy(out + i0, tmp, (size_t)len * sizeof(uint32_t));                          \
            }                                                                                   \
        }                                                                                       \
    }
DEFINE_LOOP32(loop32_nearest, R_NEAREST)
DEFINE_LOOP32(loop32_stochastic, R_STOCHASTIC)
DEFINE_LOOP32(loop32_toward_zero, R_TOWARD_ZERO)
DEFINE_LOOP32(loop32_up, R_UP)
DEFINE_LOOP32(loop32_down, R_DOWN)
DEFINE_LOOP32(loop32_odd, R_ODD)

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

#define DEFINE_LOOP64(NAME, MODE)                                                               \
    MP_CLONES static void NAME(const uint64_t *in, uint64_t *out, int64_t n, const qparams *p) { \
        const qparams pp = *p;                                                                  \
        for (int64_t i = 0; i < n; i++) out[i] = q64(in[i], &pp, MODE, (uint64_t)i);           \
    }
DEFINE_LOOP64(loop64_nearest, R_NEAREST)
DEFINE_LOOP64(loop64_stochastic, R_STOCHASTIC)
DEFINE_LOOP64(loop64_toward_zero, R_TOWARD_ZERO)
DEFINE_LOOP64(loop64_up, R_UP)
DEFINE_LOOP64(loop64_down, R_DOWN)
DEFINE_LOOP64(loop64_odd, R_ODD)

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
    return p->M == 0 && p->emin == -127 && p->flags == F_NEG_NAN && p->zero_bits == lo &&
           p->max_bits == mx;
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

/* float32 stochastic: rand32's bits, drawn in runs where the index's high word is constant, so
 * the hashing stays in 32-bit lanes (64-bit index arithmetic halves the vector width). */
MP_CLONES static void e8m0_32_stochastic(const uint32_t *in, uint32_t *out, int64_t n,
                                         const qparams *p) {
    const uint32_t maxb = (uint32_t)p->max_bits, ovfb = (uint32_t)p->ovf_bits;
    const uint32_t s_lo = (uint32_t)p->seed, s_hi = (uint32_t)(p->seed >> 32);
    for (int64_t start = 0; start < n;) {
        const uint64_t g = (uint64_t)start + p->offset;
        const uint32_t lo0 = (uint32_t)g, c = (uint32_t)(g >> 32) + s_hi;
        const int64_t left = (int64_t)((1ULL << 32) - lo0); /* indices before the high word ticks */
        const int64_t len = n - start < left ? n - start : left;
        const uint32_t *src = in + start;
        uint32_t *dst = out + start;
        for (int64_t i = 0; i < len; i++) {
            const uint32_t rnd = mix32(mix32((lo0 + (uint32_t)i) ^ s_lo) + c);
            dst[i] = e8m0_32(src[i], R_STOCHASTIC, rnd, maxb, ovfb);
        }
        start += len;
    }
}

/* in == out (quantize_) gets its own loop: with one pointer the vectoriser needs no overlap
 * check. The random draws are q32's / q64's, indexed the same way. */
#define DEFINE_E8M0_LOOP(NAME, MODE, T, FN, RND)                                                \
    MP_CLONES static void NAME(const T *in, T *out, int64_t n, const qparams *p) {              \
        const qparams pp = *p;                                                                  \
        const T maxb = (T)pp.max_bits, ovfb = (T)pp.ovf_bits;                                   \
        if ((const T *)out == in) {                                                             \
            for (int64_t i = 0; i < n; i++)                                                     \
                out[i] = FN(out[i], MODE, MODE == R_STOCHASTIC ? RND : 0u, maxb, ovfb);         \
        } else {                                                                                \
            for (int64_t i = 0; i < n; i++)                                                     \
                out[i] = FN(in[i], MODE, MODE == R_STOCHASTIC ? RND : 0u, maxb, ovfb);          \
        }                                                                                       \
    }
#define RND64 (mix64(mix64((uint64_t)i + pp.offset) ^ pp.seed) >> 2)
#define DEFINE_E8M0_LOOPS(SUFFIX, MODE)                                                         \
    DEFINE_E8M0_LOOP(e8m0_32_##SUFFIX, MODE, uint32_t, e8m0_32, 0u)                             \
    DEFINE_E8M0_LOOP(e8m0_64_##SUFFIX, MODE, uint64_t, e8m0_64, RND64)
DEFINE_E8M0_LOOPS(nearest, R_NEAREST)
DEFINE_E8M0_LOOP(e8m0_64_stochastic, R_STOCHASTIC, uint64_t, e8m0_64, RND64)
DEFINE_E8M0_LOOPS(toward_zero, R_TOWARD_ZERO)
DEFINE_E8M0_LOOPS(up, R_UP)
DEFINE_E8M0_LOOPS(down, R_DOWN)
DEFINE_E8M0_LOOPS(odd, R_ODD)

/* ------------------------------------------------------------------------------------------ */
/* Python binding                                                                              */
/* ------------------------------------------------------------------------------------------ */

typedef void (*loop32_fn)(const uint32_t *, uint32_t *, int64_t, const qparams *, uint32_t);
typedef void (*loop64_fn)(const uint64_t *, uint64_t *, int64_t, const qparams *);
static const loop32_fn LOOPS32[6] = {loop32_nearest, loop32_stochastic, loop32_toward_zero,
                                     loop32_up, loop32_down, loop32_odd};
static const loop64_fn LOOPS64[6] = {loop64_nearest, loop64_stochastic, loop64_toward_zero,
                                     loop64_up, loop64_down, loop64_odd};
typedef void (*e8m0_32_fn)(const uint32_t *, uint32_t *, int64_t, const qparams *);
static const e8m0_32_fn E8M0_32[6] = {e8m0_32_nearest, e8m0_32_stochastic, e8m0_32_toward_zero,
                                      e8m0_32_up, e8m0_32_down, e8m0_32_odd};
static const loop64_fn E8M0_64[6] = {e8m0_64_nearest, e8m0_64_stochastic, e8m0_64_toward_zero,
                                     e8m0_64_up, e8m0_64_down, e8m0_64_odd};

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
    Py_BEGIN_ALLOW_THREADS
    if (e8m0 && width == 32)
        E8M0_32[mode]((const uint32_t *)(uintptr_t)in_ptr, (uint32_t *)(uintptr_t)out_ptr, n, &p);
    else if (e8m0)
        E8M0_64[mode]((const uint64_t *)(uintptr_t)in_ptr, (uint64_t *)(uintptr_t)out_ptr, n, &p);
    else if (width == 32)
        LOOPS32[mode]((const uint32_t *)(uintptr_t)in_ptr, (uint32_t *)(uintptr_t)out_ptr, n, &p,
                      (uint32_t)fast_lo);
    else
        LOOPS64[mode]((const uint64_t *)(uintptr_t)in_ptr, (uint64_t *)(uintptr_t)out_ptr, n, &p);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"quantize", py_quantize, METH_VARARGS,
     "Round n contiguous floats at in_ptr into out_ptr (may alias). Internal to mixprec."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels",
                                    "mixprec CPU quantization kernels", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
