/* sample_select.h: the vector pieces of sample_cpu.c's selection, at the register
 * width (GCC vector extensions, VLEN lanes from isa.h): lane helpers (loads with a
 * filled tail, max / min, float64 widening sums, compress to memory), the class counts
 * and masses around two pivots (classify), the copies between bounds (keep_between,
 * keep_pairs), a branch-free sort of at most SMALL values, and the two sampled
 * selections: select_rank (the value of a rank) and select_mass (the top-p crossing).
 * Included by sample_cpu.c only, after its NBP_ISA_<isa> is defined; cpu_build.py
 * hashes every header of this folder into each library's cache key.
 */
#ifndef NBP_SAMPLE_SELECT_H
#define NBP_SAMPLE_SELECT_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "isa.h"   /* VLEN */

#define LANES VLEN
#if defined(NBP_ISA_AVX512)
#  define HALF_LO 0, 1, 2, 3, 4, 5, 6, 7
#  define HALF_HI 8, 9, 10, 11, 12, 13, 14, 15
#elif defined(NBP_ISA_AVX2)
#  define HALF_LO 0, 1, 2, 3
#  define HALF_HI 4, 5, 6, 7
#else
#  define HALF_LO 0, 1
#  define HALF_HI 2, 3
#endif

#define SAMPLE 64   /* elements sampled to place a selection pass's two pivots */
#define BAND 4      /* sample ranks each side of the estimate (~2 sigma at a quarter) */
#define SMALL 64    /* sets this small are sorted outright (= SAMPLE, a multiple of LANES) */

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef float vf_u __attribute__((vector_size(LANES * 4), aligned(4)));   /* unaligned loads */
typedef int32_t vi __attribute__((vector_size(LANES * 4)));               /* lane masks: -1 / 0 */
typedef float vh __attribute__((vector_size(LANES * 2)));
typedef double vd __attribute__((vector_size(LANES * 4)));                /* LANES / 2 doubles */
typedef double double_u __attribute__((aligned(4), may_alias));   /* float scratch as doubles */

#include "vmath.h"   /* vexp */

static inline vf splat(float v) { return (vf){0} + v; }

static inline vf load(const float *p) { return *(const vf_u *)p; }

/* n (< LANES) floats of p, the other lanes fill */
static inline vf load_tail(const float *p, int64_t n, float fill) {
    float buf[LANES];
    for (int i = 0; i < LANES; i++) buf[i] = i < n ? p[i] : fill;
    return load(buf);
}

static inline vf select_mask(vi mask, vf v) { return (vf)((vi)v & mask); }   /* v or +0.0 */

static inline vd widen_sum(vf v) {   /* LANES floats -> LANES / 2 doubles (pairwise sums) */
#if defined(NBP_ISA_AVX512)   /* GCC split __builtin_convertvector into 4-lane pieces */
    __m512 x = (__m512)v;
    return (vd)_mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(x)),
                             _mm512_cvtps_pd((__m256)_mm512_extractf64x4_pd((__m512d)x, 1)));
#elif defined(NBP_ISA_AVX2)
    __m256 x = (__m256)v;
    return (vd)_mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)),
                             _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
#else
    vh lo = __builtin_shufflevector(v, v, HALF_LO), hi = __builtin_shufflevector(v, v, HALF_HI);
    return __builtin_convertvector(lo, vd) + __builtin_convertvector(hi, vd);
#endif
}

static inline double reduce_add(vd v) {
    double s = 0.0;
    for (int i = 0; i < LANES / 2; i++) s += v[i];
    return s;
}

static inline int64_t count(vi mask) {   /* lanes set in mask (or -(sum) of summed masks) */
    int64_t n = 0;
    for (int i = 0; i < LANES; i++) n -= mask[i];
    return n;
}

/* stores the lanes of v where mask is set, in order, at dst (room for LANES);
 * returns how many */
