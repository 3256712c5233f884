/* CPU kernels for the deltacome:: operators (built at first use by kernels/cpu.py).
 *
 * The delta term of one compressed matrix, y += ((x V̂ᵀ) · s) Ûᵀ, computed straight from the packed
 * factors (packing.py's layout), never materialising V̂ or Ûᵀ:
 *
 *   V pass  t[m][j] = s_j · Σ_g scale_jg · Σ_{p in g} (code_jp − zero_jg) · x[m][p]     (rows j split over threads)
 *   U pass  y[m][p] += Σ_j t[m][j] · scale_j,g(p) · (code_jp − zero_j,g(p))            (positions split over threads)
 *
 * Layout of one factor (rows of length L, P = L padded to a multiple of 8, P8 = P / 8): bands in
 * order; a b-bit band (b < 8) holds one shard per power of two in b (4, 2, 1: the widths torchao's
 * bitpacking uses, largest first, each shard holding the next bits of the code), a w-bit shard
 * `count` rows of w·P8 bytes; code n of a row sits in shard byte n % (w·P8) at bit (n / (w·P8))·w.
 * Written as n = c + q·P8 (c < P8, q < 8): byte c + (q mod w)·P8, bit (q / w)·w. So for a fixed q
 * the codes of consecutive c are in consecutive bytes of every shard: a 16-byte load gives 16 codes.
 * 8-bit bands are rows of P bytes; 16-bit bands are rows of L fp16 values (unpadded, maybe at an odd
 * byte offset). Scales (fp16) and zero-points (uint8): one row per quantized vector, one column per
 * group of `group_size` positions.
 *
 * The loops walk "segments": runs of c with one q and one group (so one scale and zero-point), and
 * inside a segment 16 codes at a time (GCC vector extensions: AVX-512 / AVX2 / SSE from one source).
 * (code − zero) is formed in integers, as in the reference path, so every product is the reference's
 * product; only the order of the fp32 sums differs. Every function takes the token rows as pointers,
 * so the segmented (many deltas) entry point gathers batch rows without copies.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define VL 16
#define MB_MAX 8

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint8_t vb __attribute__((vector_size(16)));

#define INLINE static inline __attribute__((always_inline))

/* 16 bytes, zero-extended to 16 int32 lanes */
INLINE vi load_b(const uint8_t *p) {
#if defined(__AVX512F__)
    __m512i r = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    vi v; memcpy(&v, &r, sizeof v); return v;
#elif defined(__AVX2__)
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    __m256i lo = _mm256_cvtepu8_epi32(b), hi = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
    vi v; memcpy(&v, &lo, 32); memcpy((char *)&v + 32, &hi, 32); return v;
#else
    vb b; memcpy(&b, p, sizeof b); return __builtin_convertvector(b, vi);
#endif
}
INLINE vf load_f(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
INLINE void store_f(float *p, vf v) { memcpy(p, &v, sizeof v); }

#if defined(__F16C__)
static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    float f;
    if (e == 0) {
        f = (float)man * 5.9604644775390625e-08f; /* subnormal: man * 2^-24, exact */
        return sign ? -f : f;
    }
    bits = e == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((e + 112u) << 23) | (man << 13));
    memcpy(&f, &bits, 4);
    return f;
}
#endif

/* 16 fp16 values from a possibly odd address */
INLINE vf load_h(const uint8_t *p) {
#if defined(__AVX512F__)
    __m256i h; memcpy(&h, p, 32);
    __m512 f = _mm512_cvtph_ps(h);
    vf v; memcpy(&v, &f, 64); return v;
#elif defined(__F16C__)
    __m128i h0, h1; memcpy(&h0, p, 16); memcpy(&h1, p + 16, 16);
    __m256 f0 = _mm256_cvtph_ps(h0), f1 = _mm256_cvtph_ps(h1);
    vf v; memcpy(&v, &f0, 32); memcpy((char *)&v + 32, &f1, 32); return v;
#else
    vf v; uint16_t h[VL]; memcpy(h, p, sizeof h);
    for (int i = 0; i < VL; i++) v[i] = h2f(h[i]);
    return v;
#endif
}

