/* The sanitizer's per-op passes over a result and its float64 shadow, fused (internal to mixprec).
 *
 * mixprec.sanitizer.measurement compares every shadowed op's real result r (float32 or bfloat16)
 * with its float64 shadow s. In torch that is four to ten elementwise passes and as many small
 * temporaries per op; here each test is one pass without temporaries. Every function computes
 * exactly what the torch expressions beside it in measurement.py compute (same float32 /
 * float64 operations in the same order), so both paths take the same decisions.
 *
 * Only contiguous CPU buffers are passed in; the caller keeps the torch path for the rest.
 * Needs only the Python headers and a C compiler (never torch).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MP_CLONES
#endif

enum { R_F32 = 0, R_BF16 = 1 };
#define LANES 16 /* independent accumulators: the reductions vectorise without reassociation */

static inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#define R_AT(i) (kind == R_F32 ? ((const float *)r)[i] : bf16_to_f32(((const uint16_t *)r)[i]))

/* Pass 1 (torch: s32 = s.float(); aminmax(s32); aminmax(s32 - r)): out[0] = max|float32(s) - r|
 * in float32, out[1] = max|float32(s)|, out[2] = 1 when some difference is not finite (a NaN or
 * inf in r or s, or |s| beyond float32). `chk` sums d * 0: it stays 0 unless some d is inf or NaN
 * (float lanes only, so the loop vectorises). One loop per real dtype. */
#define DEFINE_PASS_MAX(NAME, T, LOAD)                                                          \
    MP_CLONES static void NAME(const T *r, const double *s, int64_t n, double *out) {           \
        float dm[LANES] = {0}, sm[LANES] = {0}, chk[LANES] = {0};                               \
        int64_t i = 0;                                                                          \
        for (; i + LANES <= n; i += LANES) {                                                    \
            for (int j = 0; j < LANES; j++) {                                                   \
                const float sf = (float)s[i + j], d = fabsf(sf - LOAD(r[i + j])), a = fabsf(sf); \
                dm[j] = d > dm[j] ? d : dm[j];                                                  \
                sm[j] = a > sm[j] ? a : sm[j];                                                  \
                chk[j] += d * 0.0f;                                                             \
            }                                                                                   \
        }                                                                                       \
        for (int64_t k = i; k < n; k++) {                                                       \
            const float sf = (float)s[k], d = fabsf(sf - LOAD(r[k])), a = fabsf(sf);            \
            dm[0] = d > dm[0] ? d : dm[0];                                                      \
            sm[0] = a > sm[0] ? a : sm[0];                                                      \
            chk[0] += d * 0.0f;                                                                 \
        }                                                                                       \
        float dmax = 0.0f, smax = 0.0f, c = 0.0f;                                               \
        for (int j = 0; j < LANES; j++) {                                                       \
            dmax = dm[j] > dmax ? dm[j] : dmax;                                                 \
            smax = sm[j] > smax ? sm[j] : smax;                                                 \
            c += chk[j];                                                                        \
        }                                                                                       \
        out[0] = dmax;                                                                          \
        out[1] = smax;                                                                          \
        out[2] = c != 0.0f;                                                                     \
    }
#define LOAD_F32(x) (x)
DEFINE_PASS_MAX(pass_max_f32, float, LOAD_F32)
DEFINE_PASS_MAX(pass_max_bf16, uint16_t, bf16_to_f32)

static void pass_max(const void *r, int kind, const double *s, int64_t n, double *out) {
    if (kind == R_F32)
        pass_max_f32((const float *)r, s, n, out);
    else
        pass_max_bf16((const uint16_t *)r, s, n, out);
}

/* torch: (s32 - r).abs_().div_(s.float().abs_().clamp_(min=floor)).amax(), all float32. */
MP_CLONES static float pass_ratio32(const void *r, int kind, const double *s, int64_t n,
                                    float floor) {
    float m[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        for (int j = 0; j < LANES; j++) {
            const float sf = (float)s[i + j], a = fabsf(sf);
            const float q = fabsf(sf - R_AT(i + j)) / (a < floor ? floor : a);
            m[j] = q > m[j] ? q : m[j];
        }
    }
    for (int64_t k = i; k < n; k++) {
        const float sf = (float)s[k], a = fabsf(sf);
        const float q = fabsf(sf - R_AT(k)) / (a < floor ? floor : a);
        m[0] = q > m[0] ? q : m[0];
    }
    float mx = 0.0f;
    for (int j = 0; j < LANES; j++) mx = m[j] > mx ? m[j] : mx;
    return mx;
}

/* torch: a = s.abs(); floor = max(a.amax() * frac, tiny);
 *        (r - s).abs_().div_(a.clamp_(min=floor)).amax(), all float64. */
