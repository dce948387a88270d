/* sample_cpu: the top-k / top-p threshold and the draw of FastGenerator's CPU
 * sampler (fp32 logits, float64 sums), one row per OpenMP thread at a time, each
 * thread reusing one slot of the scratch.
 *
 * nbp_keep_threshold(logits [n, V] (row stride ld), k, p, work) -> tau [n], row_max [n]:
 *   the smallest kept logit: keep x >= tau. With s the row sorted descending,
 *   e = exp(s - s_0) and z the sum of e over s >= s_{k-1} (every token tied
 *   with the k-th counts): c = 1 + #{i < k - 1 : e_0 + .. + e_i <= p z} and
 *   tau = s_{c-1} (top-k, then top-p over its survivors; p = 1: tau = s_{k-1}).
 *   No sort. One pass over the row (compact_row) takes its max, its NaN test and
 *   the x at or above the low end of a bracket of the k-th value drawn from a
 *   strided sample of 512 logits (~0.31 V of them at k = V / 4; the whole row if
 *   the bracket misses), values only, with the set's size at every 256th token
 *   (the draw's pick maps back to its token from those); everything after reads
 *   that set, in the core's cache. The k-th value: a sampled two-pivot selection (Floyd-Rivest
 *   style: each pass keeps the band around the estimated rank, ~1/8 of the set)
 *   inside the bracket; the top-p crossing: the same selection on mass instead of
 *   rank over the top-k survivors (the compact set's x >= the k-th value; its exp
 *   weights computed once, 0 below it). A row with NaN or no finite maximum gets
 *   tau = NaN.
 * nbp_draw_kept(logits [n, V] (row stride ld), tau [n], row_max [n], u [n]) -> index [n]:
 *   index i with probability w_i / sum(w), w_i = exp(x_i - max) if x_i >= tau else 0,
 *   by inverse CDF in vocabulary order with one uniform u in [0, 1) per row:
 *   float64 sums of 256-token chunks, then a float64 scan inside the chosen chunk.
 * nbp_sample(logits, n, V, ld, k, p, u, work) -> index [n], the count of rows without
 *   a distribution (index -1): both in one pass per row, the draw over the compact
 *   set left in the scratch (the same kept tokens in the same order; the float64
 *   sums grouped by 256 of its elements instead of 256 tokens).
 *
 * Measurements against numpy's partition + sort: benchmarks/bench_sampler.py.
 * One portable source (GCC vector extensions at the register width), compiled
 * per ISA by cpu_build.py with -DNBP_ISA_<isa>: exp is glibc's vector expf
 * (libmvec: 16 lanes on AVX-512, 8 on AVX2; lane by lane on NEON), and the
 * keep-between copy uses the ISA's compress (AVX-512: an instruction; AVX2: a
 * permute from a table; NEON: branch-free scalar stores). Threads: OpenMP over rows, in
 * torch's libgomp (see packed_linear.c), so the decode step's threads, still
 * spinning after the vocabulary head, pick the rows up.
 * Compiled at first use by nbp_kernels/cpu_build.py (linked with -lmvec);
 * nbp_kernels/sample_cpu.py has the Python contract, nbp_kernels/reference.py
 * the semantics.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "isa.h"   /* VLEN, nbp_cpu_isa */

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

#define CHUNK 256   /* tokens per first-level CDF chunk */
#define SAMPLE 64   /* elements sampled to place a selection pass's two pivots */
#define BAND 4      /* sample ranks each side of the estimate (~2 sigma at a quarter) */
#define SMALL 64    /* sets this small are sorted outright (= SAMPLE, a multiple of LANES) */
#define WIDE 512    /* elements sampled from a whole row to bracket its k-th value */
#define MARGIN 32   /* WIDE-sample ranks each side of the k-th's estimate (~3.3 sigma) */

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

/* lane-wise max and min; a NaN lane of v may or may not pass (callers test NaN apart) */
static inline vf vmax(vf v, vf m) {
#if defined(NBP_ISA_AVX512)
    return (vf)_mm512_max_ps((__m512)v, (__m512)m);
#elif defined(NBP_ISA_AVX2)
    return (vf)_mm256_max_ps((__m256)v, (__m256)m);
#else
    vi up = v > m;
    return (vf)(((vi)v & up) | ((vi)m & ~up));
#endif
}