INLINE float load_h1(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return h2f(h); }

INLINE float hsum(vf v) {
    float s = 0.f;
    for (int i = 0; i < VL; i++) s += v[i];
    return s;
}

/* --- geometry ---------------------------------------------------------------------------------- */

typedef struct {
    int bits;
    int nsh;              /* shards (b < 8), else 1 */
    int w[3], rel[3];     /* shard widths and the code bits below each */
    int64_t count, row0;  /* vectors, first global row */
    int64_t off;          /* byte offset of the band in the factor's buffer */
    int64_t shard_off[3]; /* byte offsets of the shards, relative to off */
    int64_t qrow;         /* first scale row (quantized bands) */
} band_t;

typedef struct {
    int q;
    int64_t c0, c1, g;
} seg_t;

static const int NUMBITS[8][3] = {{0}, {1}, {2}, {2, 1}, {4}, {4, 1}, {4, 2}, {4, 2, 1}};
static const int NSH[8] = {0, 1, 1, 2, 1, 2, 2, 3};

static int64_t pad8(int64_t n) { return (n + 7) / 8 * 8; }

/* bands of one factor of rows of length L; returns the number of bands */
static void make_bands(band_t *out, int64_t nbands, const int64_t *bits, const int64_t *counts, int64_t L) {
    int64_t P = pad8(L), P8 = P / 8, off = 0, row = 0, qrow = 0;
    for (int64_t i = 0; i < nbands; i++) {
        band_t *b = &out[i];
        memset(b, 0, sizeof *b);
        b->bits = (int)bits[i];
        b->count = counts[i];
        b->row0 = row;
        b->off = off;
        b->qrow = qrow;
        if (b->bits == 16) {
            off += b->count * L * 2;
        } else if (b->bits == 8) {
            b->nsh = 1; b->w[0] = 8;
            off += b->count * P;
            qrow += b->count;
        } else {
            int rel = 0; int64_t so = 0;
            b->nsh = NSH[b->bits];
            for (int k = 0; k < b->nsh; k++) {
                b->w[k] = NUMBITS[b->bits][k];
                b->rel[k] = rel;
                b->shard_off[k] = so;
                rel += b->w[k];
                so += b->count * b->w[k] * P8;
            }
            off += so;
            qrow += b->count;
        }
        row += b->count;
    }
}

/* segments of c in [ca, cb) (all q): runs with one q and one group, positions < L */
static int64_t make_segs(seg_t *out, int64_t L, int64_t gs, int64_t ca, int64_t cb) {
    int64_t P8 = pad8(L) / 8, n = 0;
    for (int q = 0; q < 8; q++) {
        int64_t lo = q * P8 + ca, hi = q * P8 + cb;
        if (hi > L) hi = L;
        for (int64_t p = lo; p < hi;) {
            int64_t g = p / gs, end = (g + 1) * gs;
            if (end > hi) end = hi;
            out[n].q = q; out[n].c0 = p - q * P8; out[n].c1 = end - q * P8; out[n].g = g;
            n++;
            p = end;
        }
    }
    return n;
}

static int64_t max_segs(int64_t L, int64_t gs) { return 8 + (L + gs - 1) / gs + 8; }

/* --- code extraction ----------------------------------------------------------------------------- */

/* pointers to row `jl` of each shard of band `b` (factor buffer `base`) */
INLINE void row_shards(const band_t *b, const uint8_t *base, int64_t jl, int64_t P8, const uint8_t **sh) {
    if (b->bits == 8) { sh[0] = base + b->off + jl * 8 * P8; return; }
    for (int k = 0; k < b->nsh; k++) sh[k] = base + b->off + b->shard_off[k] + jl * b->w[k] * P8;
}

/* 16 codes at (c .. c+15, q) of a row of a BITS-bit band (BITS a constant after inlining) */
INLINE vi codes16(const int BITS, const uint8_t *const *sh, int64_t c, int q, int64_t P8) {
    if (BITS == 8) return load_b(sh[0] + c + q * P8);
    vi code = {0};
    int rel = 0;
    for (int k = 0; k < NSH[BITS]; k++) {
        const int w = NUMBITS[BITS][k];
        vi v = load_b(sh[k] + c + (q % w) * P8);
        code |= ((v >> ((q / w) * w)) & ((1 << w) - 1)) << rel;
        rel += w;
    }
    return code;
}

