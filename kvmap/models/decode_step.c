/* One decoded token's attention over [top-k of the reused memory candidates, local K/V], for one layer.
 *
 * The same computation as kvmap.models.llama._decode_among_candidates (ordered placement), fused into
 * one call: in PyTorch it is about fifteen tensor operations on tiny tensors, each costing tens of
 * microseconds on a CPU, thirty layers a token. Built and loaded by kvmap/models/kernel.py (ctypes);
 * float32, contiguous row-major arrays, one thread.
 *
 * Shapes: n_kv KV heads, r query heads per KV head, k memory slots, d head dims, n_cand candidates
 * per KV head, s local keys.
 *   slots    (n_kv, r, k, d)  each query rotated to every memory slot's position and scaled;
 *                             slot j holds memory age k-1-j, slot k-1 is the search query
 *   keys     (n_kv, n_cand, d)      candidate keys (pre-RoPE)
 *   panels   (n_kv, ceil(n_cand / PANEL), d, PANEL)  the same keys in panels of PANEL candidates,
 *                             channel-major inside a panel (see kernel.py's key_panels); float16 when
 *                             `half` (exact for keys stored as float16: half the bytes to stream), else float32
 *   values   (n_kv, n_cand, d)      candidate values
 *   cand     (n_kv, n_cand)         candidate memory ids, -1 = padding (never picked before a real one)
 *   q_local  (n_kv, r, d)           the token's rotated query
 *   k_local, v_local (n_kv, s, d)   the local (rotated) keys and values, cache included
 *   out      (n_kv, r, d)           attention output
 *   ids_out  (n_kv, r, k)           the memory ids each query head took, in reading order (-1: none)
 * Top-k: the k highest scores slots[.., k-1, :] . key; on equal scores the earlier candidate wins (a
 * stable sort by (-score, index)); padding (cand < 0) and -inf/NaN scores are never taken, and
 * slots left unfilled (k > the candidates taken) come last in reading order with id -1. A query
 * with nothing to attend to (no candidate taken, s = 0) gets a zero output.
 * Returns 0; -1 when scratch memory could not be allocated (or its size overflows); -2 for bad
 * arguments (k, d, n_kv or r < 1, n_cand or s < 0, half not 0/1, a NULL array that is read),
 * before anything is read or written.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#define KVMAP_OUT_OF_MEMORY (-1)
#define KVMAP_BAD_ARGUMENTS (-2)
#define LANES 16
#define PANEL 8  /* candidates per key panel: one vector register of float32 on AVX2 */
/* PANEL floats as one vector (GCC/Clang vector extension); aligned(4) allows unaligned loads. */
typedef float panel_vec __attribute__((vector_size(PANEL * sizeof(float)), aligned(4)));

