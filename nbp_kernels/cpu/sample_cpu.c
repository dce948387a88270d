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
 * permute from a table; NEON: branch-free scalar stores); those lane helpers and the
 * two selections are in sample_select.h, the row passes and the draw here. Threads: OpenMP over rows, in
 * torch's libgomp (see packed_linear.c), so the decode step's threads, still
 * spinning after the vocabulary head, pick the rows up.
 * Compiled at first use by nbp_kernels/cpu_build.py (linked with -lmvec);
 * nbp_kernels/sample_cpu.py has the Python contract, nbp_kernels/reference.py
 * the semantics.
 */
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>

#include "isa.h"            /* nbp_cpu_isa */
#include "sample_select.h"  /* LANES, vf and the lane helpers, select_rank, select_mass */

#define CHUNK 256   /* tokens per first-level CDF chunk */
#define WIDE 512    /* elements sampled from a whole row to bracket its k-th value */
#define MARGIN 32   /* WIDE-sample ranks each side of the k-th's estimate (~3.3 sigma) */

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
