/* decode_attention: one NBP decode step on the CPU (float32), the block's append fused.
 *
 * L queries per (sequence, head) against the cached keys 0 .. n-1, n = seq_lens[b] + L
 * capped at M; the new block is first written at seq_lens[b] + l (when seq_lens[b] >= 0
 * and the position is below M: torch_ops._block_targets' rule). Softmax is online over
 * chunks of CHUNK keys (max-subtracted, float32), as flash attention does.
 *
 * Each (b, h) reads its whole K and V once, cold (the weights the linears stream
 * between two steps evict them from the core's caches), so the kernel streams each
 * cache row once (a chunk's V and its K a few tiles ahead prefetched by its score
 * tiles, the next chunk's K by its PV tiles) and keeps the rest in a small
 * per-thread scratch: the queries transposed, qt[d][l] (lanes = query rows), so
 * QK^T is broadcast k[c][d] x qt[d] into one score vector per key (no transposed
 * copy of K, and the softmax runs across keys with rows in lanes); PV broadcasts
 * p[c][l] into rows of V (lanes = head dims), accumulating an L x D tile. Query
 * rows past L in the padded lanes are zeros: finite scores, never output. With
 * lanes = rows, blocks of very few queries waste most of a vector
 * (decode_attention_cpu.MIN_ROWS sends those to torch).
 *
 * Threads: OpenMP over (b, h, split) in torch's libgomp (see packed_linear.c);
 * when there are too few (b, h) for the threads the keys of each are split and
 * the partial softmaxes combined (flash-decoding), the caller choosing the count.
 *
 * One portable source: GCC vector extensions at the register width, compiled per
 * ISA by cpu_build.py (-DNBP_ISA_<isa>); exp is vmath.h's inline polynomial (within
 * 2 ulp of expf; libmvec's call was a fifth of the kernel on a Zen 4).
 * nbp_kernels/decode_attention_cpu.py has the Python contract, nbp_kernels/reference.py
 * the semantics.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "isa.h"   /* VLEN, nbp_cpu_isa */

#if defined(NBP_ISA_AVX2)
#  define KT 4      /* 4 x 2 accumulators + 2 query vectors of the 16 ymm */
#  define TDV 2     /* 4 x 2 accumulators + 2 V vectors */
#else             /* 32 registers (zmm, or q on NEON) */
#  define KT 8      /* keys per score tile: 8 x (up to 2) accumulators */
#  define TDV 4     /* head-dim vectors per PV tile: 4 rows x 4 = 16 accumulators */
#endif

#define LVT 2       /* query-lane vectors per score tile */
#define TR 4        /* query rows per PV tile (divides VLEN, so every tile is inside the lanes) */
#define CHUNK 64    /* keys per online-softmax step (a multiple of KT) */

typedef float vf __attribute__((vector_size(VLEN * 4), aligned(4)));   /* unaligned loads */
typedef int32_t vi __attribute__((vector_size(VLEN * 4)));

#include "vmath.h"   /* vexp_inline, vmax */

/* x - 0 is x for every x (0 + x is not, for -0): a broadcast load (packed_linear.c) */
static inline vf splat(float x) { return x - (vf){0}; }

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* One thread's scratch, carved from the caller's buffer (nbp_decode_attention_work). */
typedef struct {
    int64_t LP, DP;   /* query rows and head dims, padded to whole vectors */
    float *qt;        /* [D][LP]: the queries, transposed */
    float *st;        /* [CHUNK][LP]: scores, then probabilities, of one chunk */
    float *o;         /* [LP][DP]: unnormalised output rows */
    float *m, *sum, *alpha;   /* [LP] each: running max, running sum, this chunk's rescale */
    float *vpad;      /* [CHUNK][DP]: V rows padded to DP when D is not whole vectors */
} scratch_t;