INLINE int code1(const int BITS, const uint8_t *const *sh, int64_t c, int q, int64_t P8) {
    if (BITS == 8) return sh[0][c + q * P8];
    int code = 0, rel = 0;
    for (int k = 0; k < NSH[BITS]; k++) {
        const int w = NUMBITS[BITS][k];
        int v = sh[k][c + (q % w) * P8];
        code |= ((v >> ((q / w) * w)) & ((1 << w) - 1)) << rel;
        rel += w;
    }
    return code;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define HAVE_MASKED 1
/* n < 16 bytes, zero-extended to 16 int32 lanes (lanes n.. are 0); reads only those n bytes */
INLINE vi load_b_n(const uint8_t *p, int n) {
    __m512i r = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8((__mmask16)((1u << n) - 1), p));
    vi v; memcpy(&v, &r, sizeof v); return v;
}
INLINE vf load_f_n(const float *p, int n) {
    __m512 r = _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
    vf v; memcpy(&v, &r, sizeof v); return v;
}
INLINE void store_f_n(float *p, vf v, int n) {
    __m512 r; memcpy(&r, &v, sizeof r);
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), r);
}
/* the n < 16 codes at (c .. c+n-1, q), as codes16 */
INLINE vi codes_n(const int BITS, const uint8_t *const *sh, int64_t c, int q, int64_t P8, int n) {
    if (BITS == 8) return load_b_n(sh[0] + c + q * P8, n);
    vi code = {0};
    int rel = 0;
    for (int k = 0; k < NSH[BITS]; k++) {
        const int w = NUMBITS[BITS][k];
        vi v = load_b_n(sh[k] + c + (q % w) * P8, n);
        code |= ((v >> ((q / w) * w)) & ((1 << w) - 1)) << rel;
        rel += w;
    }
    return code;
}
#else
#define HAVE_MASKED 0
#endif

/* --- V pass: t[m][j] for the rows of one band ------------------------------------------------------ */

typedef struct {
    const uint8_t *packed;
    const uint16_t *scale;
    const uint8_t *zero;
    int64_t L, groups;
} side_t;

INLINE void vrows_q(const int BITS, const int MBC, const band_t *b, const side_t *f, int64_t ja, int64_t jb,
                    const seg_t *segs, int64_t nseg, const float *const *xr, const float *s, float *t, int64_t ldt) {
    int64_t P8 = pad8(f->L) / 8;
    for (int64_t jl = ja; jl < jb; jl++) {
        const uint8_t *sh[3];
        row_shards(b, f->packed, jl, P8, sh);
        const uint16_t *sc_row = f->scale + (b->qrow + jl) * f->groups;
        const uint8_t *z_row = f->zero + (b->qrow + jl) * f->groups;
        vf acc[MB_MAX];
        float tail[MB_MAX];
        for (int m = 0; m < MBC; m++) { acc[m] = (vf){0}; tail[m] = 0.f; }
        for (int64_t si = 0; si < nseg; si++) {
            const seg_t *sg = &segs[si];
            const int q = sg->q;
            const float sc = h2f(sc_row[sg->g]);
            const int zs = z_row[sg->g];
            const vi z = (vi){0} + zs;
            vf part[MB_MAX];
            float pt[MB_MAX];
            for (int m = 0; m < MBC; m++) { part[m] = (vf){0}; pt[m] = 0.f; }
            int64_t c = sg->c0;
            for (; c + VL <= sg->c1; c += VL) {
                vf v = __builtin_convertvector(codes16(BITS, sh, c, q, P8) - z, vf);
                for (int m = 0; m < MBC; m++) part[m] += v * load_f(xr[m] + q * P8 + c);
            }
#if HAVE_MASKED
            if (c < sg->c1) { /* the last n < 16 positions: one masked vector (x lanes beyond are 0) */
                const int n = (int)(sg->c1 - c);
                vf v = __builtin_convertvector(codes_n(BITS, sh, c, q, P8, n) - z, vf);
                for (int m = 0; m < MBC; m++) part[m] += v * load_f_n(xr[m] + q * P8 + c, n);
            }
#else
            for (; c < sg->c1; c++) {
                float v = (float)(code1(BITS, sh, c, q, P8) - zs);
                for (int m = 0; m < MBC; m++) pt[m] += v * xr[m][q * P8 + c];
            }
#endif
            for (int m = 0; m < MBC; m++) { acc[m] += part[m] * sc; tail[m] += pt[m] * sc; }
        }
        const int64_t j = b->row0 + jl;
        for (int m = 0; m < MBC; m++) t[m * ldt + j] = (hsum(acc[m]) + tail[m]) * s[j];
    }
}

