/* decode_step: one decode step of the whole transformer, driven from C.
 *
 * A decode step on the CPU is ~26 kernel launches (per layer: q/k/v with ln1,
 * attention with the cache append, proj + residual, fc1 with ln2 and GELU,
 * fc2 + residual; then ln_f + the vocabulary head) plus the embeddings. Driven
 * from Python each launch paid ~20 us of interpreter, ctypes and tensor
 * bookkeeping, and the small torch ops between them ran on cold caches: about
 * 1 ms a step on a 2-core machine, a fifth of an int8 step. Here one call runs
 * them all, in the same order on the same buffers: the kernels are the same
 * functions (packed_linear.c, int8_linear.c, decode_attention.c, reached through
 * the pointers the caller passes, from the libraries built for the same ISA),
 * so the logits are those of the Python-driven step bit for bit.
 *
 * nbp_decode_draw is the same step followed by the sampler's one-call threshold and
 * draw (sample_cpu.c's nbp_sample, through the pointer the caller passes) over its
 * logits, and the advance of seq_lens: the whole step of a FastGenerator sampling
 * with draw="fast" at temperature 1 without guidance. Between the two calls the
 * Python sampler, the checks and the torch ops around it took 0.4-0.8 ms a step on a
 * 2-core Zen 4 (7-10% of an NTP step), with the OpenMP workers left spinning.
 *
 * nbp_kernels/decode_step_cpu.py has the Python contract (and the structs'
 * mirror), nbp_kernels/reference.py the semantics (``decode_step``).
 */
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "isa.h"   /* nbp_cpu_isa */

typedef int (*packed_fn)(const float *x, int64_t M, int64_t K, const void *wp, int dtype,
                         const float *scale, const float *bias, float *y, int64_t n_out,
                         int act, int norm, const float *gamma, const float *beta, float eps,
                         const float *residual);
typedef int (*int8_fn)(const float *x, int64_t M, int64_t K, const int8_t *wp,
                       const int32_t *corr, const float *scale, const float *bias, float *y,
                       int64_t n_out, int mode, int act, int norm, const float *gamma,
                       const float *beta, float eps, const float *residual);
typedef void (*attention_fn)(const float *q, const float *kn, const float *vn, float *kc,
                             float *vc, const int64_t *strides, const int32_t *seq_lens,
                             int64_t B, int64_t H, int64_t L, int64_t D, int64_t M, float scale,
                             int64_t splits, int threads, float *work, float *parts, float *out);

/* One linear: nbp_packed_linear (int8 == 0; code: the weight dtype) or
 * nbp_int8_linear (int8 == 1; code: its mode, VNNI and int16 bits), with its LayerNorm prologue
 * (norm == 1; gamma, beta NULL for 1 / 0) and activation code. */
typedef struct {
    void *fn;
    const void *wp, *corr;
    const float *scale, *bias, *gamma, *beta;
    int64_t int8, code, K, n_out, norm, act;
    double eps;
} linear_t;

typedef struct {
    linear_t qkv, proj, fc1, fc2;   /* qkv: the stacked [q | k | v] columns */
    float *k_cache, *v_cache;       /* [B, H, capacity, D], D contiguous */
} layer_t;

typedef int64_t (*sample_fn)(const float *logits, int64_t n, int64_t V, int64_t ld,
                             int64_t k, float p, const double *u, float *work,
                             int64_t *index);

/* The draw after a step: nbp_sample with top-k, top-p and its scratch */
typedef struct {
    void *fn;
    int64_t top_k;
    double top_p;
    float *work;    /* sample_cpu.work_shape(B L, vocab) */
} draw_t;

typedef struct {
    int64_t n_layer, B, L, H, D, vocab, n_pos;
    int64_t cache_strides[3];       /* batch, head, position strides of a layer's cache */
    const float *tok_emb, *pos_emb; /* [vocab, C], [n_pos, C] */
    const layer_t *layers;
    linear_t head;                  /* ln_f as its prologue */
    void *attention;
    double scale;
    float *x, *x1, *qkv, *att, *h, *logits;   /* [rows, C] [rows, C] [rows, 3C] [rows, C]
                                                * [rows, fc1 width] [rows, vocab], rows = B L */
} step_t;

static int linear(const linear_t *l, const float *x, int64_t M, float *y, const float *res) {
    if (l->int8)
        return ((int8_fn)l->fn)(x, M, l->K, (const int8_t *)l->wp, (const int32_t *)l->corr,
                                l->scale, l->bias, y, l->n_out, (int)l->code, (int)l->act,
                                (int)l->norm, l->gamma, l->beta, (float)l->eps, res);
    return ((packed_fn)l->fn)(x, M, l->K, l->wp, (int)l->code, l->scale, l->bias, y, l->n_out,
                              (int)l->act, (int)l->norm, l->gamma, l->beta, (float)l->eps, res);
}

/* x[b L + i] = tok_emb[ids[b L + i]] + pos_emb[seq_lens[b] + i]; -3 if a token id or
 * a position is out of its table (nothing else written). */