static scratch_t carve(float *w, int64_t L, int64_t D) {
    scratch_t s;
    s.LP = round_up(L, VLEN);
    s.DP = round_up(D, VLEN);
    s.qt = w;
    s.st = s.qt + D * s.LP;
    s.o = s.st + CHUNK * s.LP;
    s.m = s.o + s.LP * s.DP;
    s.sum = s.m + s.LP;
    s.alpha = s.sum + s.LP;
    s.vpad = s.alpha + s.LP;
    return s;
}

/* floats of one thread's scratch */
int64_t nbp_decode_attention_work(int64_t L, int64_t D) {
    int64_t LP = round_up(L, VLEN), DP = round_up(D, VLEN);
    return D * LP + CHUNK * LP + LP * DP + 3 * LP + CHUNK * DP;
}

#define PF_AHEAD 16   /* K rows prefetched ahead of the score tile */

/* scores of keys c0 .. c0+KT-1 of the chunk (rows of k, ldk apart; keys past cn repeat
 * the last one, their scores land in rows of st the softmax does not read) for the
 * query lanes lv0 .. lv0+lvt-1: st[c][l] = scale * sum_d k[c][d] qt[d][l].
 * prefetch: also bring K PF_AHEAD rows ahead and this tile's V rows into cache, a few
 * lines every 16 dims (the hardware prefetcher alone left the cold rows waiting on
 * memory; one burst of prefetches per tile stalled on the fill buffers).
 * full: every key of the tile is below cn. Rows are addressed from one pointer,
 * k + c0 ldk, with offsets i ldk (the clamped ones only when not full): compiled for
 * constant ldk (scores), the offsets are displacements, where KT row pointers of their
 * own each took an add a dim, some spilled (score tiles 6-10% faster with K and V in
 * L2, 1-2% cold). */
static inline __attribute__((always_inline)) void score_tile(
        const float *k, const int64_t ldk, const float *v, const int64_t ldv, int64_t cn,
        int64_t c0, const scratch_t *s, const int64_t D, int64_t lv0, const int lvt, vf scale,
        int prefetch,
        const int full) {
    const float *kb = k + c0 * ldk;
    int64_t row[KT];
    for (int i = 0; i < KT; i++)
        row[i] = (full || c0 + i < cn ? i : cn - 1 - c0) * ldk;
    vf acc[KT][LVT];
    for (int i = 0; i < KT; i++)
        for (int j = 0; j < LVT; j++)
            acc[i][j] = (vf){0};
    for (int64_t d0 = 0; d0 < D; d0 += 16) {   /* 16 floats: one cache line of each row */
        if (prefetch) {
            for (int i = 0; i < KT; i++) {
                __builtin_prefetch(kb + (PF_AHEAD + i) * ldk + d0);
                __builtin_prefetch(v + (c0 + i) * ldv + d0);
            }
        }
        int64_t d_end = d0 + 16 < D ? d0 + 16 : D;
        for (int64_t d = d0; d < d_end; d++) {
            vf qv[LVT];
            for (int j = 0; j < lvt; j++)
                qv[j] = *(const vf *)(s->qt + d * s->LP + (lv0 + j) * VLEN);
            for (int i = 0; i < KT; i++) {
                vf kv = splat(kb[(full ? i * ldk : row[i]) + d]);
                for (int j = 0; j < lvt; j++)
                    acc[i][j] += kv * qv[j];
            }
        }
    }
    for (int i = 0; i < KT; i++)
        for (int j = 0; j < lvt; j++)
            *(vf *)(s->st + (c0 + i) * s->LP + (lv0 + j) * VLEN) = acc[i][j] * scale;
}