INLINE void vrows_h(const int MBC, const band_t *b, const side_t *f, int64_t ja, int64_t jb,
                    const float *const *xr, const float *s, float *t, int64_t ldt) {
    const int64_t L = f->L;
    for (int64_t jl = ja; jl < jb; jl++) {
        const uint8_t *row = f->packed + b->off + jl * L * 2;
        vf acc[MB_MAX];
        float tail[MB_MAX];
        for (int m = 0; m < MBC; m++) { acc[m] = (vf){0}; tail[m] = 0.f; }
        int64_t p = 0;
        for (; p + VL <= L; p += VL) {
            vf v = load_h(row + 2 * p);
            for (int m = 0; m < MBC; m++) acc[m] += v * load_f(xr[m] + p);
        }
        for (; p < L; p++) {
            float v = load_h1(row + 2 * p);
            for (int m = 0; m < MBC; m++) tail[m] += v * xr[m][p];
        }
        const int64_t j = b->row0 + jl;
        for (int m = 0; m < MBC; m++) t[m * ldt + j] = (hsum(acc[m]) + tail[m]) * s[j];
    }
}

#define MB_CASES(F, ...) \
    switch (mb) { case 1: F(1, __VA_ARGS__); break; case 2: F(2, __VA_ARGS__); break; \
                  case 4: F(4, __VA_ARGS__); break; default: F(8, __VA_ARGS__); break; }

/* band b's bit-width (1..8: Q, the quantized rows; 16: H, fp16 rows) times the token block mb */
#define BITS_CASES(Q, H) \
    switch (b->bits) { case 1: MB_CASES(Q, 1) break; case 2: MB_CASES(Q, 2) break; case 3: MB_CASES(Q, 3) break; \
                       case 4: MB_CASES(Q, 4) break; case 5: MB_CASES(Q, 5) break; case 6: MB_CASES(Q, 6) break; \
                       case 7: MB_CASES(Q, 7) break; case 8: MB_CASES(Q, 8) break; default: MB_CASES(H, 0) break; }

#define V_CALL(MBC, BITS) vrows_q(BITS, MBC, b, f, ja, jb, segs, nseg, xr, s, t, ldt)
#define VH_CALL(MBC, unused) vrows_h(MBC, b, f, ja, jb, xr, s, t, ldt)

/* rows [ja, jb) (band-local) of band b, for mb (1, 2, 4 or 8) token rows */
static void vrows(const band_t *b, const side_t *f, int64_t ja, int64_t jb, const seg_t *segs, int64_t nseg,
                  int mb, const float *const *xr, const float *s, float *t, int64_t ldt) {
    BITS_CASES(V_CALL, VH_CALL)
}

/* --- U pass: y[m][p] += Σ_j t[m][j] · Ûᵀ[j][p] for the positions of `segs` ------------------------- */

