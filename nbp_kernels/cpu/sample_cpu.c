/* sample_cpu: the top-k / top-p threshold and the draw of FastGenerator's CPU
 * sampler (fp32 logits, float64 sums), one row per OpenMP thread at a time.
 *
 * nbp_keep_threshold(logits [n, V] (row stride ld), k, p, work) -> tau [n], row_max [n]:
 *   the smallest kept logit: keep x >= tau. With s the row sorted descending,
 *   e = exp(s - s_0) and z the sum of e over s >= s_{k-1} (every token tied
 *   with the k-th counts): c = 1 + #{i < k - 1 : e_0 + .. + e_i <= p z} and
 *   tau = s_{c-1} (top-k, then top-p over its survivors; p = 1: tau = s_{k-1}).
 *   No sort: the k-th value is found by a sampled two-pivot selection
 *   (Floyd-Rivest style: each pass keeps the band around the estimated rank,
 *   ~1/8 of the set) and the top-p crossing by the same selection on mass
 *   instead of rank. A row with NaN or no finite maximum gets tau = NaN.
 * nbp_draw_kept(logits [n, V] (row stride ld), tau [n], row_max [n], u [n]) -> index [n]:
 *   index i with probability w_i / sum(w), w_i = exp(x_i - max) if x_i >= tau else 0,
 *   by inverse CDF in vocabulary order with one uniform u in [0, 1) per row:
 *   float64 sums of 256-token chunks, then a float64 scan inside the chosen chunk.
 *
 * numpy's partition + sort + torch's elementwise passes took ~0.35 ms per row
 * of a 64000-token vocabulary; this is about a tenth (benchmarks/bench_sample_cpu.py).
 * exp is glibc's 16-lane vector expf (libmvec). Threads: OpenMP over rows, in
 * torch's libgomp (see packed_linear.c), so the decode step's threads, still
 * spinning after the vocabulary head, pick the rows up.
 * Compiled at first use by nbp_kernels/cpu_build.py (linked with -lmvec);
 * nbp_kernels/sample_cpu.py has the Python contract, nbp_kernels/reference.py
 * the semantics.
 */
#include <math.h>
#include <stdint.h>

#define LANES 16
#define CHUNK 256   /* tokens per first-level CDF chunk */
#define SAMPLE 64   /* elements sampled to place a selection pass's two pivots */
#define BAND 4      /* sample ranks each side of the estimate (~2 sigma at a quarter) */
#define SMALL 64    /* sets this small are sorted outright */

int nbp_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
}

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#include <immintrin.h>

__m512 _ZGVeN16v_expf(__m512 x);   /* glibc libmvec: expf on 16 lanes */

static inline __mmask16 lanes_left(int64_t n) {
    return n >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}

static inline __m512d widen_sum(__m512 v) {   /* 16 floats -> 8 doubles (pairwise sums) */
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), _mm512_cvtps_pd(hi));
}

/* exp(v - m) on the lanes of v[0..n) (n <= 16), 0 elsewhere */
static inline __m512 exp_shifted(const float *v, int64_t n, __m512 m) {
    __mmask16 lanes = lanes_left(n);
    __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, v), m));
    return _mm512_maskz_mov_ps(lanes, e);
}

/* ---- selection ---------------------------------------------------------- */

typedef struct { int64_t n_gt, n_ge; double m_gt, m_ge; } classes_t;

/* counts (and exp(x - mx) masses, if mass) of x > hi and of x >= lo in src[0..n) */
static classes_t classify(const float *src, int64_t n, float lo, float hi, int mass, __m512 mx) {
    __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
    __m512d mg = _mm512_setzero_pd(), mb = _mm512_setzero_pd();
    classes_t c = {0, 0, 0.0, 0.0};
    for (int64_t i = 0; i < n; i += LANES) {
        __mmask16 lanes = lanes_left(n - i);
        __m512 v = _mm512_maskz_loadu_ps(lanes, src + i);
        __mmask16 gt = _mm512_mask_cmp_ps_mask(lanes, v, vhi, _CMP_GT_OQ);
        __mmask16 ge = _mm512_mask_cmp_ps_mask(lanes, v, vlo, _CMP_GE_OQ);
        c.n_gt += __builtin_popcount(gt);
        c.n_ge += __builtin_popcount(ge);
        if (mass) {
            __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(v, mx));
            mg = _mm512_add_pd(mg, widen_sum(_mm512_maskz_mov_ps(gt, e)));
            mb = _mm512_add_pd(mb, widen_sum(_mm512_maskz_mov_ps(ge, e)));
        }
    }
    c.m_gt = _mm512_reduce_add_pd(mg);
    c.m_ge = _mm512_reduce_add_pd(mb);
    return c;
}