/* the chunk's score tiles, full ones apart */
static inline __attribute__((always_inline)) void score_tiles(
        const float *k, const int64_t ldk, const float *v, const int64_t ldv, int64_t cn,
        const scratch_t *s, const int64_t D, vf scale) {
    int64_t LV = s->LP / VLEN;
    for (int64_t c0 = 0; c0 < cn; c0 += KT) {
        int64_t lv = 0;
        if (c0 + KT <= cn) {
            for (; lv + LVT <= LV; lv += LVT)
                score_tile(k, ldk, v, ldv, cn, c0, s, D, lv, LVT, scale, lv == 0, 1);
            for (; lv < LV; lv++)
                score_tile(k, ldk, v, ldv, cn, c0, s, D, lv, 1, scale, lv == 0, 1);
        } else {
            for (; lv + LVT <= LV; lv += LVT)
                score_tile(k, ldk, v, ldv, cn, c0, s, D, lv, LVT, scale, lv == 0, 0);
            for (; lv < LV; lv++)
                score_tile(k, ldk, v, ldv, cn, c0, s, D, lv, 1, scale, lv == 0, 0);
        }
    }
}

/* prefetches never fault: rows past the cache's end are harmless to name. The K600
 * models' head dim, in contiguous caches ([.., M, D]: ldk = ldv = D), compiles with
 * all three constant (the V rows' prefetch addresses too). */
static void scores(const float *k, int64_t ldk, const float *v, int64_t ldv, int64_t cn,
                   const scratch_t *s, int64_t D, vf scale) {
    if (D == 64 && ldk == 64 && ldv == 64)
        score_tiles(k, 64, v, 64, cn, s, 64, scale);
    else
        score_tiles(k, ldk, v, ldv, cn, s, D, scale);
}

/* online softmax over the chunk's cn scores: st becomes exp(score - new max), the
 * running max and sum advance, alpha = exp(old max - new max) rescales o */
static void softmax_step(const scratch_t *s, int64_t cn) {
    for (int64_t lv = 0; lv < s->LP; lv += VLEN) {
        vf old = *(vf *)(s->m + lv), mx = old, total = {0};
        for (int64_t c = 0; c < cn; c++)
            mx = vmax(mx, *(vf *)(s->st + c * s->LP + lv));
        for (int64_t c = 0; c < cn; c++) {
            vf *p = (vf *)(s->st + c * s->LP + lv);
            *p = vexp_inline(*p - mx);
            total += *p;
        }
        vf alpha = vexp_inline(old - mx);   /* exp(-inf) = 0 at the first chunk */
        *(vf *)(s->alpha + lv) = alpha;
        *(vf *)(s->m + lv) = mx;
        *(vf *)(s->sum + lv) = *(vf *)(s->sum + lv) * alpha + total;
    }
}

/* The next chunk's K rows, prefetched into L2 while this chunk's PV tiles compute: the
 * score tiles read K and V (this chunk's V rows are prefetched there) and the PV tiles
 * none, so with both prefetched by the score tiles memory idled through every PV phase
 * and cold caches added all of their read time to the FMAs'. */
typedef struct {
    const float *k;        /* row 0 of the next chunk, NULL: none (this (b, h)'s last) */
    int64_t ldk, rows, D;
} next_k_t;

/* one key's step of pv_tile: acc[r] += p[r] v (TR rows, tdv vectors of V's row vr) */
#define PV_STEP(p, vr)                                                  \
    do {                                                                \
        vf vv[TDV];                                                     \
        for (int j = 0; j < tdv; j++)                                   \
            vv[j] = *(const vf *)((vr) + j * VLEN);                     \
        for (int r = 0; r < TR; r++) {                                  \
            const vf pr = splat((p)[r]);                                \
            for (int j = 0; j < tdv; j++)                               \
                acc[r][j] += pr * vv[j];                                \
        }                                                               \
    } while (0)

/* o[r0 .. r0+TR)[dv0 .. dv0+tdv vectors) = alpha o + sum_c p[c][r] v[c] over the chunk;
 * pf_line: also prefetch cache line pf_line, pf_line + pf_step, ... of next K row c;
 * the pointers advance by increments and the one-line prefetch (the common case) has no
 * loop: with s->LP reloaded, a multiply and the line loop at every key, the PV tiles took
 * 1.4x the score tiles' time for the same FMAs (the kernel 5-7% slower, Zen 4) */