INLINE void urows_q(const int BITS, const int MBC, const band_t *b, const side_t *f, const seg_t *segs, int64_t nseg,
                    const float *t, int64_t ldt, float *const *yr) {
    int64_t P8 = pad8(f->L) / 8;
    for (int64_t jl = 0; jl < b->count; jl++) {
        const int64_t j = b->row0 + jl;
        float tj[MB_MAX];
        int any = 0;
        for (int m = 0; m < MBC; m++) { tj[m] = t[m * ldt + j]; any |= tj[m] != 0.f; }
        if (!any) continue;
        const uint8_t *sh[3];
        row_shards(b, f->packed, jl, P8, sh);
        const uint16_t *sc_row = f->scale + (b->qrow + jl) * f->groups;
        const uint8_t *z_row = f->zero + (b->qrow + jl) * f->groups;
        for (int64_t si = 0; si < nseg; si++) {
            const seg_t *sg = &segs[si];
            const int q = sg->q;
            const float sc = h2f(sc_row[sg->g]);
            const int zs = z_row[sg->g];
            const vi z = (vi){0} + zs;
            float a[MB_MAX];
            for (int m = 0; m < MBC; m++) a[m] = tj[m] * sc;
            int64_t c = sg->c0;
            for (; c + VL <= sg->c1; c += VL) {
                vf v = __builtin_convertvector(codes16(BITS, sh, c, q, P8) - z, vf);
                for (int m = 0; m < MBC; m++) {
                    float *py = yr[m] + q * P8 + c;
                    store_f(py, load_f(py) + v * a[m]);
                }
            }
#if HAVE_MASKED
            if (c < sg->c1) { /* the last n < 16 positions: one masked vector, only n lanes stored */
                const int n = (int)(sg->c1 - c);
                vf v = __builtin_convertvector(codes_n(BITS, sh, c, q, P8, n) - z, vf);
                for (int m = 0; m < MBC; m++) {
                    float *py = yr[m] + q * P8 + c;
                    store_f_n(py, load_f_n(py, n) + v * a[m], n);
                }
            }
#else
            for (; c < sg->c1; c++) {
                float v = (float)(code1(BITS, sh, c, q, P8) - zs);
                for (int m = 0; m < MBC; m++) yr[m][q * P8 + c] += v * a[m];
            }
#endif
        }
    }
}

INLINE void urows_h(const int MBC, const band_t *b, const side_t *f, int64_t ca, int64_t cb,
                    const float *t, int64_t ldt, float *const *yr) {
    const int64_t L = f->L, P8 = pad8(L) / 8;
    for (int64_t jl = 0; jl < b->count; jl++) {
        const int64_t j = b->row0 + jl;
        const uint8_t *row = f->packed + b->off + jl * L * 2;
        float a[MB_MAX];
        for (int m = 0; m < MBC; m++) a[m] = t[m * ldt + j];
        for (int q = 0; q < 8; q++) {
            int64_t p = q * P8 + ca, hi = q * P8 + cb;
            if (hi > L) hi = L;
            for (; p + VL <= hi; p += VL) {
                vf v = load_h(row + 2 * p);
                for (int m = 0; m < MBC; m++) store_f(yr[m] + p, load_f(yr[m] + p) + v * a[m]);
            }
            for (; p < hi; p++) {
                float v = load_h1(row + 2 * p);
                for (int m = 0; m < MBC; m++) yr[m][p] += v * a[m];
            }
        }
    }
}

#define U_CALL(MBC, BITS) urows_q(BITS, MBC, b, f, segs, nseg, t, ldt, yr)
#define UH_CALL(MBC, unused) urows_h(MBC, b, f, ca, cb, t, ldt, yr)

static void urows(const band_t *b, const side_t *f, const seg_t *segs, int64_t nseg, int64_t ca, int64_t cb,
                  int mb, const float *t, int64_t ldt, float *const *yr) {
    BITS_CASES(U_CALL, UH_CALL)
}

/* --- one delta, many deltas --------------------------------------------------------------------- */

typedef struct {
    side_t v, u;          /* V̂ (rows of length in), Ûᵀ (rows of length out) */
    const float *s;
    int64_t nbands, rank;
    band_t *vb, *ub;      /* bands of each factor */
    int64_t m0, m;        /* token rows: xr[m0 .. m0+m), yr likewise */
    int64_t t0;           /* offset of this delta's t block (m × rank) in the scratch */
} job_t;

static int block_of(int64_t left) { return left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1; }