/* copies the x of src[0..n) with lo <= x <= hi to dst (room for n + 16); returns how many */
static int64_t keep_between(const float *src, int64_t n, float lo, float hi, float *dst) {
    __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
    int64_t out = 0;
    for (int64_t i = 0; i < n; i += LANES) {
        __mmask16 lanes = lanes_left(n - i);
        __m512 v = _mm512_maskz_loadu_ps(lanes, src + i);
        __mmask16 k = _mm512_mask_cmp_ps_mask(lanes, v, vlo, _CMP_GE_OQ)
                    & _mm512_mask_cmp_ps_mask(lanes, v, vhi, _CMP_LE_OQ);
        _mm512_storeu_ps(dst + out, _mm512_maskz_compress_ps(k, v));   /* register compress: fast */
        out += __builtin_popcount(k);
    }
    return out;
}

static void sort_descending(float *s, int64_t n) {   /* insertion sort: n <= SMALL */
    for (int64_t i = 1; i < n; i++) {
        float v = s[i];
        int64_t j = i;
        for (; j > 0 && s[j - 1] < v; j--) s[j] = s[j - 1];
        s[j] = v;
    }
}

static void sample_sorted(const float *src, int64_t n, float *s) {   /* n > SMALL >= SAMPLE */
    for (int64_t i = 0; i < SAMPLE; i++) s[i] = src[i * n / SAMPLE + n / (2 * SAMPLE)];
    sort_descending(s, SAMPLE);
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
    __m512 unused = _mm512_setzero_ps();
    while (n > SMALL) {
        sample_sorted(src, n, s);
        int64_t est = (r - 1) * SAMPLE / n;
        pivots(s, est, &lo, &hi);
        classes_t c = classify(src, n, lo, hi, 0, unused);
        if (r > c.n_gt && r <= c.n_ge && no_progress(c, n)) {
            lo = hi = s[est];
            c = classify(src, n, lo, hi, 0, unused);
        }
        if (r <= c.n_gt) {
            n = keep_between(src, n, nextafterf(hi, INFINITY), INFINITY, dst);
        } else if (r > c.n_ge) {
            r -= c.n_ge;
            n = keep_between(src, n, -INFINITY, nextafterf(lo, -INFINITY), dst);
        } else {
            if (lo == hi) return lo;
            r -= c.n_gt;
            n = keep_between(src, n, lo, hi, dst);
        }
        src = dst;
        dst = dst == a ? b : a;
    }
    float small[SMALL];
    for (int64_t i = 0; i < n; i++) small[i] = src[i];
    sort_descending(small, n);
    return small[r - 1];
}

/* sample index where the sample's cumulative mass first exceeds the fraction f */
static int64_t mass_estimate(const float *s, float mx, double f) {
    double w[SAMPLE], total = 0.0, run = 0.0;
    for (int64_t i = 0; i < SAMPLE; i++) total += w[i] = expf(s[i] - mx);
    for (int64_t i = 0; i < SAMPLE; i++)
        if ((run += w[i]) > f * total) return i;
    return SAMPLE - 1;
}

/* The top-p crossing among src[0..n) (every x >= kth, total mass M): the
 * largest v whose group ends past mass R, i.e. (mass of x > v) + (count of v) e(v) > R.
 * None (the sums' rounding): the set's smallest value; an empty set: kth. */
static float select_mass(const float *src, int64_t n, double R, double M, float mx, float kth,
                         float *a, float *b) {
    float s[SAMPLE], lo, hi, *dst = a;
    __m512 vmx = _mm512_set1_ps(mx);
    while (n > SMALL) {
        sample_sorted(src, n, s);
        int64_t est = mass_estimate(s, mx, M > 0.0 ? R / M : 0.0);
        pivots(s, est, &lo, &hi);
        classes_t c = classify(src, n, lo, hi, 1, vmx);
        if (c.m_gt <= R && R < c.m_ge && no_progress(c, n)) {
            lo = hi = s[est];
            c = classify(src, n, lo, hi, 1, vmx);
        }
        if (c.m_gt > R) {
            M = c.m_gt;
            n = keep_between(src, n, nextafterf(hi, INFINITY), INFINITY, dst);
        } else if (c.m_ge > R) {
            if (lo == hi) return lo;
            R -= c.m_gt;
            M = c.m_ge - c.m_gt;
            n = keep_between(src, n, lo, hi, dst);
        } else {
            R -= c.m_ge;
            M -= c.m_ge;
            n = keep_between(src, n, -INFINITY, nextafterf(lo, -INFINITY), dst);
            if (n == 0) return kth;
        }
        src = dst;
        dst = dst == a ? b : a;
    }
    float small[SMALL], e[SMALL + LANES];
    for (int64_t i = 0; i < n; i++) small[i] = src[i];
    sort_descending(small, n);
    for (int64_t i = 0; i < n; i += LANES) _mm512_storeu_ps(e + i, exp_shifted(small + i, n - i, vmx));
    double run = 0.0;
    for (int64_t i = 0; i < n; i++)
        if ((run += e[i]) > R) return small[i];
    return n ? small[n - 1] : kth;
}