static inline vf vmin(vf v, vf m) {
#if defined(NBP_ISA_AVX512)
    return (vf)_mm512_min_ps((__m512)v, (__m512)m);
#elif defined(NBP_ISA_AVX2)
    return (vf)_mm256_min_ps((__m256)v, (__m256)m);
#else
    vi down = v < m;
    return (vf)(((vi)v & down) | ((vi)m & ~down));
#endif
}

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

/* The x >= lo of x[0..V), in vocabulary order, to val (room for V + LANES); returns
 * how many, and in starts[c] how many precede token c * CHUNK (vocab_index maps a
 * position of the set back to its token). Also the row's max and min, and 0 in *ok if
 * a NaN is present. One pass over the row: the rest of the row's work reads this set,
 * which stays in the core's cache. Values only: on AVX-512 every compare and compress
 * issues on one port, and a second compress for the indices made this pass bound by it.
 * next: the row this thread takes after this one (V floats), or NULL: brought into L2 a
 * line per vector, at the pace of this pass. A decode step's logits were written by the
 * vocabulary head on both cores and then evicted by its weight stream, so a row read
 * cold costs ~40% more (16 rows of 64000: 0.81 ms against 0.58 hot). */
static int64_t compact_row(const float *x, int64_t V, float lo, float *val, int32_t *starts,
                           float *mx, float *mn, int *ok, const float *next) {
    vf hi = splat(-INFINITY), low = splat(INFINITY), vlo = splat(lo), inf = {0};
    vi lane;
    for (int i = 0; i < LANES; i++) lane[i] = i;
    int64_t out = 0;
    for (int64_t c = 0; c < V; c += CHUNK) {
        starts[c / CHUNK] = (int32_t)out;
        int64_t end = V - c < CHUNK ? V : c + CHUNK;
        for (int64_t i = c; i < end; i += LANES) {
            vf v;
            vi keep;
            if (next && i % 16 == 0)   /* 16 floats: one cache line */
                __builtin_prefetch(next + i, 0, 2);
            if (end - i >= LANES) {
                v = load(x + i);
                keep = v >= vlo;
            } else {   /* x[0] fills the tail: neutral for max, min and NaN; never kept */
                v = load_tail(x + i, end - i, x[0]);
                keep = (v >= vlo) & (lane < (int32_t)(end - i));
            }
            inf += v - v;   /* NaN once a NaN or an infinity passed: tested below */
            hi = vmax(v, hi);
            low = vmin(v, low);
            out += compress_store(val + out, v, keep);
        }
    }
    *mx = -INFINITY;
    *mn = INFINITY;
    int any_nan = 0;
    for (int i = 0; i < LANES; i++) {
        *mx = hi[i] > *mx ? hi[i] : *mx;
        *mn = low[i] < *mn ? low[i] : *mn;
        any_nan |= inf[i] != inf[i];
    }
    if (any_nan) {   /* an infinity or a NaN: which (rare; -inf logits are masked tokens) */
        any_nan = 0;
        for (int64_t i = 0; i < V; i++) any_nan |= x[i] != x[i];
    }
    *ok = !any_nan;
    return out;
}

/* The token of position pos of compact_row's set (x >= lo in vocabulary order; starts[c]
 * of its elements before token c * CHUNK) */
static int64_t vocab_index(const float *x, int64_t V, float lo, const int32_t *starts,
                           int64_t pos) {
    int64_t a = 0, b = (V + CHUNK - 1) / CHUNK;   /* the last chunk starting at or before pos */
    while (b - a > 1) {
        int64_t m = (a + b) / 2;
        if (starts[m] <= pos) a = m;
        else b = m;
    }
    for (int64_t i = a * CHUNK, seen = starts[a]; i < V; i++)
        if (x[i] >= lo && seen++ == pos) return i;
    return -1;   /* pos is not in the set */
}

/* Values around a row's k-th largest (k < V) from a strided sample: very likely
 * lo <= the k-th value < hi. lo = -inf when the row is too short to sample or the
 * bracket reaches past the sample (keep the whole row); hi = +inf likewise. */