/* One thread's share (tid of nt) of both passes; `sync` runs between the V and the U pass (a barrier). */
static void run_share(const job_t *jobs, int64_t njobs, const float *const *xr, float *const *yr,
                      const int64_t *gs, float *scratch, int64_t total_rank, int tid, int nt, void (*sync)(void)) {
    /* V pass: this thread's share of all the jobs' rows */
    int64_t ra = total_rank * tid / nt, rb = total_rank * (tid + 1) / nt, base = 0;
    seg_t segs_local[64];
    for (int64_t d = 0; d < njobs; d++) {
        const job_t *J = &jobs[d];
        int64_t lo = ra > base ? ra - base : 0, hi = rb - base < J->rank ? rb - base : J->rank;
        base += J->rank;
        if (lo >= hi) continue;
        int64_t ns = max_segs(J->v.L, gs[d]);
        seg_t *segs = ns <= 64 ? segs_local : malloc(sizeof(seg_t) * ns);
        int64_t nseg = make_segs(segs, J->v.L, gs[d], 0, pad8(J->v.L) / 8);
        for (int64_t i = 0; i < J->nbands; i++) {
            const band_t *b = &J->vb[i];
            int64_t ja = lo > b->row0 ? lo - b->row0 : 0;
            int64_t jb = hi - b->row0 < b->count ? hi - b->row0 : b->count;
            if (ja >= jb) continue;
            for (int64_t m = 0; m < J->m;) {
                int mb = block_of(J->m - m);
                vrows(b, &J->v, ja, jb, segs, nseg, mb, xr + J->m0 + m, J->s, scratch + J->t0 + m * J->rank, J->rank);
                m += mb;
            }
        }
        if (segs != segs_local) free(segs);
    }
    if (sync) sync();
    /* U pass: this thread's columns c of every job's output */
    for (int64_t d = 0; d < njobs; d++) {
        const job_t *J = &jobs[d];
        int64_t P8 = pad8(J->u.L) / 8;
        int64_t ca = (P8 * tid / nt) / VL * VL, cb = tid == nt - 1 ? P8 : (P8 * (tid + 1) / nt) / VL * VL;
        if (ca >= cb) continue;
        int64_t ns = max_segs(J->u.L, gs[d]);
        seg_t *segs = ns <= 64 ? segs_local : malloc(sizeof(seg_t) * ns);
        int64_t nseg = make_segs(segs, J->u.L, gs[d], ca, cb);
        for (int64_t i = 0; i < J->nbands; i++) {
            for (int64_t m = 0; m < J->m;) {
                int mb = block_of(J->m - m);
                urows(&J->ub[i], &J->u, segs, nseg, ca, cb, mb, scratch + J->t0 + m * J->rank, J->rank, yr + J->m0 + m);
                m += mb;
            }
        }
        if (segs != segs_local) free(segs);
    }
}

#ifdef _OPENMP
static void omp_sync(void) {
#pragma omp barrier
}
#endif

/* Everything is described by `jobs` (one per delta, its token rows a contiguous block of xr / yr). One
 * thread runs without entering an OpenMP region (that costs about a microsecond per call). */
static void run_jobs(const job_t *jobs, int64_t njobs, const float *const *xr, float *const *yr,
                     const int64_t *gs, float *scratch, int nthreads) {
    int64_t total_rank = 0;
    for (int64_t d = 0; d < njobs; d++) total_rank += jobs[d].rank;
#ifdef _OPENMP
    if (nthreads > 1) {
#pragma omp parallel num_threads(nthreads)
        run_share(jobs, njobs, xr, yr, gs, scratch, total_rank, omp_get_thread_num(), omp_get_num_threads(), omp_sync);
        return;
    }
#endif
    run_share(jobs, njobs, xr, yr, gs, scratch, total_rank, 0, 1, 0);
}