/* Dot product with LANES independent partial sums, so the compiler vectorises it without -ffast-math. */
static float dot(const float *a, const float *b, int d) {
    float acc[LANES] = {0};
    int x = 0;
    for (; x + LANES <= d; x += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[x + l] * b[x + l];
    float sum = 0.0f;
    for (int l = 0; l < LANES; l++) sum += acc[l];
    for (; x < d; x++) sum += a[x] * b[x];
    return sum;
}

/* PANEL float16 values (IEEE binary16 bits) as floats. */
static panel_vec load_half(const uint16_t *p) {
    panel_vec v;
#if defined(__F16C__) && PANEL == 8
    __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    memcpy(&v, &f, sizeof v);
#else
    for (int l = 0; l < PANEL; l++) {
        uint32_t h = p[l], sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
        if (exp == 0x1f) bits = sign | 0x7f800000u | (man << 13);               /* inf, nan */
        else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);           /* normal */
        else if (!man) bits = sign;                                              /* zero */
        else {                                                                   /* subnormal */
            exp = 113;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
        memcpy(&v[l], &bits, sizeof bits);
    }
#endif
    return v;
}

/* Scores of one panel of PANEL candidates against up to GROUP queries (q[g]; unused ones point at
 * zeros): each panel row is loaded (and converted) once for all of them, and the GROUP running sums
 * are independent vector registers, so consecutive channels do not wait on one add's latency. */
#define GROUP 4
static panel_vec panel_row(const void *panel, int half, int x) {
    return half ? load_half((const uint16_t *)panel + x * PANEL) : *(const panel_vec *)((const float *)panel + x * PANEL);
}

static void score_panel(const float *const q[GROUP], const void *panel, int half, int d, panel_vec out[GROUP]) {
    /* even channels in a*, odd ones in b*: eight independent chains hide the FMA latency */
    panel_vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    int x = 0;
    for (; x + 2 <= d; x += 2) {
        panel_vec even = panel_row(panel, half, x), odd = panel_row(panel, half, x + 1);
        a0 += q[0][x] * even; a1 += q[1][x] * even; a2 += q[2][x] * even; a3 += q[3][x] * even;
        b0 += q[0][x + 1] * odd; b1 += q[1][x + 1] * odd; b2 += q[2][x + 1] * odd; b3 += q[3][x + 1] * odd;
    }
    if (x < d) {
        panel_vec last = panel_row(panel, half, x);
        a0 += q[0][x] * last; a1 += q[1][x] * last; a2 += q[2][x] * last; a3 += q[3][x] * last;
    }
    out[0] = a0 + b0; out[1] = a1 + b1; out[2] = a2 + b2; out[3] = a3 + b3;
}

static void axpy(float *y, float a, const float *x, int d) {
    for (int i = 0; i < d; i++) y[i] += a * x[i];
}

int kvmap_decode_step(int n_kv, int r, int k, int d, int64_t n_cand, int64_t s,
                      const float *slots, const float *keys, const void *panels, int half, const float *values,
                      const int64_t *cand,
                      const float *q_local, const float *k_local, const float *v_local, float scale,
                      float *out, int64_t *ids_out) {
    /* k == 0 would write best[-1] and pick[-1] below: refuse every size the loops cannot take. */
    if (n_kv < 1 || r < 1 || k < 1 || d < 1 || n_cand < 0 || s < 0 || (half != 0 && half != 1))
        return KVMAP_BAD_ARGUMENTS;
    if (!slots || !q_local || !out || !ids_out || (n_cand > 0 && (!keys || !panels || !values || !cand))
        || (s > 0 && (!k_local || !v_local)))
        return KVMAP_BAD_ARGUMENTS;
    /* Scratch sizes: refuse (as out of memory) any that would overflow size_t. */
    const size_t max_elems = SIZE_MAX / sizeof(int64_t) / 2;
    if ((uint64_t)n_cand > max_elems / (size_t)r - PANEL || (uint64_t)s > max_elems - (size_t)k)
        return KVMAP_OUT_OF_MEMORY;
    int64_t n_panels = (n_cand + PANEL - 1) / PANEL, n_padded = n_panels * PANEL;
    /* + 1: never malloc(0), which may return NULL (n_cand == 0 is allowed) */
    float *scores = malloc(sizeof(float) * ((size_t)r * (size_t)n_padded + 1));
    float *logits = malloc(sizeof(float) * ((size_t)k + (size_t)s));
    float *best = malloc(sizeof(float) * (size_t)k);
    int64_t *pick = malloc(sizeof(int64_t) * (size_t)k);
    float *zeros = calloc((size_t)d, sizeof(float));
    if (!scores || !logits || !best || !pick || !zeros) {
        free(scores); free(logits); free(best); free(pick); free(zeros);
        return KVMAP_OUT_OF_MEMORY;
    }
    for (int h = 0; h < n_kv; h++) {
        const float *hk = keys + (size_t)h * n_cand * d, *hv = values + (size_t)h * n_cand * d;
        const int64_t *hc = cand + (size_t)h * n_cand;
        /* Score every candidate with the r search queries, a panel of PANEL candidates at a time:
         * a panel's PANEL running sums are one vector register across the d channels (no loads and
         * stores of partial scores, no horizontal sums). */
        size_t panel_bytes = (size_t)d * PANEL * (half ? 2 : 4);
        const char *hp = (const char *)panels + (size_t)h * n_panels * panel_bytes;
        for (int i0 = 0; i0 < r; i0 += GROUP) {
            const float *q[GROUP];
            for (int g = 0; g < GROUP; g++)
                q[g] = i0 + g < r ? slots + (((size_t)h * r + i0 + g) * k + (k - 1)) * d : zeros;
            for (int64_t b = 0; b < n_panels; b++) {
                panel_vec sums[GROUP];
                score_panel(q, hp + b * panel_bytes, half, d, sums);
                for (int g = 0; g < GROUP && i0 + g < r; g++)
                    memcpy(scores + (size_t)(i0 + g) * n_padded + b * PANEL, &sums[g], sizeof sums[g]);
            }
        }
        for (int64_t c = 0; c < n_cand; c++)
            if (hc[c] < 0)
                for (int i = 0; i < r; i++) scores[(size_t)i * n_padded + c] = -INFINITY;
        for (int i = 0; i < r; i++) {
            const float *sc = scores + (size_t)i * n_padded;
            const float *q_slots = slots + ((size_t)h * r + i) * k * d;
            /* Top-k by insertion into a descending list; unfilled slots keep index n_cand + j, so
             * they sort after every real candidate, as padding does in the PyTorch path. */
            for (int j = 0; j < k; j++) { best[j] = -INFINITY; pick[j] = n_cand + j; }
            for (int64_t c = 0; c < n_cand; c++) {
                float v = sc[c];
                if (!(v > best[k - 1])) continue;
                int j = k - 1;
                while (j > 0 && best[j - 1] < v) { best[j] = best[j - 1]; pick[j] = pick[j - 1]; j--; }
                best[j] = v; pick[j] = c;
            }
            for (int a = 1; a < k; a++) {  /* reading order: candidates ascend by memory id */
                int64_t p = pick[a];
                int b = a - 1;
                while (b >= 0 && pick[b] > p) { pick[b + 1] = pick[b]; b--; }
                pick[b + 1] = p;
            }
            /* Logits: memory slot j with the query rotated to its slot, then the local keys. */
            int64_t *ids = ids_out + ((size_t)h * r + i) * k;
            float top = -INFINITY;
            for (int j = 0; j < k; j++) {
                int real = pick[j] < n_cand && hc[pick[j]] >= 0;
                ids[j] = real ? hc[pick[j]] : -1;
                logits[j] = real ? dot(q_slots + (size_t)j * d, hk + (size_t)pick[j] * d, d) : -INFINITY;
                if (logits[j] > top) top = logits[j];
            }
            const float *q = q_local + ((size_t)h * r + i) * d;
            for (int64_t t = 0; t < s; t++) {
                logits[k + t] = dot(q, k_local + ((size_t)h * s + t) * d, d) * scale;
                if (logits[k + t] > top) top = logits[k + t];
            }
            /* Softmax over both parts, then the weighted values. */
            float *o = out + ((size_t)h * r + i) * d;
            memset(o, 0, sizeof(float) * (size_t)d);
            if (top == -INFINITY) continue;  /* nothing to attend to (no candidate taken, s == 0) */
            float total = 0.0f;
            for (int64_t j = 0; j < k + s; j++) total += (logits[j] = expf(logits[j] - top));
            for (int j = 0; j < k; j++)
                if (logits[j] > 0.0f) axpy(o, logits[j] / total, hv + (size_t)pick[j] * d, d);
            for (int64_t t = 0; t < s; t++)
                axpy(o, logits[k + t] / total, v_local + ((size_t)h * s + t) * d, d);
        }
    }
    free(scores); free(logits); free(best); free(pick); free(zeros);
    return 0;
}