static void kth_bracket(const float *x, int64_t V, int64_t k, float *lo, float *hi) {
    /* select_rank's vector passes: a scalar quickselect's mispredicted branches
     * took ~10% of a 64000-token row's time */
    float s[WIDE + LANES], a[WIDE + LANES], b[WIDE + LANES];
    *lo = -INFINITY;
    *hi = INFINITY;
    if (V <= 4 * WIDE) return;
    for (int64_t i = 0; i < WIDE; i++) {
        s[i] = x[i * V / WIDE + V / (2 * WIDE)];
        if (s[i] != s[i]) return;   /* NaN: the compact pass rejects the row */
    }
    int64_t est = (k - 1) * WIDE / V;   /* 0 = the largest */
    if (est + MARGIN < WIDE) *lo = select_rank(s, WIDE, est + MARGIN + 1, a, b);
    if (est - MARGIN >= 0) *hi = select_rank(s, WIDE, est - MARGIN + 1, a, b);
}

/* e[i] = exp(x[i] - mx) for the x[i] >= kth of x[0..n), 0 for the others (room for
 * n + LANES); returns their float64 sum, summed as classify sums them. The compact set
 * keeps its x below kth (~1/5 of it at k = V / 4) instead of a pass that copies the
 * others out with their indices (~17% of a row's time). */
static inline vd weigh_vec(const float *x, int64_t m, vf kth, vf mx, float *e) {
    /* -inf fills the tail: never >= kth, weight 0 */
    vf v = m >= LANES ? load(x) : load_tail(x, m, -INFINITY);
    vf w = select_mask(v >= kth, vexp(v - mx));
    *(vf_u *)e = w;
    return widen_sum(w);
}

static double survivor_weights(const float *x, int64_t n, float kth, float mx, float *e) {
    vf m = splat(mx), vkth = splat(kth);
    vd acc0 = {0}, acc1 = {0};
    int64_t i = 0;
    for (; i + 2 * LANES <= n; i += 2 * LANES) {   /* two chains, as classify */
        acc0 += weigh_vec(x + i, LANES, vkth, m, e + i);
        acc1 += weigh_vec(x + i + LANES, LANES, vkth, m, e + i + LANES);
    }
    for (; i < n; i += LANES)
        acc0 += weigh_vec(x + i, n - i, vkth, m, e + i);
    return reduce_add(acc0 + acc1);
}

/* A row's scratch (sample_cpu.work_shape: REGIONS runs of room = V + 16 floats).
 * compact_row's set: values VAL, chunk starts IDX, and its weights WT (exp(x - max) for the
 * top-k survivors, 0 below the k-th value); the k-th value's bracket BRK; scratch of
 * select_rank (SA, SB) and select_mass (values, weights: (SA, SB) and (BRK, SD)); the
 * draw's chunk sums in SD. */
enum { VAL, IDX, WT, SA, SB, BRK, SD, REGIONS };

/* The k-th largest (k < V) of the compact set (val, n), every x >= it being in the
 * set; hi: the top of kth_bracket's bracket. */
static float kth_value(float **r, int64_t n, int64_t k, float lo, float hi) {
    if (lo == -INFINITY)   /* the bracket was not drawn or missed (rare) */
        return select_rank(r[VAL], n, k, r[SA], r[SB]);
    int64_t n_gt, nb = keep_between(r[VAL], n, lo, hi, r[BRK], &n_gt);
    if (n_gt >= k)   /* the k-th is above the bracket (rare) */
        return select_rank(r[VAL], n, k, r[SA], r[SB]);
    return select_rank(r[BRK], nb, k - n_gt, r[SA], r[SB]);
}

/* A row's tau and max (NaN, NaN for a row without a distribution), and in w
 * (REGIONS runs of room floats) its compact set in vocabulary order: values, indices
 * and weights (0 below the k-th value, so the top-k survivors, ties included, are its
 * elements of nonzero weight). Returns its size. */
static int64_t threshold_row(const float *x, int64_t V, int64_t k, float p, float *w,
                             int64_t room, float *tau, float *row_max, float *kept_lo,
                             const float *next) {
    float *r[REGIONS], mx, mn, lo = -INFINITY, hi = INFINITY;
    for (int i = 0; i < REGIONS; i++) r[i] = w + i * room;
    int ok;
    if (k < V) kth_bracket(x, V, k, &lo, &hi);
    int64_t n = compact_row(x, V, lo, r[VAL], (int32_t *)r[IDX], &mx, &mn, &ok, next);
    if (!ok || !isfinite(mx)) {
        *tau = *row_max = NAN;
        return 0;
    }
    if (n < k) {   /* the bracket's lo was above the k-th value (rare): the whole row */
        lo = -INFINITY;
        n = compact_row(x, V, lo, r[VAL], (int32_t *)r[IDX], &mx, &mn, &ok, NULL);
    }
    *kept_lo = lo;
    *row_max = mx;
    /* every x >= the k-th value is in the compact set: at least k of them are >= lo */
    float kth = k < V ? kth_value(r, n, k, lo, hi) : mn;
    double z = survivor_weights(r[VAL], n, kth, mx, r[WT]);
    *tau = p >= 1.0f ? kth : select_mass(r[VAL], r[WT], n, (double)p * z, z, mx, kth,
                                         r[SA], r[SB], r[BRK], r[SD]);
    return n;
}