static inline __attribute__((always_inline)) void pv_tile(
        const scratch_t *s, const float *v, const int64_t ldv, int64_t cn, int64_t r0,
        int64_t dv0, const int tdv, const next_k_t *nk, int64_t pf_line, int64_t pf_step) {
    const int64_t LP = s->LP, DP = s->DP;
    float *o = s->o + r0 * DP + dv0 * VLEN;
    vf acc[TR][TDV];
    for (int r = 0; r < TR; r++) {
        vf a = splat(s->alpha[r0 + r]);
        for (int j = 0; j < tdv; j++)
            acc[r][j] = *(vf *)(o + r * DP + j * VLEN) * a;
    }
    const float *p = s->st + r0, *vr = v + dv0 * VLEN;
    int64_t c = 0;
    if (nk && pf_line * 16 < nk->D) {
        const int64_t pf_rows = nk->rows < cn ? nk->rows : cn, ldk = nk->ldk, D = nk->D;
        const float *kr = nk->k + pf_line * 16;
        if ((pf_line + pf_step) * 16 >= D) {   /* one line of each row: the common case */
            for (; c < pf_rows; c++, p += LP, vr += ldv, kr += ldk) {
                __builtin_prefetch(kr, 0, 2);
                PV_STEP(p, vr);
            }
        } else {
            for (; c < pf_rows; c++, p += LP, vr += ldv, kr += ldk) {
                for (int64_t line = 0; (pf_line + line) * 16 < D; line += pf_step)
                    __builtin_prefetch(kr + line * 16, 0, 2);
                PV_STEP(p, vr);
            }
        }
    }
    for (; c < cn; c++, p += LP, vr += ldv)
        PV_STEP(p, vr);
    for (int r = 0; r < TR; r++)
        for (int j = 0; j < tdv; j++)
            *(vf *)(o + r * DP + j * VLEN) = acc[r][j];
}
#undef PV_STEP

/* the chunk's PV tiles; the row tiles' first column tiles share the next K rows' lines */
static void weighted_values(const scratch_t *s, const float *v, int64_t ldv, int64_t cn,
                            int64_t L, const next_k_t *next) {
    int64_t DV = s->DP / VLEN, passes = (L + TR - 1) / TR;
    for (int64_t r0 = 0; r0 < L; r0 += TR) {   /* rows up to round_up(L, TR) <= LP */
        const next_k_t *nk = next->k ? next : NULL;
        int64_t dv = 0;
        for (; dv + TDV <= DV; dv += TDV, nk = NULL)
            pv_tile(s, v, ldv, cn, r0, dv, TDV, nk, r0 / TR, passes);
        for (; dv < DV; dv++, nk = NULL)
            pv_tile(s, v, ldv, cn, r0, dv, 1, nk, r0 / TR, passes);
    }
}

/* The tensors of one call: base pointers and element strides (D stride 1). */
typedef struct {
    const float *q, *kn, *vn;
    float *kc, *vc;
    const int64_t *st;   /* [5][3]: batch, head, row strides of q, kn, vn, kc, vc */
    const int32_t *seq_lens;
    int64_t B, H, L, D, M, splits;
    float scale;
} call_t;

#define STRIDE(t, i) (a->st[3 * (t) + (i)])
enum { T_Q, T_KN, T_VN, T_KC, T_VC };

static int64_t visible(const call_t *a, int64_t b) {
    int64_t n = (int64_t)a->seq_lens[b] + a->L;
    return n < 0 ? 0 : (n > a->M ? a->M : n);
}