static inline int64_t compress_store(float *dst, vf v, vi mask) {
#if defined(NBP_ISA_AVX512)
    __mmask16 k = _mm512_movepi32_mask((__m512i)mask);
    _mm512_storeu_ps(dst, _mm512_maskz_compress_ps(k, (__m512)v));
    return __builtin_popcount(k);
#elif defined(NBP_ISA_AVX2)
    static int32_t table[256][8];   /* lane order of each 8-bit mask's set lanes */
    static int ready;
    if (!__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) {   /* idempotent: races write equal values */
        for (int m = 0; m < 256; m++)
            for (int i = 0, o = 0; i < 8; i++)
                if (m >> i & 1) table[m][o++] = i;
        __atomic_store_n(&ready, 1, __ATOMIC_RELEASE);
    }
    int k = _mm256_movemask_ps((__m256)mask);
    __m256i idx = _mm256_loadu_si256((const __m256i *)table[k]);
    _mm256_storeu_ps(dst, _mm256_permutevar8x32_ps((__m256)v, idx));
    return __builtin_popcount(k);
#else
    int64_t out = 0;
    for (int i = 0; i < LANES; i++) {   /* branch-free: always store, advance if kept */
        dst[out] = v[i];
        out -= mask[i];
    }
    return out;
#endif
}

/* exp(v - m) on the lanes of v[0..n) (n <= LANES), 0 elsewhere */
static inline vf exp_shifted(const float *v, int64_t n, vf m) {
    return vexp((n >= LANES ? load(v) : load_tail(v, n, -INFINITY)) - m);
}

/* ---- selection ---------------------------------------------------------- */

typedef struct { int64_t n_gt, n_ge; double m_gt, m_ge; } classes_t;

/* classify's counts and sums over src[0..m) (m <= LANES; weights e[0..m) if e) */
static inline void classify_vec(const float *src, const float *e, int64_t m, vf vlo, vf vhi,
                                vi *n_gt, vi *n_ge, vd *mg, vd *mb) {
    /* NaN fills the tail: it compares false with any pivot, -inf included */
    vf v = m >= LANES ? load(src) : load_tail(src, m, NAN);
    vi gt = v > vhi, ge = v >= vlo;
    *n_gt += gt;
    *n_ge += ge;
    if (e) {
        vf w = m >= LANES ? load(e) : load_tail(e, m, 0.0f);
        *mg += widen_sum(select_mask(gt, w));
        *mb += widen_sum(select_mask(ge, w));
    }
}

/* counts of x > hi and of x >= lo in src[0..n), and if e, the sums of their weights e[0..n) */
static classes_t classify(const float *src, const float *e, int64_t n, float lo, float hi) {
    vf vlo = splat(lo), vhi = splat(hi);
    vd mg0 = {0}, mb0 = {0}, mg1 = {0}, mb1 = {0};
    vi n_gt = {0}, n_ge = {0};
    int64_t i = 0;
    for (; i + 2 * LANES <= n; i += 2 * LANES) {   /* two chains: one float64 add's latency bound one */
        classify_vec(src + i, e ? e + i : 0, LANES, vlo, vhi, &n_gt, &n_ge, &mg0, &mb0);
        classify_vec(src + i + LANES, e ? e + i + LANES : 0, LANES, vlo, vhi, &n_gt, &n_ge,
                     &mg1, &mb1);
    }
    for (; i < n; i += LANES)
        classify_vec(src + i, e ? e + i : 0, n - i, vlo, vhi, &n_gt, &n_ge, &mg0, &mb0);
    return (classes_t){count(n_gt), count(n_ge), reduce_add(mg0 + mg1), reduce_add(mb0 + mb1)};
}

/* copies the x of src[0..n) with lo <= x <= hi to dst (room for n + LANES); returns how
 * many, and if n_above, how many are > hi */