/* The delta terms of one or many deltas, described by one int64 array (one ctypes argument):
 *
 *   desc = [ndeltas, in, out, nthreads, x, x_ld, y, y_ld, rows,
 *           then per delta: m, group_size, nbands, v_packed, v_scale, v_zero, u_packed, u_scale, u_zero, s,
 *                           bits[nbands], counts[nbands]]
 *
 * x (fp32, rows of `in`, row stride x_ld elements) and y (fp32, rows of `out`, stride y_ld) are base
 * addresses; `rows` (int64 token row indices, or 0 for 0, 1, 2, ...) lists each delta's m token rows
 * in turn. Delta d adds ((x_r V̂_dᵀ)·s_d) Û_dᵀ to y_r for each of its rows r. Returns 0, or 1 when out
 * of memory. */
int dc_delta(const int64_t *desc) {
    const int64_t ndeltas = desc[0], in_f = desc[1], out_f = desc[2];
    const int nthreads = (int)desc[3];
    const float *x = (const float *)desc[4];
    float *y = (float *)desc[6];
    const int64_t x_ld = desc[5], y_ld = desc[7];
    const int64_t *rows = (const int64_t *)desc[8];
    int64_t m_total = 0, nb_total = 0;
    const int64_t *p = desc + 9;
    for (int64_t d = 0; d < ndeltas; d++) {
        m_total += p[0];
        nb_total += p[2];
        p += 10 + 2 * p[2];
    }
    job_t *jobs = calloc(ndeltas ? ndeltas : 1, sizeof(job_t));
    band_t *bands = malloc(sizeof(band_t) * 2 * (nb_total ? nb_total : 1));
    int64_t *gs = malloc(sizeof(int64_t) * (ndeltas ? ndeltas : 1));
    const float **xr = malloc(sizeof(float *) * (m_total ? m_total : 1));
    float **yr = malloc(sizeof(float *) * (m_total ? m_total : 1));
    if (!jobs || !bands || !gs || !xr || !yr) {
        free(jobs); free(bands); free(gs); free(xr); free(yr);
        return 1;
    }
    for (int64_t i = 0; i < m_total; i++) {
        int64_t r = rows ? rows[i] : i;
        xr[i] = x + r * x_ld;
        yr[i] = y + r * y_ld;
    }
    int64_t t_total = 0, m0 = 0, b0 = 0;
    p = desc + 9;
    for (int64_t d = 0; d < ndeltas; d++) {
        job_t *J = &jobs[d];
        const int64_t m = p[0], g = p[1], nb = p[2];
        const int64_t *bits = p + 10, *counts = p + 10 + nb;
        gs[d] = g;
        J->v = (side_t){(const uint8_t *)p[3], (const uint16_t *)p[4], (const uint8_t *)p[5], in_f, (in_f + g - 1) / g};
        J->u = (side_t){(const uint8_t *)p[6], (const uint16_t *)p[7], (const uint8_t *)p[8], out_f, (out_f + g - 1) / g};
        J->s = (const float *)p[9];
        J->nbands = nb;
        J->vb = bands + 2 * b0;
        J->ub = J->vb + nb;
        make_bands(J->vb, nb, bits, counts, in_f);
        make_bands(J->ub, nb, bits, counts, out_f);
        J->rank = 0;
        for (int64_t i = 0; i < nb; i++) J->rank += counts[i];
        J->m0 = m0;
        J->m = m;
        J->t0 = t_total;
        t_total += m * J->rank;
        m0 += m;
        b0 += nb;
        p += 10 + 2 * nb;
    }
    float *scratch = malloc(sizeof(float) * (t_total ? t_total : 1));
    int rc = 1;
    if (scratch) {
        run_jobs(jobs, ndeltas, xr, yr, gs, scratch, nthreads);
        rc = 0;
    }
    free(scratch); free(yr); free(xr); free(gs); free(bands); free(jobs);
    return rc;
}

/* One delta on contiguous token rows 0..m-1 of x / y, its factors described once by `fdesc` (a
 * delta's block of dc_delta's descriptor without its leading m: group_size, nbands, the 7 pointers,
 * bits[nbands], counts[nbands]), so that a caller can keep that part and pass only what changes per
 * call as plain arguments. Returns 0, or 1 when out of memory. */