/* kept weights of x[0..n) (n <= CHUNK) into w; returns their float64 sum */
static double chunk_weights(const float *x, int64_t n, vf tau, vf m, float *w) {
    vd acc = {0};
    for (int64_t i = 0; i < n; i += LANES) {
        /* -inf fills the tail: kept or not, its weight is 0 */
        vf v = n - i >= LANES ? load(x + i) : load_tail(x + i, n - i, -INFINITY);
        vf e = select_mask(v >= tau, vexp(v - m));
        if (w) *(vf_u *)(w + i) = e;   /* w has CHUNK floats, a multiple of LANES */
        acc += widen_sum(e);
    }
    return reduce_add(acc);
}

/* The chunk that u * total falls in, from the running chunk sums cum[0..chunks) (last:
 * the last chunk with weight), and in *frac where inside it, in [0, 1]. */
static int64_t pick_chunk(const double_u *cum, int64_t chunks, int64_t last, double total,
                          double u, double *frac) {
    double target = u * total;
    int64_t c = 0;
    while (c < chunks && cum[c] <= target) c++;
    if (c == chunks) c = last;   /* u * total rounded up to total: the last chunk with weight */
    double prev = c ? cum[c - 1] : 0.0, f = (target - prev) / (cum[c] - prev);
    *frac = f < 0.0 ? 0.0 : (f < 1.0 ? f : 1.0);
    return c;
}

static int64_t draw_row(const float *x, int64_t V, float tau_f, float max_f, double u,
                        double *cum) {
    vf tau = splat(tau_f), m = splat(max_f);
    int64_t chunks = (V + CHUNK - 1) / CHUNK, c = 0, last = 0;
    double total = 0.0;
    for (int64_t i = 0; i < chunks; i++) {
        double s = chunk_weights(x + i * CHUNK, V - i * CHUNK < CHUNK ? V - i * CHUNK : CHUNK,
                                 tau, m, 0);
        if (s > 0.0) last = i;
        cum[i] = total += s;
    }
    double frac;
    c = pick_chunk(cum, chunks, last, total, u, &frac);
    float w[CHUNK];
    int64_t n = V - c * CHUNK < CHUNK ? V - c * CHUNK : CHUNK, pick = -1;
    double inner = 0.0, run = 0.0;
    chunk_weights(x + c * CHUNK, n, tau, m, w);
    for (int64_t j = 0; j < n; j++) inner += w[j];
    double t = frac * inner;
    for (int64_t j = 0; j < n; j++) {
        if (w[j] <= 0.0f) continue;
        pick = j;
        if ((run += w[j]) > t) break;
    }
    return c * CHUNK + pick;
}


static inline vd kept_vec(const float *x, const float *e, int64_t m, vf tau) {
    vf v = m >= LANES ? load(x) : load_tail(x, m, NAN);   /* NaN: not kept */
    return widen_sum(select_mask(v >= tau, load(e)));
}

/* float64 sum of the weights e[0..n) (n <= CHUNK) of the x[0..n) >= tau */
static double kept_sum(const float *x, const float *e, int64_t n, vf tau) {
    vd acc0 = {0}, acc1 = {0};
    int64_t i = 0;
    for (; i + 2 * LANES <= n; i += 2 * LANES) {   /* two chains, as classify */
        acc0 += kept_vec(x + i, e + i, LANES, tau);
        acc1 += kept_vec(x + i + LANES, e + i + LANES, LANES, tau);
    }
    for (; i < n; i += LANES)
        acc0 += kept_vec(x + i, e + i, n - i, tau);
    return reduce_add(acc0 + acc1);
}