MP_CLONES static double pass_ratio64(const void *r, int kind, const double *s, int64_t n,
                                     double frac, double tiny) {
    double am[LANES] = {0}, m[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) {
            const double a = fabs(s[i + j]);
            am[j] = a > am[j] ? a : am[j];
        }
    for (int64_t k = i; k < n; k++) {
        const double a = fabs(s[k]);
        am[0] = a > am[0] ? a : am[0];
    }
    double amax = 0.0;
    for (int j = 0; j < LANES; j++) amax = am[j] > amax ? am[j] : amax;
    double floor = amax * frac;
    floor = floor < tiny ? tiny : floor;
    for (i = 0; i + LANES <= n; i += LANES) {
        for (int j = 0; j < LANES; j++) {
            const double a = fabs(s[i + j]);
            const double q = fabs((double)R_AT(i + j) - s[i + j]) / (a < floor ? floor : a);
            m[j] = q > m[j] ? q : m[j];
        }
    }
    for (int64_t k = i; k < n; k++) {
        const double a = fabs(s[k]);
        const double q = fabs((double)R_AT(k) - s[k]) / (a < floor ? floor : a);
        m[0] = q > m[0] ? q : m[0];
    }
    double mx = 0.0;
    for (int j = 0; j < LANES; j++) mx = m[j] > mx ? m[j] : mx;
    return mx;
}

/* A result or shadow holding inf or NaN (torch: rs = r.double(); same = (rs == s) | both NaN;
 * a = where(isfinite(s), |s|, 0); d = where(same, 0, |rs - s|); floor = max(a.amax() * frac,
 * tiny); then d.amax() and (d / max(a, floor)).amax(), which propagate NaN):
 * out[0] = max d, out[1] = max a, out[2] = max d / max(a, floor), out[3] = 1 when every r is
 * finite. A d is NaN exactly where one of r, s is NaN: out[0] and out[2] are NaN then, as
 * torch's amax makes them. Rare (only such results come here): plain loops. */
static void pass_nonfinite(const void *r, int kind, const double *s, int64_t n, double frac,
                           double tiny, double *out) {
    double dm = 0.0, am = 0.0;
    int nan_d = 0, r_finite = 1;
    for (int64_t k = 0; k < n; k++) {
        const double rv = (double)R_AT(k), sv = s[k];
        if (!isfinite(rv)) r_finite = 0;
        const double a = isfinite(sv) ? fabs(sv) : 0.0;
        am = a > am ? a : am;
        if (rv == sv || (isnan(rv) && isnan(sv))) continue;
        const double d = fabs(rv - sv);
        if (isnan(d))
            nan_d = 1;
        else
            dm = d > dm ? d : dm;
    }
    double floor = am * frac, q = 0.0;
    floor = floor < tiny ? tiny : floor;
    for (int64_t k = 0; k < n && !nan_d; k++) {
        const double rv = (double)R_AT(k), sv = s[k];
        if (rv == sv || (isnan(rv) && isnan(sv))) continue;
        const double a = isfinite(sv) ? fabs(sv) : 0.0, d = fabs(rv - sv) / (a < floor ? floor : a);
        q = d > q ? d : q;
    }
    out[0] = nan_d ? NAN : dm;
    out[1] = am;
    out[2] = nan_d ? NAN : q;
    out[3] = r_finite;
}

/* Gradient histogram: counts[(bits >> shift) & mask] += 1 over every `step`-th of n contiguous
 * floats (torch: bincount of the biased exponent field of a strided sample), and the largest
 * finite |g| over all n (0 when none is finite). width 32 or 64. */
#define DEFINE_GRAD_STATS(NAME, T, FT, SHIFT, MASK, FABS)                                       \
    static double NAME(const T *u, const FT *f, int64_t n, int64_t step, int64_t *counts) {     \
        for (int64_t i = 0; i < n; i += step) counts[(u[i] >> SHIFT) & MASK]++;                 \
        FT m[LANES] = {0};                                                                      \
        int64_t i = 0;                                                                          \
        for (; i + LANES <= n; i += LANES)                                                      \
            for (int j = 0; j < LANES; j++) {                                                   \
                const FT a = FABS(f[i + j]);                                                    \
                m[j] = (a > m[j] && a <= MAXV(FT)) ? a : m[j];                                  \
            }                                                                                   \
        for (int64_t k = i; k < n; k++) {                                                       \
            const FT a = FABS(f[k]);                                                            \
            m[0] = (a > m[0] && a <= MAXV(FT)) ? a : m[0];                                      \
        }                                                                                       \
        FT mx = 0;                                                                              \
        for (int j = 0; j < LANES; j++) mx = m[j] > mx ? m[j] : mx;                             \
        return (double)mx;                                                                      \
    }