/* max (and min) of x[0..V); 0 if a NaN is present */
static int row_range(const float *x, int64_t V, float *mx, float *mn) {
    __m512 hi = _mm512_set1_ps(-INFINITY), lo = _mm512_set1_ps(INFINITY);
    __mmask16 nan = 0;
    for (int64_t i = 0; i < V; i += LANES) {
        __mmask16 lanes = lanes_left(V - i);
        __m512 v = _mm512_maskz_loadu_ps(lanes, x + i);
        nan |= _mm512_mask_cmp_ps_mask(lanes, v, v, _CMP_UNORD_Q);
        hi = _mm512_mask_max_ps(hi, lanes, hi, v);
        lo = _mm512_mask_min_ps(lo, lanes, lo, v);
    }
    *mx = _mm512_reduce_max_ps(hi);
    *mn = _mm512_reduce_min_ps(lo);
    return !nan;
}

static void threshold_row(const float *x, int64_t V, int64_t k, float p, float *a, float *b,
                          float *tau, float *row_max) {
    float mx, mn;
    if (!row_range(x, V, &mx, &mn) || !isfinite(mx)) {
        *tau = *row_max = NAN;
        return;
    }
    *row_max = mx;
    float kth = k < V ? select_rank(x, V, k, a, b) : mn;
    if (p >= 1.0f) {
        *tau = kth;
        return;
    }
    int64_t n = keep_between(x, V, kth, INFINITY, a);   /* the top-k survivors, ties included */
    double z = classify(a, n, kth, INFINITY, 1, _mm512_set1_ps(mx)).m_ge;
    *tau = select_mass(a, n, (double)p * z, z, mx, kth, b, a);
}

/* kept weights of x[0..n) (n <= CHUNK) into w; returns their float64 sum */
static double chunk_weights(const float *x, int64_t n, __m512 tau, __m512 m, float *w) {
    __m512d acc = _mm512_setzero_pd();
    for (int64_t i = 0; i < n; i += LANES) {
        __mmask16 lanes = lanes_left(n - i);
        __m512 v = _mm512_maskz_loadu_ps(lanes, x + i);
        __mmask16 keep = _mm512_mask_cmp_ps_mask(lanes, v, tau, _CMP_GE_OQ);
        __m512 e = _mm512_maskz_mov_ps(keep, _ZGVeN16v_expf(_mm512_sub_ps(v, m)));
        if (w) _mm512_mask_storeu_ps(w + i, lanes, e);
        acc = _mm512_add_pd(acc, widen_sum(e));
    }
    return _mm512_reduce_add_pd(acc);
}

static int64_t draw_row(const float *x, int64_t V, float tau_f, float max_f, double u,
                        double *cum) {
    __m512 tau = _mm512_set1_ps(tau_f), m = _mm512_set1_ps(max_f);
    int64_t chunks = (V + CHUNK - 1) / CHUNK, c = 0, last = 0;
    double total = 0.0;
    for (int64_t i = 0; i < chunks; i++) {
        double s = chunk_weights(x + i * CHUNK, V - i * CHUNK < CHUNK ? V - i * CHUNK : CHUNK,
                                 tau, m, 0);
        if (s > 0.0) last = i;
        cum[i] = total += s;
    }
    double target = u * total;
    while (c < chunks && cum[c] <= target) c++;
    if (c == chunks) c = last;   /* u * total rounded up to total: the last chunk with weight */
    double prev = c ? cum[c - 1] : 0.0, frac = (target - prev) / (cum[c] - prev);
    frac = frac < 0.0 ? 0.0 : (frac < 1.0 ? frac : 1.0);
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

#pragma GCC pop_options

void nbp_keep_threshold(const float *logits, int64_t n, int64_t V, int64_t ld, int64_t k,
                        float p, float *work, float *tau, float *row_max) {
    int64_t room = V + LANES;   /* work: [n, 2, V + 16] */
    #pragma omp parallel for schedule(static) if (n > 1)
    for (int64_t r = 0; r < n; r++)
        threshold_row(logits + r * ld, V, k, p, work + 2 * r * room, work + (2 * r + 1) * room,
                      tau + r, row_max + r);
}

void nbp_draw_kept(const float *logits, int64_t n, int64_t V, int64_t ld, const float *tau,
                   const float *row_max, const double *u, double *cum, int64_t *index) {
    int64_t chunks = (V + CHUNK - 1) / CHUNK;
    #pragma omp parallel for schedule(static) if (n > 1)
    for (int64_t r = 0; r < n; r++)
        index[r] = draw_row(logits + r * ld, V, tau[r], row_max[r], u[r], cum + r * chunks);
}