static int64_t keep_between(const float *src, int64_t n, float lo, float hi, float *dst,
                            int64_t *n_above) {
    vf vlo = splat(lo), vhi = splat(hi);
    vi above = {0};
    int64_t out = 0;
    for (int64_t i = 0; i < n; i += LANES) {
        vf v = n - i >= LANES ? load(src + i) : load_tail(src + i, n - i, NAN);
        vi gt = v > vhi;
        if (n_above) above += gt;
        out += compress_store(dst + out, v, (v >= vlo) & ~gt);
    }
    if (n_above) *n_above = count(above);
    return out;
}

/* t[0..n) (n <= SMALL, no NaN; t has SMALL floats) sorted descending into s: each
 * goes to its rank (larger values, then equal ones earlier in t, before it), counted
 * with vector compares, LANES elements of t at a time against each element in turn:
 * no branches to mispredict, unlike a comparison sort of fresh data, and no
 * horizontal sum per element. An element earlier in t than a whole vector counts
 * where >=, one later where >; only the vector's own span needs the index test. */
static void sort_descending(float *t, int64_t n, float *s) {
    vi lane;
    for (int i = 0; i < LANES; i++) lane[i] = i;
    for (int64_t i = n; i < SMALL; i++) t[i] = -INFINITY;   /* never read below: j < n */
    for (int32_t b = 0; b < n; b += LANES) {
        vf v = load(t + b);
        vi rank = {0}, at = lane + b;
        int32_t j = 0;
        for (; j < b; j++)
            rank -= splat(t[j]) >= v;
        for (; j < b + LANES && j < n; j++) {
            vf u = splat(t[j]);
            rank -= (u > v) | ((u == v) & (at > j));
        }
        for (; j < n; j++)
            rank -= splat(t[j]) > v;
        for (int l = 0; l < LANES && b + l < n; l++)
            s[rank[l]] = v[l];
    }
}

/* SAMPLE (= SMALL) strided elements of src[0..n) (n > SMALL, no NaN), sorted
 * descending into s */
static void sample_sorted(const float *src, int64_t n, float *s) {
    float t[SAMPLE];
    for (int64_t i = 0; i < SAMPLE; i++) t[i] = src[i * n / SAMPLE + n / (2 * SAMPLE)];
    sort_descending(t, SAMPLE, s);
}

/* The pivots around sample index est; when the band would hold the whole set
 * (no progress), a single pivot: one of the set's values, so every pass shrinks it. */
static void pivots(const float *s, int64_t est, float *lo, float *hi) {
    *hi = s[est > BAND ? est - BAND : 0];
    *lo = s[est + BAND < SAMPLE ? est + BAND : SAMPLE - 1];
}

static int no_progress(classes_t c, int64_t n) { return c.n_gt == 0 && c.n_ge == n; }

/* the value of rank r (1 = largest) among src[0..n); a, b: n + 16 floats each */
static float select_rank(const float *src, int64_t n, int64_t r, float *a, float *b) {
    float s[SAMPLE], lo, hi, *dst = a;
    while (n > SMALL) {
        sample_sorted(src, n, s);
        int64_t est = (r - 1) * SAMPLE / n;
        pivots(s, est, &lo, &hi);
        classes_t c = classify(src, NULL, n, lo, hi);
        if (r > c.n_gt && r <= c.n_ge && no_progress(c, n)) {
            lo = hi = s[est];
            c = classify(src, NULL, n, lo, hi);
        }
        if (r <= c.n_gt) {
            n = keep_between(src, n, nextafterf(hi, INFINITY), INFINITY, dst, NULL);
        } else if (r > c.n_ge) {
            r -= c.n_ge;
            n = keep_between(src, n, -INFINITY, nextafterf(lo, -INFINITY), dst, NULL);
        } else {
            if (lo == hi) return lo;
            r -= c.n_gt;
            n = keep_between(src, n, lo, hi, dst, NULL);
        }
        src = dst;
        dst = dst == a ? b : a;
    }
    float t[SMALL], small[SMALL];
    for (int64_t i = 0; i < n; i++) t[i] = src[i];
    sort_descending(t, n, small);
    return small[r - 1];
}