static void append(const call_t *a, int64_t b, int64_t h) {
    int64_t s0 = a->seq_lens[b];
    if (s0 < 0)
        return;
    for (int64_t l = 0; l < a->L && s0 + l < a->M; l++) {
        memcpy(a->kc + b * STRIDE(T_KC, 0) + h * STRIDE(T_KC, 1) + (s0 + l) * STRIDE(T_KC, 2),
               a->kn + b * STRIDE(T_KN, 0) + h * STRIDE(T_KN, 1) + l * STRIDE(T_KN, 2),
               a->D * sizeof(float));
        memcpy(a->vc + b * STRIDE(T_VC, 0) + h * STRIDE(T_VC, 1) + (s0 + l) * STRIDE(T_VC, 2),
               a->vn + b * STRIDE(T_VN, 0) + h * STRIDE(T_VN, 1) + l * STRIDE(T_VN, 2),
               a->D * sizeof(float));
    }
}

static void load_queries(const call_t *a, int64_t b, int64_t h, const scratch_t *s) {
    const float *q = a->q + b * STRIDE(T_Q, 0) + h * STRIDE(T_Q, 1);
    for (int64_t d = 0; d < a->D; d++)
        for (int64_t l = 0; l < s->LP; l++)
            s->qt[d * s->LP + l] = l < a->L ? q[l * STRIDE(T_Q, 2) + d] : 0.0f;
}

/* keys [c_begin, c_end) chunks of (b, h) into s->o / s->m / s->sum */
static void attend(const call_t *a, int64_t b, int64_t h, int64_t n, int64_t c_begin,
                   int64_t c_end, const scratch_t *s) {
    load_queries(a, b, h, s);
    for (int64_t l = 0; l < s->LP; l++) {
        s->m[l] = -INFINITY;
        s->sum[l] = 0.0f;
    }
    memset(s->o, 0, s->LP * s->DP * sizeof(float));
    const float *k = a->kc + b * STRIDE(T_KC, 0) + h * STRIDE(T_KC, 1);
    const float *v = a->vc + b * STRIDE(T_VC, 0) + h * STRIDE(T_VC, 1);
    int64_t ldk = STRIDE(T_KC, 2), ldv = STRIDE(T_VC, 2);
    for (int64_t c = c_begin; c < c_end; c++) {
        int64_t j0 = c * CHUNK, cn = n - j0 < CHUNK ? n - j0 : CHUNK;
        scores(k + j0 * ldk, ldk, v + j0 * ldv, ldv, cn, s, a->D, splat(a->scale));
        softmax_step(s, cn);
        next_k_t next = {c + 1 < c_end ? k + (j0 + CHUNK) * ldk : NULL, ldk,
                         n - j0 - CHUNK < CHUNK ? n - j0 - CHUNK : CHUNK, a->D};
        if (a->D == s->DP) {
            weighted_values(s, v + j0 * ldv, ldv, cn, a->L, &next);
        } else {   /* rows padded with zeros, so whole-vector loads stay inside */
            for (int64_t r = 0; r < cn; r++) {
                memcpy(s->vpad + r * s->DP, v + (j0 + r) * ldv, a->D * sizeof(float));
                memset(s->vpad + r * s->DP + a->D, 0, (s->DP - a->D) * sizeof(float));
            }
            weighted_values(s, s->vpad, s->DP, cn, a->L, &next);
        }
    }
}

static float *out_row(const call_t *a, float *out, int64_t b, int64_t h, int64_t l) {
    return out + ((b * a->L + l) * a->H + h) * a->D;   /* out: [B, L, H, D] */
}

/* a split's partial result: [L] max, [L] sum, [L][D] unnormalised rows */
static void store_partial(const call_t *a, const scratch_t *s, float *part) {
    for (int64_t l = 0; l < a->L; l++) {
        part[l] = s->m[l];
        part[a->L + l] = s->sum[l];
        memcpy(part + 2 * a->L + l * a->D, s->o + l * s->DP, a->D * sizeof(float));
    }
}