#define MAXV(FT) (sizeof(FT) == 4 ? (FT)FLT_MAX : (FT)DBL_MAX)
DEFINE_GRAD_STATS(grad_stats32, uint32_t, float, 23, 0xFFu, fabsf)
DEFINE_GRAD_STATS(grad_stats64, uint64_t, double, 52, 0x7FFu, fabs)

/* ------------------------------------------------------------------------------------------ */
/* Python binding                                                                              */
/* ------------------------------------------------------------------------------------------ */

static int check_kind(int kind) {
    if (kind != R_F32 && kind != R_BF16) {
        PyErr_Format(PyExc_ValueError, "real dtype code %d out of range", kind);
        return 0;
    }
    return 1;
}

static PyObject *py_max_pass(PyObject *self, PyObject *args) {
    unsigned long long rp, sp;
    long long n;
    int kind;
    double out[3];
    (void)self;
    if (!PyArg_ParseTuple(args, "KiKL", &rp, &kind, &sp, &n) || !check_kind(kind)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    pass_max((const void *)(uintptr_t)rp, kind, (const double *)(uintptr_t)sp, n, out);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("ddO", out[0], out[1], out[2] ? Py_True : Py_False);
}

static PyObject *py_ratio32(PyObject *self, PyObject *args) {
    unsigned long long rp, sp;
    long long n;
    int kind;
    float floor, m;
    (void)self;
    if (!PyArg_ParseTuple(args, "KiKLf", &rp, &kind, &sp, &n, &floor) || !check_kind(kind))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    m = pass_ratio32((const void *)(uintptr_t)rp, kind, (const double *)(uintptr_t)sp, n, floor);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble((double)m);
}

static PyObject *py_ratio64(PyObject *self, PyObject *args) {
    unsigned long long rp, sp;
    long long n;
    int kind;
    double frac, tiny, m;
    (void)self;
    if (!PyArg_ParseTuple(args, "KiKLdd", &rp, &kind, &sp, &n, &frac, &tiny) || !check_kind(kind))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    m = pass_ratio64((const void *)(uintptr_t)rp, kind, (const double *)(uintptr_t)sp, n, frac,
                     tiny);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(m);
}

static PyObject *py_nonfinite(PyObject *self, PyObject *args) {
    unsigned long long rp, sp;
    long long n;
    int kind;
    double frac, tiny, out[4];
    (void)self;
    if (!PyArg_ParseTuple(args, "KiKLdd", &rp, &kind, &sp, &n, &frac, &tiny) || !check_kind(kind))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    pass_nonfinite((const void *)(uintptr_t)rp, kind, (const double *)(uintptr_t)sp, n, frac, tiny,
                   out);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("dddO", out[0], out[1], out[2], out[3] ? Py_True : Py_False);
}

static PyObject *py_grad_stats(PyObject *self, PyObject *args) {
    unsigned long long gp, cp;
    long long n, step;
    int width;
    double mx;
    (void)self;
    if (!PyArg_ParseTuple(args, "KiLLK", &gp, &width, &n, &step, &cp)) return NULL;
    if (width != 32 && width != 64) {
        PyErr_Format(PyExc_ValueError, "width must be 32 or 64, got %d", width);
        return NULL;
    }
    if (step < 1) {
        PyErr_Format(PyExc_ValueError, "step must be >= 1, got %lld", step);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (width == 32)
        mx = grad_stats32((const uint32_t *)(uintptr_t)gp, (const float *)(uintptr_t)gp, n, step,
                          (int64_t *)(uintptr_t)cp);
    else
        mx = grad_stats64((const uint64_t *)(uintptr_t)gp, (const double *)(uintptr_t)gp, n, step,
                          (int64_t *)(uintptr_t)cp);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(mx);
}

static PyMethodDef methods[] = {
    {"max_pass", py_max_pass, METH_VARARGS,
     "(max|f32(s) - r|, max|f32(s)|, non-finite?) of n elements. Internal."},
    {"ratio32", py_ratio32, METH_VARARGS,
     "max |f32(s) - r| / max(|f32(s)|, floor) in float32. Internal."},
    {"ratio64", py_ratio64, METH_VARARGS,
     "max |r - s| / max(|s|, max(max|s| * frac, tiny)) in float64. Internal."},
    {"nonfinite", py_nonfinite, METH_VARARGS,
     "(max d, max finite |s|, max d / max(|s|, floor), every r finite?) where non-finite values"
     " that agree count as exact. Internal."},
    {"grad_stats", py_grad_stats, METH_VARARGS,
     "Exponent counts of every step-th of n floats into an int64 array; max finite |g|."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_checks",
                                    "mixprec sanitizer comparison passes", -1, methods};

PyMODINIT_FUNC PyInit__checks(void) { return PyModule_Create(&module); }