/* copies the (x, aux) pairs of [0..n) with lo <= x <= hi to (dx, daux) (room for n + LANES
 * each), in order; aux: any 32-bit data (moved as bits); returns how many */
static int64_t keep_pairs(const float *x, const float *aux, int64_t n, float lo, float hi,
                          float *dx, float *daux) {
    vf vlo = splat(lo), vhi = splat(hi);
    int64_t out = 0;
    for (int64_t i = 0; i < n; i += LANES) {
        int64_t m = n - i;
        vf v = m >= LANES ? load(x + i) : load_tail(x + i, m, NAN);
        vf a = m >= LANES ? load(aux + i) : load_tail(aux + i, m, 0.0f);
        vi keep = (v >= vlo) & (v <= vhi);
        compress_store(daux + out, a, keep);
        out += compress_store(dx + out, v, keep);
    }
    return out;
}

/* Sample index (descending) of the estimated top-p crossing: the sample's weights,
 * each standing for scale elements, summed from the smallest up to the mass below
 * the crossing. The light tail is many elements, so its estimate is steadier than
 * one from the heavy top, which a sample mostly misses. */
static int64_t mass_estimate(const float *s, float mx, float kth, double below, double scale) {
    double run = 0.0;
    for (int64_t i = SAMPLE - 1; i > 0; i--)   /* below kth: no mass */
        if (s[i] >= kth && (run += expf(s[i] - mx) * scale) >= below) return i;
    return 0;
}

/* The top-p crossing among the x >= kth of src[0..n) (weights se, 0 for x < kth; total
 * mass M): the largest v whose group ends past mass R, i.e. (mass of x > v) + (count
 * of v) e(v) > R. None (the sums' rounding): the smallest such x, kth. The first pass
 * leaves the x < kth behind: no pivot or kept range goes below kth. */
static float select_mass(const float *src, const float *se, int64_t n, double R, double M,
                         float mx, float kth, float *a, float *ae, float *b, float *be) {
    float s[SAMPLE], lo, hi, *dst = a, *dste = ae;
    vf vmx = splat(mx), vkth = splat(kth);
    while (n > SMALL) {
        sample_sorted(src, n, s);
        int64_t est = mass_estimate(s, mx, kth, M - R, (double)n / SAMPLE);
        pivots(s, est, &lo, &hi);
        lo = lo < kth ? kth : lo;
        hi = hi < kth ? kth : hi;
        classes_t c = classify(src, se, n, lo, hi);
        if (c.m_gt <= R && R < c.m_ge && no_progress(c, n)) {
            lo = hi = s[est] < kth ? kth : s[est];
            c = classify(src, se, n, lo, hi);
        }
        if (c.m_gt > R) {
            M = c.m_gt;
            n = keep_pairs(src, se, n, nextafterf(hi, INFINITY), INFINITY, dst, dste);
        } else if (c.m_ge > R) {
            if (lo == hi) return lo;
            R -= c.m_gt;
            M = c.m_ge - c.m_gt;
            n = keep_pairs(src, se, n, lo, hi, dst, dste);
        } else {
            R -= c.m_ge;
            M -= c.m_ge;
            n = keep_pairs(src, se, n, kth, nextafterf(lo, -INFINITY), dst, dste);
            if (n == 0) return kth;
        }
        src = dst;
        se = dste;
        dst = dst == a ? b : a;
        dste = dste == ae ? be : ae;
    }
    float t[SMALL], small[SMALL], e[SMALL + LANES];
    for (int64_t i = 0; i < n; i++) t[i] = src[i];
    sort_descending(t, n, small);
    for (int64_t i = 0; i < n; i += LANES)   /* x < kth (a set too small for a pass): 0 */
        *(vf_u *)(e + i) = select_mask(load(small + i) >= vkth, exp_shifted(small + i, n - i, vmx));
    double run = 0.0;
    for (int64_t i = 0; i < n; i++)
        if ((run += e[i]) > R) return small[i];
    return n && small[n - 1] >= kth ? small[n - 1] : kth;
}
#endif