/* The draw of draw_row over a row's compact set (values sv, weights e)[0..n) in
 * vocabulary order instead of over the whole row: the same kept tokens (sv >= tau) in
 * the same order, the float64 sums grouped by CHUNK of the set's elements (chunk sums
 * to cum). Returns the drawn element's position in the set. */
static int64_t draw_survivors(const float *sv, const float *e, int64_t n, float tau_f,
                              double u, double_u *cum) {
    vf tau = splat(tau_f);
    int64_t chunks = (n + CHUNK - 1) / CHUNK, c = 0, last = 0;
    double total = 0.0;
    for (int64_t i = 0; i < chunks; i++) {
        int64_t len = n - i * CHUNK < CHUNK ? n - i * CHUNK : CHUNK;
        double s = kept_sum(sv + i * CHUNK, e + i * CHUNK, len, tau);
        if (s > 0.0) last = i;
        cum[i] = total += s;
    }
    double frac;
    c = pick_chunk(cum, chunks, last, total, u, &frac);
    int64_t at = c * CHUNK, len = n - at < CHUNK ? n - at : CHUNK, pick = -1;
    double inner = 0.0, run = 0.0;
    for (int64_t j = at; j < at + len; j++) inner += sv[j] >= tau_f ? e[j] : 0.0f;
    double t = frac * inner;
    for (int64_t j = at; j < at + len; j++) {
        float wj = sv[j] >= tau_f ? e[j] : 0.0f;
        if (wj <= 0.0f) continue;
        pick = j;
        if ((run += wj) > t) break;
    }
    return pick;
}

/* Threads for n rows; each thread's scratch is the slot of work its number names
 * (work has n slots), reused row after row so that it stays in the core's cache. */
static int team(int64_t n) {
    int t = omp_get_max_threads();
    return n < t ? (int)n : t;
}

/* This thread's rows [*begin, *end) of n: consecutive, so each knows the next one it
 * takes (compact_row's prefetch) */
static void my_rows(int64_t n, int64_t *begin, int64_t *end) {
    int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    *begin = n * t / T;
    *end = n * (t + 1) / T;
}

void nbp_keep_threshold(const float *logits, int64_t n, int64_t V, int64_t ld, int64_t k,
                        float p, float *work, float *tau, float *row_max) {
    int64_t room = V + 16;
    #pragma omp parallel num_threads(team(n)) if (n > 1)
    {
        int64_t begin, end;
        my_rows(n, &begin, &end);
        float *w = work + REGIONS * omp_get_thread_num() * room, lo;
        for (int64_t r = begin; r < end; r++)
            threshold_row(logits + r * ld, V, k, p, w, room, tau + r, row_max + r, &lo,
                          r + 1 < end ? logits + (r + 1) * ld : NULL);
    }
}

/* keep_threshold then the draw, row by row (the row still in the core's cache):
 * index [n], -1 for a row without a distribution; returns how many such rows. */
int64_t nbp_sample(const float *logits, int64_t n, int64_t V, int64_t ld, int64_t k, float p,
                   const double *u, float *work, int64_t *index) {
    int64_t room = V + 16, bad = 0;
    #pragma omp parallel num_threads(team(n)) if (n > 1) reduction(+ : bad)
    {
        int64_t begin, end;
        my_rows(n, &begin, &end);
        float *w = work + REGIONS * omp_get_thread_num() * room;
        for (int64_t r = begin; r < end; r++) {
            const float *x = logits + r * ld;
            float tau, mx, lo;
            int64_t kept = threshold_row(x, V, k, p, w, room, &tau, &mx, &lo,
                                         r + 1 < end ? logits + (r + 1) * ld : NULL);
            if (isnan(tau)) {
                index[r] = -1;
                bad++;
            } else {
                int64_t pos = draw_survivors(w + VAL * room, w + WT * room, kept, tau, u[r],
                                             (double_u *)(w + SD * room));
                index[r] = vocab_index(x, V, lo, (const int32_t *)(w + IDX * room), pos);
            }
        }
    }
    return bad;
}

void nbp_draw_kept(const float *logits, int64_t n, int64_t V, int64_t ld, const float *tau,
                   const float *row_max, const double *u, double *cum, int64_t *index) {
    int64_t chunks = (V + CHUNK - 1) / CHUNK;
    #pragma omp parallel for schedule(static) if (n > 1)
    for (int64_t r = 0; r < n; r++)
        index[r] = draw_row(logits + r * ld, V, tau[r], row_max[r], u[r], cum + r * chunks);
}