int dc_delta1(const int64_t *fdesc, int64_t m, int64_t in_f, int64_t out_f, int nthreads, const float *x,
              int64_t x_ld, float *y, int64_t y_ld) {
    const int64_t flen = 9 + 2 * fdesc[1];
    int64_t *desc = malloc(sizeof(int64_t) * (10 + flen));
    if (!desc) return 1;
    desc[0] = 1; desc[1] = in_f; desc[2] = out_f; desc[3] = nthreads;
    desc[4] = (int64_t)(intptr_t)x; desc[5] = x_ld; desc[6] = (int64_t)(intptr_t)y; desc[7] = y_ld; desc[8] = 0;
    desc[9] = m;
    memcpy(desc + 10, fdesc, sizeof(int64_t) * flen);
    int rc = dc_delta(desc);
    free(desc);
    return rc;
}

/* one row of a quantized band, dequantized: o[p] = (code_p − zero) · scale for p < L */
INLINE void deq_row(const int BITS, const uint8_t *const *sh, const uint16_t *sc_row, const uint8_t *z_row,
                    const seg_t *segs, int64_t nseg, int64_t P8, float *o) {
    for (int64_t si = 0; si < nseg; si++) {
        const seg_t *sg = &segs[si];
        const int q = sg->q;
        const float sc = h2f(sc_row[sg->g]);
        const int zs = z_row[sg->g];
        const vi z = (vi){0} + zs;
        int64_t c = sg->c0;
        for (; c + VL <= sg->c1; c += VL)
            store_f(o + q * P8 + c, __builtin_convertvector(codes16(BITS, sh, c, q, P8) - z, vf) * sc);
        for (; c < sg->c1; c++) o[q * P8 + c] = (float)(code1(BITS, sh, c, q, P8) - zs) * sc;
    }
}

#define DEQ_CASE(BITS) case BITS: deq_row(BITS, sh, sc_row, z_row, segs, nseg, P8, o); break;

/* rows [ra, rb) of one factor dequantized to fp32 (out: (rb - ra) × L, row stride ld) */
int dc_dequantize_rows(const uint8_t *packed, const uint16_t *scale, const uint8_t *zero, int64_t L, int64_t gs,
                       int64_t nbands, const int64_t *bits, const int64_t *counts, int64_t ra, int64_t rb,
                       float *out, int64_t ld, int nthreads) {
    band_t *bands = malloc(sizeof(band_t) * (nbands ? nbands : 1));
    if (!bands) return 1;
    make_bands(bands, nbands, bits, counts, L);
    const int64_t groups = (L + gs - 1) / gs, P8 = pad8(L) / 8;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
    {
        int tid = 0, nt = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        int64_t a = ra + (rb - ra) * tid / nt, e = ra + (rb - ra) * (tid + 1) / nt;
        seg_t *segs = malloc(sizeof(seg_t) * max_segs(L, gs));
        int64_t nseg = make_segs(segs, L, gs, 0, P8);
        for (int64_t i = 0; i < nbands; i++) {
            const band_t *b = &bands[i];
            for (int64_t j = a > b->row0 ? a : b->row0; j < e && j < b->row0 + b->count; j++) {
                int64_t jl = j - b->row0;
                float *o = out + (j - ra) * ld;
                if (b->bits == 16) {
                    const uint8_t *row = packed + b->off + jl * L * 2;
                    int64_t p = 0;
                    for (; p + VL <= L; p += VL) store_f(o + p, load_h(row + 2 * p));
                    for (; p < L; p++) o[p] = load_h1(row + 2 * p);
                    continue;
                }
                const uint8_t *sh[3];
                row_shards(b, packed, jl, P8, sh);
                const uint16_t *sc_row = scale + (b->qrow + jl) * groups;
                const uint8_t *z_row = zero + (b->qrow + jl) * groups;
                switch (b->bits) { DEQ_CASE(1) DEQ_CASE(2) DEQ_CASE(3) DEQ_CASE(4) DEQ_CASE(5) DEQ_CASE(6)
                                   DEQ_CASE(7) default: deq_row(8, sh, sc_row, z_row, segs, nseg, P8, o); break; }
            }
        }
        free(segs);
    }
    free(bands);
    return 0;
}