static void store_final(const call_t *a, const scratch_t *s, float *out, int64_t b,
                        int64_t h) {
    for (int64_t l = 0; l < a->L; l++) {
        float *y = out_row(a, out, b, h, l), z = s->sum[l];
        for (int64_t d = 0; d < a->D; d++)
            y[d] = z > 0.0f ? s->o[l * s->DP + d] / z : 0.0f;   /* no visible key: zeros */
    }
}

/* the splits of (b, h) combined: weights exp(m_i - max m) */
static void combine(const call_t *a, const float *parts, float *out, int64_t b, int64_t h) {
    int64_t S = a->splits, size = a->L * (a->D + 2);
    const float *p0 = parts + (b * a->H + h) * S * size;
    for (int64_t l = 0; l < a->L; l++) {
        float mx = -INFINITY, z = 0.0f, *y = out_row(a, out, b, h, l);
        for (int64_t i = 0; i < S; i++)
            mx = fmaxf(mx, p0[i * size + l]);
        memset(y, 0, a->D * sizeof(float));
        if (mx == -INFINITY)
            continue;
        for (int64_t i = 0; i < S; i++) {
            const float *p = p0 + i * size;
            float w = expf(p[l] - mx);
            z += w * p[a->L + l];
            for (int64_t d = 0; d < a->D; d++)
                y[d] += w * p[2 * a->L + l * a->D + d];
        }
        for (int64_t d = 0; d < a->D; d++)
            y[d] = z > 0.0f ? y[d] / z : 0.0f;
    }
}

/* q, kn, vn [B, H, L, D] (kn, vn NULL: no append), caches [B, H, M, D], each with the
 * batch, head and row strides in strides[5][3] (q, kn, vn, kc, vc) and D contiguous;
 * seq_lens int32 [B]; out float [B, L, H, D] contiguous. work: threads x
 * nbp_decode_attention_work(L, D) floats; parts: B H splits L (D + 2) floats (splits > 1). */
void nbp_decode_attention(const float *q, const float *kn, const float *vn, float *kc,
                          float *vc, const int64_t *strides, const int32_t *seq_lens,
                          int64_t B, int64_t H, int64_t L, int64_t D, int64_t M, float scale,
                          int64_t splits, int threads, float *work, float *parts, float *out) {
    call_t a = {q, kn, vn, kc, vc, strides, seq_lens, B, H, L, D, M, splits, scale};
    int64_t per_thread = nbp_decode_attention_work(L, D), tasks = B * H * splits;
    /* One barrier when the keys are not split (the region's end): a (b, h) appends its
     * own block, then reads it. Each barrier waits for the slowest thread, and on a busy
     * machine a thread whose core another process holds can take a scheduler tick.
     * Split keys need the block written before any split of its (b, h) reads it, and
     * every split done before the combine. */
    #pragma omp parallel num_threads(threads) if (tasks > 1)
    {
        scratch_t s = carve(work + omp_get_thread_num() * per_thread, L, D);
        if (kn && splits > 1) {
            #pragma omp for schedule(static)
            for (int64_t bh = 0; bh < B * H; bh++)
                append(&a, bh / H, bh % H);
        }
        #pragma omp for schedule(dynamic, 1) nowait
        for (int64_t t = 0; t < tasks; t++) {
            int64_t b = t / (H * splits), h = t / splits % H, i = t % splits;
            if (kn && splits == 1)
                append(&a, b, h);
            int64_t n = visible(&a, b), chunks = (n + CHUNK - 1) / CHUNK;
            attend(&a, b, h, n, i * chunks / splits, (i + 1) * chunks / splits, &s);
            if (splits == 1)
                store_final(&a, &s, out, b, h);
            else
                store_partial(&a, &s, parts + t * L * (D + 2));
        }
        if (splits > 1) {
            #pragma omp barrier
            #pragma omp for schedule(static)
            for (int64_t bh = 0; bh < B * H; bh++)
                combine(&a, parts, out, bh / H, bh % H);
        }
    }
}