static int embed(const step_t *s, const int64_t *ids, const int32_t *seq_lens) {
    const int64_t C = s->H * s->D, rows = s->B * s->L;
    for (int64_t r = 0; r < rows; r++) {
        int64_t p = (int64_t)seq_lens[r / s->L] + r % s->L;
        if (ids[r] < 0 || ids[r] >= s->vocab || p < 0 || p >= s->n_pos)
            return -3;
    }
    for (int64_t r = 0; r < rows; r++) {
        const float *t = s->tok_emb + ids[r] * C;
        const float *q = s->pos_emb + ((int64_t)seq_lens[r / s->L] + r % s->L) * C;
        float *x = s->x + r * C;
        for (int64_t c = 0; c < C; c++)
            x[c] = t[c] + q[c];
    }
    return 0;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Adds the seconds since *t0 to *acc and restarts *t0 (acc NULL: not timing). */
static void lap(double *acc, double *t0) {
    if (acc) {
        double t = now();
        *acc += t - *t0;
        *t0 = t;
    }
}

enum { T_EMBED, T_LINEARS, T_ATTENTION, T_HEAD, T_DRAW };   /* seconds[] of nbp_decode_step */

/* ids: int64 [B, L]; seq_lens: int32 [B] (read, not advanced); length: cache
 * positions attention reads (<= capacity); splits: key splits of the attention
 * (decode_attention_cpu.splits_for); threads: its thread count; work, parts: its
 * scratch; seconds: NULL, or 5 doubles to which the time of the embeddings, the
 * layers' linears, the attention and the head (with ln_f) is added (the fifth,
 * the draw's, is nbp_decode_draw's).
 * Writes s->logits [B L, vocab] (and every layer's cache at seq_lens).
 * Returns 0, -3 for a token id or position out of range (checked before anything
 * is written), or the first nonzero code of a linear (caches may be written then). */
int nbp_decode_step(const step_t *s, const int64_t *ids, const int32_t *seq_lens,
                    int64_t length, int64_t splits, int64_t threads, float *work,
                    float *parts, double *seconds) {
    const int64_t C = s->H * s->D, M = s->B * s->L;
    double t0 = seconds ? now() : 0.0;
    int rc = embed(s, ids, seq_lens);
    lap(seconds ? seconds + T_EMBED : NULL, &t0);
    /* q, k, v: [B, H, L, D] views of the [B L, 3C] q/k/v output; the caches */
    const int64_t st[15] = {s->L * 3 * C, s->D, 3 * C, s->L * 3 * C, s->D, 3 * C,
                            s->L * 3 * C, s->D, 3 * C, s->cache_strides[0], s->cache_strides[1],
                            s->cache_strides[2], s->cache_strides[0], s->cache_strides[1],
                            s->cache_strides[2]};
    double *t_lin = seconds ? seconds + T_LINEARS : NULL;
    for (int64_t i = 0; rc == 0 && i < s->n_layer; i++) {
        const layer_t *l = &s->layers[i];
        rc = linear(&l->qkv, s->x, M, s->qkv, NULL);
        lap(t_lin, &t0);
        if (rc)
            break;
        ((attention_fn)s->attention)(s->qkv, s->qkv + C, s->qkv + 2 * C, l->k_cache,
                                     l->v_cache, st, seq_lens, s->B, s->H, s->L, s->D, length,
                                     (float)s->scale, splits, (int)threads, work, parts,
                                     s->att);
        lap(seconds ? seconds + T_ATTENTION : NULL, &t0);
        rc = linear(&l->proj, s->att, M, s->x1, s->x);
        rc = rc ? rc : linear(&l->fc1, s->x1, M, s->h, NULL);
        rc = rc ? rc : linear(&l->fc2, s->h, M, s->x, s->x1);
        lap(t_lin, &t0);
    }
    rc = rc ? rc : linear(&s->head, s->x, M, s->logits, NULL);
    lap(seconds ? seconds + T_HEAD : NULL, &t0);
    return rc;
}

/* nbp_decode_step, then (when it returns 0) seq_lens[b] += L and the draw: tokens
 * int64 [B L] from u float64 [B L] (one uniform per token) as nbp_sample draws them
 * over s->logits; *bad: how many rows had no distribution (their token -1). Returns
 * nbp_decode_step's code (nothing drawn, seq_lens unchanged, unless 0). */
int nbp_decode_draw(const step_t *s, const int64_t *ids, int32_t *seq_lens, int64_t length,
                    int64_t splits, int64_t threads, float *work, float *parts,
                    double *seconds, const draw_t *d, const double *u, int64_t *tokens,
                    int64_t *bad) {
    int rc = nbp_decode_step(s, ids, seq_lens, length, splits, threads, work, parts, seconds);
    if (rc)
        return rc;
    double t0 = seconds ? now() : 0.0;
    for (int64_t b = 0; b < s->B; b++)
        seq_lens[b] += (int32_t)s->L;
    *bad = ((sample_fn)d->fn)(s->logits, s->B * s->L, s->vocab, s->vocab, d->top_k,
                              (float)d->top_p, u, d->work, tokens);
    lap(seconds ? seconds + T_DRAW : NULL, &t0);
    return 0;
}
