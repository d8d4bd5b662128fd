// Grouped GEMMs for experts with few rows each (float32, bfloat16, and float32 activations on bfloat16 weights; all
// accumulated in float32). One source, three builds: AVX-512 (16 lanes), the same with the bfloat16 forward and
// weight gradient on AMX tiles, and AVX2 with FMA (8 lanes), chosen by the flags native.py compiles it with.
//
// With few rows per expert a GEMM is bound by streaming the expert's weight (forward, input gradient) or by writing
// its weight gradient, and MKL / oneDNN do both at a third to a half of the memory's rate here (docs/performance.md).
// These loops keep the rows' partial sums in registers, read each weight row once per block of rows, and write the
// weight gradient with non-temporal stores (no read of the lines they overwrite). Each output element is summed in
// a fixed order that depends on indices only, never on where the operands lie, so results are reproducible bits
// (per build: the builds sum in lanes or tiles of different widths).
//
// The file ends with the experts' ReLU + dropout in one pass (moeify_dropout), which the cpu kernel runs in training.
//
// Built by moeify/layers/kernels/native.py with the system compiler and called through ctypes.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <memory>
#include <type_traits>
#include <vector>
#ifdef __AMX_BF16__
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

typedef uint16_t bf16;

inline float scalar(float v) { return v; }
inline float scalar(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
// float32 -> bfloat16, rounding to nearest even as torch does; NaN stays a (quiet) NaN. The vector versions below
// compute the same.
inline bf16 to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if (f != f) return static_cast<bf16>((u >> 16) | 0x40);
  return static_cast<bf16>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
inline void store1(float *p, float v) { *p = v; }
inline void store1(bf16 *p, float v) { *p = to_bf16(v); }

#ifdef __AVX512F__
typedef __m512 V;
constexpr int W = 16;  // lanes
constexpr int KB = 6;  // rows of x (or of the gradient) held in registers at once: 6 x 4 accumulators + operands
constexpr int IN_VECS = 4;  // vectors of input columns per chunk of the input gradient (4 x 6 accumulators)
constexpr bool STREAM_INPUT_GRAD = false;  // the input gradient in runs (input_grad_runs below; AVX2 streams)
constexpr int WG_VECS = 4;  // vectors of columns per block of the weight gradient (4 x 4 accumulators)
// Rows of the weight gradient per unit: float32 on the AMX machine's cores in units of 64 rows took 0.87-0.95x the time
// of 16-row units at 4-64 rows per expert (64 experts, measured).
constexpr long WG_UNIT_ROWS = 64;

inline V vzero() { return _mm512_setzero_ps(); }
inline V vset1(float f) { return _mm512_set1_ps(f); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V load(const float *p) { return _mm512_loadu_ps(p); }
inline V load(const bf16 *p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m256i to_bf16(V v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}
// Non-temporal only at the vector's own boundary (the stream instructions require it).
inline void store(float *p, V v, bool stream) {
  if (stream && (reinterpret_cast<uintptr_t>(p) & 63) == 0) _mm512_stream_ps(p, v);
  else _mm512_storeu_ps(p, v);
}
inline void store(bf16 *p, V v, bool stream) {
  __m256i h = to_bf16(v);
  if (stream && (reinterpret_cast<uintptr_t>(p) & 31) == 0) _mm256_stream_si256(reinterpret_cast<__m256i *>(p), h);
  else _mm256_storeu_si256(reinterpret_cast<__m256i *>(p), h);
}
// The sums of a, b, c and d's lanes into s[0..3]: one folding of four vectors together instead of four separate
// reductions, a third of the instructions.
inline void sums4(V a, V b, V c, V d, float *s) {
  V ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  V cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  V t = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, t);
  for (int r = 0; r < 4; r++) s[r] = lanes[4 * r];
}
#ifdef __AMX_BF16__
// The AMX build runs only where the CPU has AMX-BF16 tiles (CPUID leaf 7: EDX bits 22 and 24) and Linux grants this
// process their state (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA; oneDNN asks the same for torch's GEMMs).
bool tiles_granted() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return false;
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}
int supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16") && tiles_granted();
}
#else
int supported() { return __builtin_cpu_supports("avx512f"); }
#endif
#else
// AVX2: 16 vector registers, not 32. The forward's 4 x 4 accumulators spill a few to L1 (4 rows per pass measured
// as fast as 2 or 3 at 1-4 rows, with half the passes over the weight at 8; docs/performance.md), and the input
// gradient streams the weight's rows instead of holding column strips in registers (input_grad_stream).
typedef __m256 V;
constexpr int W = 8;
constexpr int KB = 4;
constexpr int WG_VECS = 2;
constexpr long WG_UNIT_ROWS = 16;
constexpr int IN_VECS = 1;  // unused: the input gradient streams
constexpr bool STREAM_INPUT_GRAD = true;

inline V vzero() { return _mm256_setzero_ps(); }
inline V vset1(float f) { return _mm256_set1_ps(f); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V load(const float *p) { return _mm256_loadu_ps(p); }
inline V load(const bf16 *p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i *>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m128i to_bf16(V v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
  // every lane holds 0..0xFFFF: the unsigned saturating pack is exact
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
inline void store(float *p, V v, bool stream) {
  if (stream && (reinterpret_cast<uintptr_t>(p) & 31) == 0) _mm256_stream_ps(p, v);
  else _mm256_storeu_ps(p, v);
}
inline void store(bf16 *p, V v, bool stream) {
  __m128i h = to_bf16(v);
  if (stream && (reinterpret_cast<uintptr_t>(p) & 15) == 0) _mm_stream_si128(reinterpret_cast<__m128i *>(p), h);
  else _mm_storeu_si128(reinterpret_cast<__m128i *>(p), h);
}
inline void sums4(V a, V b, V c, V d, float *s) {
  // [a0+a1+a2+a3, b.., c.., d.. | a4+..+a7, b.., c.., d..], then its two halves added
  V t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
}
int supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#endif

template <typename T>
inline void store_sums4(T *p, V a, V b, V c, V d) {
  float s[4];
  sums4(a, b, c, d, s);
  for (int r = 0; r < 4; r++) store1(p + r, s[r]);
}

// Software prefetch of the weight where the loops read it as short streams side by side (four rows at a time in the
// forward, a few lines of each row in the input gradient), which the hardware prefetcher does not follow far enough
// ahead. On the AMD machines (AVX-512 without tiles, and the AVX2 build timed there too; 2026-12-06) a prefetch into
// L1 (T0) held the forward to 7-9 GB/s of weight per core, the L1's misses in flight being the limit; into L2 (T1)
// two blocks ahead, 18 GB/s (a plain read streams 20-23): 64 experts' forward at 1-16 rows mostly 0.5-0.9x the time,
// float32 and bfloat16, and reading the weight row after row for few rows no longer paid (removed). The input
// gradient also keeps a near prefetch into L1 (RUN_NEAR): with the far one alone, bfloat16 at 512 x 2,048 and 8-16
// rows took 1.1-1.2x. The AMX build keeps what was measured on its machine (T0 one block ahead; T1 there was within
// noise).
#ifdef __AMX_BF16__
constexpr _mm_hint WEIGHT_HINT = _MM_HINT_T0;
constexpr long FORWARD_AHEAD = 4;  // weight rows: one block of the forward
constexpr long RUN_NEAR = 0;
#else
constexpr _mm_hint WEIGHT_HINT = _MM_HINT_T1;
constexpr long FORWARD_AHEAD = 8;
constexpr long RUN_NEAR = 8;  // weight rows ahead into L1 in the input gradient (input_grad_chunk)
#endif

#ifdef __AVX512BF16__
// A static initializer may run before libgcc has read the CPU model: read it first.
const bool HAS_DPBF16 = (__builtin_cpu_init(), __builtin_cpu_supports("avx512bf16"));
#else
const bool HAS_DPBF16 = false;
#endif
// The bfloat16 gradients on the pair dot product (pairs_weight_grad_block, input_grad_chunk_dp) where the build has it
// and no tiles: the AMX build's gradients run on its tiles, and these were not measured there.
#if defined(__AVX512BF16__) && !defined(__AMX_BF16__)
constexpr bool PAIRS = true;
#else
constexpr bool PAIRS = false;
#endif

// The line at column i of the four weight rows FORWARD_AHEAD past row o. Once per 64-byte line; a prefetch never
// faults, past the end included.
template <typename T>
inline void prefetch_next(const T *w, long in, long o, long i) {
  if ((i * sizeof(T)) % 64) return;
  for (long r = FORWARD_AHEAD; r < FORWARD_AHEAD + 4; r++)
    _mm_prefetch(reinterpret_cast<const char *>(w + (o + r) * in + i), WEIGHT_HINT);
}

// Operand types: X for the activations (x, y and their gradients), T for the weight and its gradient.

// y[k, o + r] = x[k, :] . w[o + r, :] for k < K (<= KB), r < 4: four weight rows read once for K rows.
template <typename X, typename T, int K>
void forward_block(const X *x, const T *w, X *y, long out, long in, long o) {
  V acc[K][4];
  for (int k = 0; k < K; k++)
    for (int r = 0; r < 4; r++) acc[k][r] = vzero();
  for (long i = 0; i < in; i += W) {
    V w0 = load(w + (o + 0) * in + i), w1 = load(w + (o + 1) * in + i);
    V w2 = load(w + (o + 2) * in + i), w3 = load(w + (o + 3) * in + i);
    prefetch_next(w, in, o, i);
    for (int k = 0; k < K; k++) {
      V xv = load(x + k * in + i);
      acc[k][0] = vfma(xv, w0, acc[k][0]);
      acc[k][1] = vfma(xv, w1, acc[k][1]);
      acc[k][2] = vfma(xv, w2, acc[k][2]);
      acc[k][3] = vfma(xv, w3, acc[k][3]);
    }
  }
  for (int k = 0; k < K; k++) store_sums4(y + k * out + o, acc[k][0], acc[k][1], acc[k][2], acc[k][3]);
}

constexpr long STREAM_COLS = 1024;  // input columns per unit of input_grad_stream (4 KB runs of a float32 row)
constexpr long STREAM_ROWS = 8;     // rows of the gradient whose partial sums (32 KB) share one pass over the weight

// gx[k, i0 : i0 + cols] = sum over o of g[k, o] * w[o, i0 : i0 + cols] for k < rows, with the partial sums in a
// buffer in cache instead of registers: the weight is read row after row in runs of up to 4 KB that the hardware
// prefetcher follows, where column strips held in registers take a line or two from each of `out` rows (on AVX2,
// whose 16 registers allow only narrow strips, up to twice torch's time at one row; docs/performance.md).
template <typename X, typename T>
void input_grad_stream(const X *g, const T *w, X *gx, long rows, long out, long in, long i0, long cols) {
  alignas(64) float acc[STREAM_ROWS][STREAM_COLS];
  for (long k0 = 0; k0 < rows; k0 += STREAM_ROWS) {
    long kn = rows - k0 < STREAM_ROWS ? rows - k0 : STREAM_ROWS;
    for (long k = 0; k < kn; k++)
      for (long i = 0; i < cols; i += W) store(acc[k] + i, vzero(), false);
    for (long o = 0; o < out; o += 4) {  // out is a multiple of 16
      const T *w0 = w + o * in + i0, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
      for (long k = 0; k < kn; k++) {  // the first k reads the four rows from memory, the others from L1
        const X *gk = g + (k0 + k) * out + o;
        V g0 = vset1(scalar(gk[0])), g1 = vset1(scalar(gk[1])), g2 = vset1(scalar(gk[2])), g3 = vset1(scalar(gk[3]));
        float *a = acc[k];
        for (long i = 0; i < cols; i += W) {
          V s = vfma(g0, load(w0 + i), load(a + i));
          s = vfma(g1, load(w1 + i), s);
          s = vfma(g2, load(w2 + i), s);
          store(a + i, vfma(g3, load(w3 + i), s), false);
        }
      }
    }
    for (long k = 0; k < kn; k++)
      for (long i = 0; i < cols; i += W) store(gx + (k0 + k) * in + i0 + i, load(acc[k] + i), false);
  }
}

// input_grad_runs' blocking, measured on the AMX machine over 128 experts at 1-16 rows (512 or 2,048 columns per
// unit, 8-32 rows per block, 16-64 rows ahead: within 10 % of each other; docs/performance.md).
constexpr long RUN_COLS = 1024;   // input columns per unit (runs of up to 4 KB of a float32 row)
constexpr long RUN_ROWS = 16;     // weight rows per block
constexpr long RUN_AHEAD = 32;    // weight rows prefetched ahead
constexpr long RUN_PART = 16384;  // floats of partial sums a unit holds (64 KB, on the stack)
// From PAIR_RUN_MIN_ROWS rows of g the pair dot product's blocks are PAIR_RUN_ROWS weight rows: each chunk's 24
// accumulators then go through `part` once per 64 pairs of weight rows, not once per 8 (a load and a store of each
// per 192 products, a seventh of the chunk's instructions), and the block's weight (128 KB at 512 columns) is read
// again from L2 for each block of KB rows of g. The same sums in the same order. On the AMD EPYC, 64 experts
// (twenty-second session): 0.87-0.93x the time at 12-16 rows, 0.75-0.80x at 24-40, 0.61-0.69x at 96-160; below 12
// rows, where the weight streams from memory once, the long blocks' strips down 128 rows slowed it (1.05-1.14x at
// 4-8 rows).
constexpr long PAIR_RUN_ROWS = 128;
constexpr long PAIR_RUN_MIN_ROWS = 12;

// The bytes [i, i + bytes) of the weight rows RUN_AHEAD (into L2 where WEIGHT_HINT says so) and RUN_NEAR (into L1)
// past row o: the runs of the input gradient (input_grad_chunk, input_grad_chunk_dp).
template <typename T>
inline void prefetch_run(const T *w, long in, long o, long i, long bytes) {
  for (long line = 0; line < bytes; line += 64) {
    _mm_prefetch(reinterpret_cast<const char *>(w + (o + RUN_AHEAD) * in + i) + line, WEIGHT_HINT);
    if constexpr (RUN_NEAR > 0)
      _mm_prefetch(reinterpret_cast<const char *>(w + (o + RUN_NEAR) * in + i) + line, _MM_HINT_T0);
  }
}

// input_grad_runs' work on one chunk of C vectors of columns at i for K rows of g, over weight rows o0 <= o < o1: the
// chain of sums of each output element continues from p (partial sums, row stride ldp) unless first.
template <typename X, typename T, int K, int C>
inline void input_grad_chunk(const X *g, const T *w, float *p, long out, long in, long ldp, long o0, long o1, long i,
                             bool first, bool fetch) {
  V acc[K][C];
  for (int k = 0; k < K; k++)
    for (int c = 0; c < C; c++) acc[k][c] = first ? vzero() : load(p + k * ldp + W * c);
  for (long o = o0; o < o1; o++) {
    V wv[C];
    for (int c = 0; c < C; c++) wv[c] = load(w + o * in + i + W * c);
    if (fetch) prefetch_run(w, in, o, i, C * W * long(sizeof(T)));
    for (int k = 0; k < K; k++) {
      V gv = vset1(scalar(g[k * out + o]));
      for (int c = 0; c < C; c++) acc[k][c] = vfma(gv, wv[c], acc[k][c]);
    }
  }
  for (int k = 0; k < K; k++)
    for (int c = 0; c < C; c++) store(p + k * ldp + W * c, acc[k][c], false);
}

#if defined(__AVX512BF16__) && !defined(__AMX_BF16__)
// input_grad_chunk for bfloat16 on the pair dot product, over G groups of 32 columns: weight rows o and o + 1 are
// interleaved element by element as they are read (an unpack within each 128-bit lane), so each vdpbf16ps adds
// g[k, o] w[o, i] + g[k, o + 1] w[o + 1, i] into 16 sums, half the arithmetic instructions of widening both and no
// widening. A group's sums lie in two vectors in the unpack's order (pairs_in_order puts them back); p keeps that
// order between calls. o1 - o0 even.
template <int K, int G>
inline void input_grad_chunk_dp(const bf16 *g, const bf16 *w, float *p, long out, long in, long ldp, long o0, long o1,
                                long i, bool first, bool fetch) {
  __m512 acc[K][2 * G];
  for (int k = 0; k < K; k++)
    for (int c = 0; c < 2 * G; c++) acc[k][c] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(p + k * ldp + 16 * c);
  for (long o = o0; o < o1; o += 2) {
    __m512i pw[2 * G];
    for (int q = 0; q < G; q++) {
      __m512i a = _mm512_loadu_si512(w + o * in + i + 32 * q), b = _mm512_loadu_si512(w + (o + 1) * in + i + 32 * q);
      pw[2 * q] = _mm512_unpacklo_epi16(a, b);
      pw[2 * q + 1] = _mm512_unpackhi_epi16(a, b);
    }
    if (fetch)
      for (long r = o; r < o + 2; r++) prefetch_run(w, in, r, i, G * 64);
    for (int k = 0; k < K; k++) {
      int32_t pair;  // g[k, o] and g[k, o + 1]
      memcpy(&pair, g + k * out + o, 4);
      __m512bh gv = (__m512bh)_mm512_set1_epi32(pair);
      for (int c = 0; c < 2 * G; c++) acc[k][c] = _mm512_dpbf16_ps(acc[k][c], gv, (__m512bh)pw[c]);
    }
  }
  for (int k = 0; k < K; k++)
    for (int c = 0; c < 2 * G; c++) _mm512_storeu_ps(p + k * ldp + 16 * c, acc[k][c]);
}

// One group's sums from input_grad_chunk_dp's order to the columns' (32 of them from sums at s) into gx. In the
// unpack's order, lane 4 b + r of the first vector holds column 8 b + r and of the second 8 b + 4 + r (b < 4, r < 4).
inline void pairs_in_order(const float *s, bf16 *gx) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  __m512 lo = _mm512_loadu_ps(s), hi = _mm512_loadu_ps(s + 16);
  store(gx, _mm512_permutex2var_ps(lo, first, hi), false);
  store(gx + 16, _mm512_permutex2var_ps(lo, second, hi), false);
}
#else
template <int K, int G>
inline void input_grad_chunk_dp(const bf16 *, const bf16 *, float *, long, long, long, long, long, long, bool, bool) {}
inline void pairs_in_order(const float *, bf16 *) {}
#endif

// gx[k, i0 : i0 + cols] = sum over o of g[k, o] * w[o, i0 : i0 + cols] for k < rows (AVX-512): the weight read in
// blocks of RUN_ROWS rows, a run of each row's columns at a time (from cache again for each block of KB rows of g
// after the first), with the partial sums of every row kept in `part` between blocks. Strips of four vectors of
// columns walked down all `out` rows instead (a line or four from each row, far apart; the prefetchers follow them
// badly) ran at 0.4-0.8x this speed at 1-16 rows. Each element is summed o after o in one chain per lane either way.
template <typename X, typename T>
void input_grad_runs(const X *g, const T *w, X *gx, long rows, long out, long in, long i0, long cols) {
  constexpr long CHUNK = IN_VECS * W, MOST_ROWS = RUN_PART / CHUNK;
  // bfloat16 on pairs of weight rows: then every chunk is whole groups of 32 columns (units and spans are multiples
  // of 64 columns)
  constexpr bool BF16 = PAIRS && std::is_same_v<X, bf16> && std::is_same_v<T, bf16>;
  const bool pairs = BF16 && HAS_DPBF16 && in % 32 == 0;
  alignas(64) float part[RUN_PART];
  for (long r0 = 0; r0 < rows; r0 += MOST_ROWS) {
    const long rn = rows - r0 < MOST_ROWS ? rows - r0 : MOST_ROWS;
    const long span = RUN_PART / rn / CHUNK * CHUNK;  // columns whose partial sums for rn rows fit in part
    const long block = pairs && rn >= PAIR_RUN_MIN_ROWS ? PAIR_RUN_ROWS : RUN_ROWS;  // weight rows per block
    const X *gr = g + r0 * out;
    for (long s0 = 0; s0 < cols; s0 += span) {
      const long sn = cols - s0 < span ? cols - s0 : span;
      for (long o0 = 0; o0 < out; o0 += block) {
        const long o1 = o0 + block < out ? o0 + block : out;
        for (long k0 = 0; k0 < rn; k0 += KB)
          with_rows(int(rn - k0 < KB ? rn - k0 : KB), [&](auto K) {
            for (long c = 0; c < sn; c += CHUNK)
              with_vecs(int(sn - c < CHUNK ? (sn - c) / W : IN_VECS), [&](auto C) {
                constexpr int KN = decltype(K)::value, CN = decltype(C)::value;
                float *p = part + k0 * sn + c;
                if constexpr (BF16 && CN % 2 == 0) {
                  if (pairs)
                    return input_grad_chunk_dp<KN, CN / 2>(gr + k0 * out, w, p, out, in, sn, o0, o1, i0 + s0 + c,
                                                           o0 == 0, k0 == 0);
                }
                input_grad_chunk<X, T, KN, CN>(gr + k0 * out, w, p, out, in, sn, o0, o1, i0 + s0 + c, o0 == 0,
                                               k0 == 0);
              });
          });
      }
      for (long k = 0; k < rn; k++) {
        X *row = gx + (r0 + k) * in + i0 + s0;
        if constexpr (BF16) {
          if (pairs) {
            for (long i = 0; i < sn; i += 32) pairs_in_order(part + k * sn + i, row + i);
            continue;
          }
        }
        for (long i = 0; i < sn; i += W) store(row + i, load(part + k * sn + i), false);
      }
    }
  }
}

// gw[o + r, i0 : i0 + W C] = sum over k < rows of g[k, o + r] * x[k, i0 : i0 + W C], r < 4, streamed out.
template <typename X, typename T, int C>
void weight_grad_block(const X *g, const X *x, T *gw, long rows, long out, long in, long o, long i0) {
  V acc[4][C];
  for (int r = 0; r < 4; r++)
    for (int c = 0; c < C; c++) acc[r][c] = vzero();
  for (long k = 0; k < rows; k++) {
    V xv[C];
    for (int c = 0; c < C; c++) xv[c] = load(x + k * in + i0 + W * c);
    for (int r = 0; r < 4; r++) {
      V gv = vset1(scalar(g[k * out + o + r]));
      for (int c = 0; c < C; c++) acc[r][c] = vfma(gv, xv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < 4; r++)
    for (int c = 0; c < C; c++) store(gw + (o + r) * in + i0 + W * c, acc[r][c], true);
}

#ifdef __AVX512BF16__
// forward_block for bfloat16 with the CPU's pair dot product (vdpbf16ps): 32 elements per instruction, no
// conversion. in must be a multiple of 32.
template <int K>
void forward_block_dp(const bf16 *x, const bf16 *w, bf16 *y, long out, long in, long o) {
  __m512 acc[K][4];
  for (int k = 0; k < K; k++)
    for (int r = 0; r < 4; r++) acc[k][r] = _mm512_setzero_ps();
  for (long i = 0; i < in; i += 32) {
    __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + (o + 0) * in + i), w1 = (__m512bh)_mm512_loadu_si512(w + (o + 1) * in + i);
    __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + (o + 2) * in + i), w3 = (__m512bh)_mm512_loadu_si512(w + (o + 3) * in + i);
    prefetch_next(w, in, o, i);
    for (int k = 0; k < K; k++) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k * in + i);
      acc[k][0] = _mm512_dpbf16_ps(acc[k][0], xv, w0);
      acc[k][1] = _mm512_dpbf16_ps(acc[k][1], xv, w1);
      acc[k][2] = _mm512_dpbf16_ps(acc[k][2], xv, w2);
      acc[k][3] = _mm512_dpbf16_ps(acc[k][3], xv, w3);
    }
  }
  for (int k = 0; k < K; k++) store_sums4(y + k * out + o, acc[k][0], acc[k][1], acc[k][2], acc[k][3]);
}
#else
template <int K>
void forward_block_dp(const bf16 *, const bf16 *, bf16 *, long, long, long) {}
#endif

template <typename X, typename T, int K>
void forward_any(const X *x, const T *w, X *y, long out, long in, long o) {
  if constexpr (sizeof(X) == 2 && sizeof(T) == 2) {
    if (HAS_DPBF16 && in % 32 == 0) return forward_block_dp<K>(x, w, y, out, in, o);
  }
  forward_block<X, T, K>(x, w, y, out, in, o);
}

// A runtime row count (1..KB) to the templates above.
template <int K = KB, typename F>
void with_rows(int k, F f) {
  if constexpr (K > 1) {
    if (k < K) return with_rows<K - 1>(k, f);
  }
  f(std::integral_constant<int, K>());
}
template <int C = IN_VECS, typename F>
void with_vecs(int c, F f) {
  if constexpr (C > 1) {
    if (c < C) return with_vecs<C - 1>(c, f);
  }
  f(std::integral_constant<int, C>());
}

constexpr long TILE_ROWS = 16;        // rows of every AMX tile; 64 bytes each: 32 bfloat16 or 16 float32
constexpr long TILE_K = 32;           // inputs per step (one A tile's row)
constexpr int TILE_PASS = 4;          // blocks of 16 rows of x per pass over the weight (accumulator tiles 0-3)
constexpr long TILE_UNIT_ROWS = 128;  // weight rows per unit of the forward
constexpr long TILE_GRAD_ROWS = 64;   // rows of the weight gradient per unit
// Up to this many rows an expert's weight gradient takes the loops above: on tiles its rows are padded to 32, and
// the accumulators' pass through a buffer costs more than the products save (1-4 rows: 1.3-2.1x slower, measured;
// about equal at 8)
constexpr long TILE_GRAD_MIN_ROWS = 8;
// Up to this many rows the input gradient takes the loops above (input_grad_runs) rather than the tiles.
constexpr long TILE_IG_MIN_ROWS = 4;
constexpr long TILE_IG_COLS = 256;  // input columns at a time (B tiles and accumulators in L1 at 16 rows)
// From this many rows the input gradient holds its accumulators in the tiles (tiles_input_grad_blocks). Below it the
// accumulators' trips through L1 (tiles_input_grad) cost less than a piece of the weight interleaved before any
// product: in blocks, 8-16 rows ran 1.1-1.5x slower where out > in and about even where out <= in (measured).
constexpr long TILE_IG_BLOCK_ROWS = 32;

inline long ceil_to(long v, long m) { return (v + m - 1) / m * m; }
// Rows of an expert's block of TILE_ROWS from row `first` that exist (its last block may be partial).
inline long block_rows(long rows, long first) { return rows - first < TILE_ROWS ? rows - first : TILE_ROWS; }
// Steps of TILE_K weight rows (the last one partial) of the tiles' input gradient over `out` rows.
inline long tile_steps(long out) { return (out + TILE_K - 1) / TILE_K; }
// uint32s of tiles_input_grad_blocks' interleaved weight: the B tiles of every step for TILE_IG_COLS columns.
inline long tiles_input_grad_b(long out) { return tile_steps(out) * TILE_IG_COLS * TILE_ROWS; }
// Pairs of an expert's rows in the weight gradient's tiles, padded to whole tiles (16 pairs).
inline long row_pairs(long rows) { return ceil_to(rows, TILE_K) / 2; }

#ifdef __AVX512F__
// r[i][j] -> r[j][i] for a 16 x 16 block of float32 in registers: pairs, then quads within 128-bit lanes, then
// lanes (64 shuffles).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // t[i], t[i + 1] lane L: rows i, i + 1 interleaved, columns 4L..4L+1, 4L+2..4L+3
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + c] lane L: column 4L + c of rows i..i+3
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; c++) {  // lanes 0 and 2 (0x88), or 1 and 3 (0xdd), of the first operand, then the second's
    t[c] = _mm512_shuffle_f32x4(r[c], r[c + 4], 0x88);
    t[c + 4] = _mm512_shuffle_f32x4(r[c], r[c + 4], 0xdd);
    t[c + 8] = _mm512_shuffle_f32x4(r[c + 8], r[c + 12], 0x88);
    t[c + 12] = _mm512_shuffle_f32x4(r[c + 8], r[c + 12], 0xdd);
  }
  for (int c = 0; c < 4; c++) {  // r[4L + c]: column 4L + c of every row
    r[c] = _mm512_shuffle_f32x4(t[c], t[c + 8], 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(t[c], t[c + 8], 0xdd);
    r[c + 4] = _mm512_shuffle_f32x4(t[c + 4], t[c + 12], 0x88);
    r[c + 12] = _mm512_shuffle_f32x4(t[c + 4], t[c + 12], 0xdd);
  }
}

// The float32 forward from OUTER_MIN_ROWS rows per expert, as outer products: y.T = w x.T. The dot products above
// read x again for every four weight rows and sum lanes at the end; torch's GEMMs pack (transpose) the weight on
// every call. Here x is laid out once per call, transposed (outer_pack), and each weight element is broadcast from
// memory as it lies, once per 64 rows of x, against vectors of 16 rows of x: NB weight rows by MV vectors of rows in
// registers, every output summed in one chain over the inputs (a tail's rows aside: OUTER_TAIL). The accumulators go
// to a staging buffer, and from it to y through 16 x 16 transposes, a line of y at a time, streamed (ordinary stores:
// up to 1.15x slower). 64 experts at 32-64 rows: 0.63-0.88x torch's path, 0.66-0.74x the dot products' time
// (docs/performance.md). The input gradient the same way (the weight's columns broadcast, walked down its rows) ran
// 1.3-2.4x the time of input_grad_runs.
constexpr long OUTER_MIN_ROWS = 16;
// ... and the forward from 8 where the weight's rows span a page or more (OUTER_WHOLE_MIN_IN): there the dot products'
// pass, four weight rows against up to six rows of x (80 KB), outgrows L1. 64 experts, 512 x 2,048: 10-15 rows on the
// outer products (16 rows, padded) took 0.64-0.77x the dot products' time, 8 rows 0.95x, 1-6 rows 1.3x.
constexpr long OUTER_MIN_ROWS_LONG = 8;
constexpr int OUTER_MV = 4;  // vectors of x's rows per pass over a block of weight rows (64 rows)
// Weight rows per block by vectors of x's rows in the chunk (1-4): with 16-32 rows, 8 rows (8 or 16
// accumulators) ran 0.91-0.95x the time of 12 or 16, and 4 rows 1.1-1.3x; with 48-64 rows, 6 (18 or 24 accumulators)
// as fast as 8 and faster than 4 (64 experts; docs/performance.md). Even numbers: a unit's rows left after whole
// blocks go in blocks of 4 and 2.
constexpr int OUTER_NB[OUTER_MV + 1] = {0, 8, 8, 6, 6};
constexpr long OUTER_KC = 128;  // inputs per piece: a chunk's piece of xt (32 KB) stays in L1 for every weight block
// ... unless the weight's rows span a page or more (4 KB), x has at most 32 rows and xt at most 256 KB: then each
// weight row is read whole, in order. Pieces of rows 8 KB apart stream from memory at about half the rate per core (a
// bare loop of the same loads: 6.5-7.1 GB/s against 12.7-13.3; rows 2 KB apart 7.5 against 12.7). 64 experts, 512 x
// 2,048: 0.66-0.84x the time at 16 rows, 0.89-0.95x at 20-32; 2,048 x 512 (whole rows: xt out of L1) up to 1.10x
// slower at 20 rows; with more rows a block's FMAs hide the pieces' reads (even at 48-64).
constexpr long OUTER_WHOLE_ROWS = 32, OUTER_WHOLE_BYTES = 256 << 10, OUTER_WHOLE_MIN_IN = 1024;

inline long outer_ld(long rows) { return ceil_to(rows, W); }  // xt's row: x's rows, padded to whole vectors

// Whether the forward may read whole weight rows against an xt of rows ld: at most OUTER_WHOLE_ROWS of them, and the
// whole of xt within OUTER_WHOLE_BYTES.
inline bool outer_whole_fits(long ld, long in) { return ld <= OUTER_WHOLE_ROWS && ld * in * 4 <= OUTER_WHOLE_BYTES; }

// Rows past one or two whole vectors of x's rows that the forward takes as dot products (outer_tail_rows) beside the
// outer products, instead of a vector of their own that is mostly zeros: 1-4 of them, where the rest reads whole
// weight rows (its xt within OUTER_WHOLE_BYTES). 64 experts, 2,048 x 512 and 512 x 2,048: 0.86-0.96x and 0.67-0.73x
// the time at 17-20 rows, 0.85-0.90x and 0.74-0.81x at 33-36; tails of 5-8 rows up to 1.3x slower where out > in.
// Their sums run in 16 lanes: a row's bits depend on its place among its expert's rows (never on alignment or threads).
constexpr long OUTER_TAIL = 4;

// How many of x's rows the forward's outer products leave to outer_tail_rows (0: none).
inline long outer_tail(long rows, long in) {
  const long t = rows % W, whole = rows - t;
  return t <= OUTER_TAIL && whole >= W && outer_whole_fits(whole, in) ? t : 0;
}

struct OuterTail {  // x's tail rows (T of them, each `in` long) and their rows of y (each `out` long)
  const float *x;
  float *y;
  long out;
};

// y[j * out + r] = (x's tail row j) . (w's row r) for r < nb and j < T: R weight rows (R divides nb) against every tail
// row at a time, 16 lanes of partial sums over the inputs, summed at the end; the block's weight rows are still in L1
// from its outer products.
template <int T, int R>
void outer_tail_rows(const OuterTail &tail, const float *w, long in, long nb) {
  for (long r = 0; r < nb; r += R) {
    V acc[R][T];
    for (int i = 0; i < R; i++)
      for (int j = 0; j < T; j++) acc[i][j] = vzero();
    for (long k = 0; k < in; k += W) {
      V xv[T];
      for (int j = 0; j < T; j++) xv[j] = _mm512_loadu_ps(tail.x + j * in + k);
      for (int i = 0; i < R; i++) {
        const V wv = _mm512_loadu_ps(w + (r + i) * in + k);
        for (int j = 0; j < T; j++) acc[i][j] = vfma(wv, xv[j], acc[i][j]);
      }
    }
    for (int i = 0; i < R; i++)
      for (int j = 0; j < T; j++) tail.y[j * tail.out + r + i] = _mm512_reduce_add_ps(acc[i][j]);
  }
}

// x (rows, in) into xt (in, outer_ld(rows)): column k of x is row k of xt, zeros past x's last row.
void outer_pack(const float *x, float *xt, long rows, long in) {
  const long ld = outer_ld(rows);
  for (long m = 0; m < ld; m += W)
    for (long k = 0; k < in; k += W) {
      __m512 r[W];
      for (int i = 0; i < W; i++) r[i] = m + i < rows ? _mm512_loadu_ps(x + (m + i) * in + k) : _mm512_setzero_ps();
      transpose16(r);
      for (int i = 0; i < W; i++) _mm512_store_ps(xt + (k + i) * ld + m, r[i]);
    }
}

// st[r * ld + 16 v + j] (+)= sum over k < kc of w[r * in + k] * xt[k * ld + 16 v + j] for r < NB, v < MV: the sums go
// on from st's unless first. The NB weight rows after these (`next`) are prefetched a line of each row per 16 inputs:
// without it 1.4-1.9x slower at 32-64 rows, and no faster two or four blocks ahead into L2 (64 experts, measured).
template <int MV, int NB>
void outer_block(const float *xt, long ld, const float *w, long in, long kc, const float *next, float *st, bool first) {
  V acc[NB][MV];
  for (int r = 0; r < NB; r++)
    for (int v = 0; v < MV; v++) acc[r][v] = first ? vzero() : _mm512_load_ps(st + r * ld + v * W);
  for (long k0 = 0; k0 < kc; k0 += W) {
    for (int r = 0; r < NB; r++) _mm_prefetch(reinterpret_cast<const char *>(next + r * in + k0), _MM_HINT_T0);
    for (long k = k0; k < k0 + W; k++) {
      V xv[MV];
      for (int v = 0; v < MV; v++) xv[v] = _mm512_load_ps(xt + k * ld + v * W);
      for (int r = 0; r < NB; r++) {
        const V b = vset1(w[r * in + k]);
        for (int v = 0; v < MV; v++) acc[r][v] = vfma(b, xv[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < NB; r++)
    for (int v = 0; v < MV; v++) _mm512_store_ps(st + r * ld + v * W, acc[r][v]);
}

// Blocks of NB weight rows from o while a whole one fits below o1, over inputs k0 .. k0 + kc, for the chunk of MV
// vectors of x's rows at m, and the tail's T rows (T > 0: whole weight rows, one chunk); returns the first weight row
// left.
template <int MV, int NB, int T>
long outer_blocks(const float *xt, long ld, const float *w, long in, long k0, long kc, long m, long o, long o0, long o1,
                  float *st, const OuterTail &tail) {
  for (; o + NB <= o1; o += NB) {
    const float *wo = w + o * in + k0;
    outer_block<MV, NB>(xt + k0 * ld + m, ld, wo, in, kc, wo + NB * in, st + (o - o0) * ld + m, k0 == 0);
    if constexpr (T > 0) outer_tail_rows<T, NB % 4 == 0 ? 4 : 2>({tail.x, tail.y + o, tail.out}, wo, in, NB);
  }
  return o;
}

// outer_blocks over all of o0 .. o1 for a chunk of MV vectors of rows: blocks of OUTER_NB[MV] weight rows, then of 4
// and 2 for what is left (o1 - o0 and the blocks are even).
template <int MV, int T = 0>
void outer_chunk(const float *xt, long ld, const float *w, long in, long k0, long kc, long m, long o0, long o1,
                 float *st, const OuterTail &tail = {}) {
  long o = outer_blocks<MV, OUTER_NB[MV], T>(xt, ld, w, in, k0, kc, m, o0, o0, o1, st, tail);
  o = outer_blocks<MV, 4, T>(xt, ld, w, in, k0, kc, m, o, o0, o1, st, tail);
  outer_blocks<MV, 2, T>(xt, ld, w, in, k0, kc, m, o, o0, o1, st, tail);
}

// y[:rows, o0 : o1] from the staging buffer's accumulators (o1 - o0 rows of ld): 16 x 16 transposes, whole lines of y
// (float32, or bfloat16 rounded once) streamed.
template <typename Y>
void outer_store(const float *st, Y *y, long rows, long out, long ld, long o0, long o1) {
  const long vecs = ld / W;
  for (long r = 0; r < o1 - o0; r += W)
    for (long v = 0; v < vecs; v++) {
      __m512 a[W];
      for (int i = 0; i < W; i++) a[i] = _mm512_load_ps(st + (r + i) * ld + v * W);
      transpose16(a);  // a[j]: outputs o0 + r .. + 16 of x's row 16 v + j
      const long valid = block_rows(rows, v * W);  // W is TILE_ROWS here
      for (long j = 0; j < valid; j++) store(y + (v * W + j) * out + o0 + r, a[j], true);
    }
}

// y[:, o0 : o1] = x @ w[o0 : o1].T for one expert, from xt (outer_pack; x for a tail's rows); st: the calling thread's
// staging buffer of (o1 - o0) * outer_ld(rows) floats. o1 - o0 is a multiple of 16. Inputs in pieces of OUTER_KC, each
// piece for a chunk of 64 rows of x (32 KB of xt) read from L1 by every block of weight rows; each chunk in blocks of
// its own width. With a tail (outer_tail), one chunk over whole weight rows, each block's tail rows after its own.
void outer_forward(const float *xt, const float *x, const float *w, float *y, long rows, long out, long in, long o0,
                   long o1, float *st) {
  const long tail = outer_tail(rows, in), ld = outer_ld(rows - tail), vecs = ld / W;
  if (tail > 0) {  // one chunk of whole vectors, whole weight rows, the tail's rows beside them
    const OuterTail t{x + (rows - tail) * in, y + (rows - tail) * out, out};
    with_vecs<2>(int(vecs), [&](auto MV) {
      with_vecs<OUTER_TAIL>(int(tail), [&](auto T) {
        outer_chunk<decltype(MV)::value, decltype(T)::value>(xt, ld, w, in, 0, in, 0, o0, o1, st, t);
      });
    });
    return outer_store(st, y, rows - tail, out, ld, o0, o1);
  }
  const bool whole = in >= OUTER_WHOLE_MIN_IN && outer_whole_fits(ld, in);
  const long piece = whole ? in : OUTER_KC;
  for (long k0 = 0; k0 < in; k0 += piece) {
    const long kc = in - k0 < piece ? in - k0 : piece;
    for (long m = 0; m < ld; m += OUTER_MV * W) {
      with_vecs<OUTER_MV>(int((ld - m) / W), [&](auto MV) {
        outer_chunk<decltype(MV)::value>(xt, ld, w, in, k0, kc, m, o0, o1, st);
      });
    }
  }
  outer_store(st, y, rows, out, ld, o0, o1);
}

// The float32 weight gradient from OUTER_MIN_ROWS rows, gw = g.T x, on operands laid out once per call: g transposed
// (outer_pack: each column of g, its rows side by side) and x in strips of WG_STRIP columns (each strip's rows side by
// side), so that a block's broadcasts and loads come from a few KB in L1. Read in place (weight_grad_block), g's
// columns and x's strips step a row of out or in floats at a time, lines that fall in the same few L1 sets. The same
// products in the same order (the same bits): 0.76-0.87x the loops' time at 32-128 rows (64 experts, measured).
constexpr long WG_STRIP = WG_VECS * W;

// x (rows, in) into strips: columns i0 .. i0 + WG_STRIP (fewer in the last) of every row at xs + i0 * rows.
void wgrad_pack_x(const float *x, float *xs, long rows, long in) {
  for (long i0 = 0; i0 < in; i0 += WG_STRIP) {
    const long width = in - i0 < WG_STRIP ? in - i0 : WG_STRIP;
    for (long k = 0; k < rows; k++) memcpy(xs + i0 * rows + k * width, x + k * in + i0, width * sizeof(float));
  }
}

// gw[r, 0 : 16 C] = sum over k < rows of gt[r * ld + k] * xs[k * 16 C : + 16 C] for r < 4 (gw a row of in floats
// apart), streamed out.
template <int C>
void wgrad_block(const float *gt, long ld, const float *xs, float *gw, long rows, long in) {
  V acc[4][C];
  for (int r = 0; r < 4; r++)
    for (int c = 0; c < C; c++) acc[r][c] = vzero();
  for (long k = 0; k < rows; k++) {
    V xv[C];
    for (int c = 0; c < C; c++) xv[c] = _mm512_load_ps(xs + k * C * W + c * W);
    for (int r = 0; r < 4; r++) {
      const V b = vset1(gt[r * ld + k]);
      for (int c = 0; c < C; c++) acc[r][c] = vfma(b, xv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < 4; r++)
    for (int c = 0; c < C; c++) store(gw + r * in + c * W, acc[r][c], true);
}

// gw[o0 : o1] of one expert (o1 - o0 a multiple of 4) from gt (outer_pack of g) and xs (wgrad_pack_x of x).
void wgrad_packed(const float *gt, const float *xs, float *gw, long rows, long in, long o0, long o1) {
  const long ld = outer_ld(rows);
  for (long i0 = 0; i0 < in; i0 += WG_STRIP) {
    const long vecs = (in - i0 < WG_STRIP ? in - i0 : WG_STRIP) / W;
    const float *strip = xs + i0 * rows;
    for (long o = o0; o < o1; o += 4) {
      const float *g = gt + o * ld;
      float *dst = gw + o * in + i0;
      with_vecs<WG_VECS>(int(vecs), [&](auto C) { wgrad_block<decltype(C)::value>(g, ld, strip, dst, rows, in); });
    }
  }
}

// The float32 input gradient from PANEL_MIN_ROWS rows (AVX-512): each strip of 64 of the unit's columns is first
// copied out of the weight, row after row, into the thread's buffer (out x 64 floats, contiguous), and every block of
// KB rows of g then sums over all of out in registers against it. Read in place, the strip's rows lie a row of the
// weight apart, lines that fall in a few sets of L1 and L2 and come from memory again for every block; input_grad_runs
// keeps them in L1 by holding partial sums of its rows instead, which costs more from ~56 rows. The same products in
// the same order (one chain over o per output), so the same bits: 0.94x input_grad_runs' time at 56 rows, 0.89x at
// 64, 0.75x at 128, 0.69x at 192 where out <= in (64 experts).
constexpr long PANEL_MIN_ROWS = 56;
constexpr long PANEL_PACK_AHEAD = 8;  // weight rows prefetched ahead while copying a strip
void input_grad_packed(const float *g, const float *w, float *gx, long rows, long out, long in, long i0, long cols,
                       float *panel) {
  constexpr long CHUNK = IN_VECS * W;
  for (long c = 0; c < cols; c += CHUNK) {
    const long width = cols - c < CHUNK ? cols - c : CHUNK;
    for (long o = 0; o < out; o++) {
      if (o + PANEL_PACK_AHEAD < out)
        for (long line = 0; line < width * 4; line += 64)
          _mm_prefetch(reinterpret_cast<const char *>(w + (o + PANEL_PACK_AHEAD) * in + i0 + c) + line, _MM_HINT_T0);
      for (long v = 0; v < width; v += W)  // not memcpy: a call per 256 bytes took 1.03-1.09x the time
        _mm512_storeu_ps(panel + o * width + v, _mm512_loadu_ps(w + o * in + i0 + c + v));
    }
    // input_grad_runs' register block over the strip (rows width floats apart) and all of out, its sums from zero
    with_vecs(int(width / W), [&](auto C) {
      for (long k0 = 0; k0 < rows; k0 += KB)
        with_rows(int(rows - k0 < KB ? rows - k0 : KB), [&](auto K) {
          input_grad_chunk<float, float, decltype(K)::value, decltype(C)::value>(
              g + k0 * out, panel, gx + k0 * in + i0 + c, out, width, in, 0, out, 0, true, false);
        });
    });
  }
}

constexpr bool OUTER = true;
#else  // AVX2 builds never take the outer products' path (OUTER): these only let work() compile
constexpr bool OUTER = false;
constexpr long PANEL_MIN_ROWS = 0;
constexpr long OUTER_MIN_ROWS = 0, OUTER_MIN_ROWS_LONG = 0, OUTER_WHOLE_MIN_IN = 0;
inline long outer_ld(long rows) { return rows; }
inline long outer_tail(long, long) { return 0; }
void outer_pack(const float *, float *, long, long) {}
void outer_forward(const float *, const float *, const float *, float *, long, long, long, long, long, float *) {}
void wgrad_pack_x(const float *, float *, long, long) {}
void wgrad_packed(const float *, const float *, float *, long, long, long, long) {}
#endif

#if defined(__AVX512BF16__) && !defined(__AMX_BF16__)
// The bfloat16 forward as outer products on the pair dot product, y.T = w x.T, as the float32 one above: x laid out
// once per call, transposed in pairs of its columns (each uint32 of xt holds x[m, 2p] and x[m, 2p + 1]), and each pair
// of a weight row (w[o, 2p], w[o, 2p + 1]) broadcast from memory as it lies against vectors of 16 rows of x, so that
// one vdpbf16ps adds both products into each of 16 rows' sums. The dot products (forward_block_dp) sum 16 lanes per
// output at the end, about a sixth of their instructions at 512 inputs. xt is read whole for each block of weight rows
// (from L2: 128 KB at 64 rows and 512 inputs), each weight row once per 64 rows of x. Rows are padded to whole vectors
// of 16, but for a tail of 1-8 rows past whole vectors, taken as dot products beside each block's outer products, as
// the float32 form does (PAIR_OUTER_TAIL). 64 experts on Zen 4, padded, against the dot products: 2,048 x 512
// 0.68-0.85x the time at 25-128 rows (1.0x at 24, which pads to 32; 1.06-1.11x at 16), 1,024 x 1,024 0.78-0.84x at
// 32-96; 512 x 2,048 0.86-0.99x at 32-128 and 1.24x at 24, where the lanes' sums are a quarter of the share: there the
// dot products stay (docs/performance.md).
constexpr long PAIR_OUTER_MIN_ROWS = 25;
constexpr long PAIR_OUTER_MAX_IN = 1024;
// Rows past whole vectors that the pair forward takes as dot products beside the outer products (pair_tail_rows)
// rather than padded to a vector: against the padding, 2,048 x 512 with tails of 1-4 rows 0.77-0.86x the time, 5-8
// rows 0.87-0.97x (33-72 rows; 1,024 x 1,024 0.75-0.86x at 1-4).
constexpr long PAIR_OUTER_TAIL = 8;

// How many of x's rows the pair forward leaves to pair_tail_rows (0: none).
inline long pair_outer_tail(long rows) {
  const long t = rows % W;
  return t <= PAIR_OUTER_TAIL && rows - t >= W ? t : 0;
}

// y[j * out + r] = (x's tail row j) . (w's row r) for r < nb and j < T, R weight rows at a time, on the pair dot
// product in 16 lanes summed at the end; the block's weight rows are still in L1 from its outer products. A row's bits
// depend on its place among its expert's rows (a tail's or a vector's), never on alignment or threads.
template <int T, int R>
void pair_tail_rows(const bf16 *x, bf16 *y, long out, const bf16 *w, long in, long nb) {
  for (long r = 0; r < nb; r += R) {
    __m512 acc[R][T];
    for (int i = 0; i < R; i++)
      for (int j = 0; j < T; j++) acc[i][j] = _mm512_setzero_ps();
    for (long k = 0; k < in; k += 2 * W) {
      __m512bh xv[T];
      for (int j = 0; j < T; j++) xv[j] = (__m512bh)_mm512_loadu_si512(x + j * in + k);
      for (int i = 0; i < R; i++) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (r + i) * in + k);
        for (int j = 0; j < T; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv[j], wv);
      }
    }
    for (int i = 0; i < R; i++)
      for (int j = 0; j < T; j++) store1(y + j * out + r + i, _mm512_reduce_add_ps(acc[i][j]));
  }
}

// x (rows, in) into xt (in / 2 rows of outer_ld(rows) uint32s): xt[p * ld + m] = x[m, 2p : 2p + 2], zeros past x's
// last row. in a multiple of 32.
void pair_outer_pack(const bf16 *x, uint32_t *xt, long rows, long in) {
  const long ld = outer_ld(rows), pairs = in / 2;
  for (long m = 0; m < ld; m += W)
    for (long p = 0; p < pairs; p += W) {
      __m512 r[W];  // 16 rows' 16 pairs, as floats for transpose16 (moved, never computed with)
      for (int i = 0; i < W; i++)
        r[i] = m + i < rows ? _mm512_castsi512_ps(_mm512_loadu_si512(x + (m + i) * in + 2 * p)) : _mm512_setzero_ps();
      transpose16(r);
      for (int i = 0; i < W; i++) _mm512_store_ps(reinterpret_cast<float *>(xt + (p + i) * ld + m), r[i]);
    }
}

// st[r * ld + 16 v + j] = sum over pairs p < in / 2 of w[r, 2p : 2p + 2] . xt[p * ld + 16 v + j] for r < NB, v < MV;
// the NB weight rows after these (`next`) prefetched a line of each per 16 pairs.
template <int MV, int NB>
void pair_outer_block(const uint32_t *xt, long ld, const bf16 *w, long in, const bf16 *next, float *st) {
  __m512 acc[NB][MV];
  for (int r = 0; r < NB; r++)
    for (int v = 0; v < MV; v++) acc[r][v] = _mm512_setzero_ps();
  for (long k0 = 0; k0 < in; k0 += 2 * W) {
    for (int r = 0; r < NB; r++) _mm_prefetch(reinterpret_cast<const char *>(next + r * in + k0), _MM_HINT_T0);
    for (long k = k0; k < k0 + 2 * W; k += 2) {
      __m512bh xv[MV];
      for (int v = 0; v < MV; v++) xv[v] = (__m512bh)_mm512_load_si512(xt + k / 2 * ld + v * W);
      for (int r = 0; r < NB; r++) {
        int32_t pair;  // w[r, k] and w[r, k + 1]
        memcpy(&pair, w + r * in + k, 4);
        const __m512bh b = (__m512bh)_mm512_set1_epi32(pair);
        for (int v = 0; v < MV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xv[v], b);
      }
    }
  }
  for (int r = 0; r < NB; r++)
    for (int v = 0; v < MV; v++) _mm512_store_ps(st + r * ld + v * W, acc[r][v]);
}

// pair_outer_block over weight rows o0 .. o1 (even) for the chunk of MV vectors of x's rows at m: blocks of
// OUTER_NB[MV] rows, then of 4 and 2; each block's T tail rows (tx, their rows of y at ty) after it.
template <int MV, int T = 0>
void pair_outer_chunk(const uint32_t *xt, long ld, const bf16 *w, long in, long m, long o0, long o1, float *st,
                      const bf16 *tx = nullptr, bf16 *ty = nullptr, long out = 0) {
  long o = o0;
  auto blocks = [&](auto NB) {
    for (; o + NB <= o1; o += NB) {
      const bf16 *wo = w + o * in;
      pair_outer_block<MV, decltype(NB)::value>(xt + m, ld, wo, in, wo + NB * in, st + (o - o0) * ld + m);
      if constexpr (T > 0) pair_tail_rows<T, NB % 4 == 0 && T <= 4 ? 4 : 2>(tx, ty + o, out, wo, in, NB);
    }
  };
  blocks(std::integral_constant<int, OUTER_NB[MV]>());
  blocks(std::integral_constant<int, 4>());
  blocks(std::integral_constant<int, 2>());
}

// y[:, o0 : o1] = x @ w[o0 : o1].T for one expert, from xt (pair_outer_pack's), through st (the calling thread's
// staging buffer of (o1 - o0) * outer_ld(rows) floats) to y as outer_store does, each output rounded once.
void pair_outer_forward(const uint32_t *xt, const bf16 *x, const bf16 *w, bf16 *y, long rows, long out, long in,
                        long o0, long o1, float *st) {
  const long tail = pair_outer_tail(rows), whole = rows - tail, ld = outer_ld(whole);
  for (long m = 0; m < ld; m += OUTER_MV * W)
    with_vecs<OUTER_MV>(int((ld - m) / W), [&](auto MV) {
      if (m > 0 || tail == 0) return pair_outer_chunk<decltype(MV)::value>(xt, ld, w, in, m, o0, o1, st);
      with_vecs<PAIR_OUTER_TAIL>(int(tail), [&](auto T) {  // the first chunk's blocks take the tail's rows too
        pair_outer_chunk<decltype(MV)::value, decltype(T)::value>(xt, ld, w, in, m, o0, o1, st, x + whole * in,
                                                                  y + whole * out, out);
      });
    });
  outer_store(st, y, whole, out, ld, o0, o1);
}
#else  // builds without the pair dot product never take this path (Task::pair_outer)
constexpr long PAIR_OUTER_MIN_ROWS = 0, PAIR_OUTER_MAX_IN = 0;
void pair_outer_pack(const bf16 *, uint32_t *, long, long) {}
inline long pair_outer_tail(long) { return 0; }
void pair_outer_forward(const uint32_t *, const bf16 *, const bf16 *, bf16 *, long, long, long, long, long, float *) {}
#endif

#ifdef __AMX_BF16__
// The bfloat16 forward on AMX tiles (the AMX build). With 5-64 rows per expert the native dot products above are
// bound by arithmetic, and torch's GEMMs (oneDNN on the same tiles) re-lay each expert's weight out on every call:
// here the weight is the tiles' A operand as it lies in memory, 16 rows of it at a time (y.T = w x.T), so it is read
// once and never copied, and x, the small operand, is laid out once per call as B: pairs of its columns side by side
// for 16 of its rows (the tiles' VNNI layout), zeros past its last row. Each of 4 accumulator tiles holds 16 weight
// rows' outputs for 16 rows of x; a pass over the weight rows serves up to 64 rows of x (docs/performance.md).
// Weights wider out than in take 2 x 2 blocks instead (tiles_forward_2x2).

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile 16 rows of 64 bytes: accumulators 0-3, A operands 4-5, B operands 6-7 (the forward: 4, then 5 and 6).
void tiles_configure() {
  TileConfig c{};
  c.palette = 1;
  for (int t = 0; t < 8; t++) c.colsb[t] = 64, c.rows[t] = TILE_ROWS;
  _tile_loadconfig(&c);
}
void tiles_release() { _tile_release(); }

// Zero the four accumulator tiles.
#define TILES_ZERO() \
  do {               \
    _tile_zero(0);   \
    _tile_zero(1);   \
    _tile_zero(2);   \
    _tile_zero(3);   \
  } while (0)

// x (rows, in) as B tiles: for each block m of 16 rows, element (k / 2, j) of 32 bits holds x[16 m + j, k : k + 2].
void tiles_pack(const bf16 *x, uint32_t *packed, long rows, long in) {
  const long pairs = in / 2;
  const uint32_t *x32 = reinterpret_cast<const uint32_t *>(x);
  for (long m = 0; m < (rows + TILE_ROWS - 1) / TILE_ROWS; m++)
    for (long kp = 0; kp < pairs; kp++) {
      uint32_t *dst = packed + (m * pairs + kp) * TILE_ROWS;
      for (long j = 0, r = m * TILE_ROWS; j < TILE_ROWS; j++, r++) dst[j] = r < rows ? x32[r * pairs + kp] : 0u;
    }
}

// Accumulator tile t's 16 x 16 float32 into saved[t].
typedef float Saved[TILE_ROWS * TILE_ROWS];
void tiles_save(int t, Saved *saved) {
  switch (t) {  // tile numbers are immediates
    case 0: _tile_stored(0, saved[0], 64); break;
    case 1: _tile_stored(1, saved[1], 64); break;
    case 2: _tile_stored(2, saved[2], 64); break;
    default: _tile_stored(3, saved[3], 64); break;
  }
}

// Saved accumulators (weight row r, x row j) into y[j, r] as bfloat16 for j < valid: `lo` for outputs 0-15 and, if
// given, `hi` for 16-31, each row of y then one whole 64-byte line, streamed (no read of the line it overwrites).
void tiles_store_lines(const float *lo, const float *hi, bf16 *y, long out, long valid) {
  __m512 a[TILE_ROWS], b[TILE_ROWS];
  for (int i = 0; i < TILE_ROWS; i++) a[i] = _mm512_load_ps(lo + i * TILE_ROWS);
  transpose16(a);
  if (hi == nullptr) {
    for (long j = 0; j < valid; j++) _mm256_storeu_si256(reinterpret_cast<__m256i *>(y + j * out), to_bf16(a[j]));
    return;
  }
  for (int i = 0; i < TILE_ROWS; i++) b[i] = _mm512_load_ps(hi + i * TILE_ROWS);
  transpose16(b);
  for (long j = 0; j < valid; j++) {
    const __m512i line = _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16(a[j])), to_bf16(b[j]), 1);
    bf16 *dst = y + j * out;
    if ((reinterpret_cast<uintptr_t>(dst) & 63) == 0) _mm512_stream_si512(reinterpret_cast<__m512i *>(dst), line);
    else _mm512_storeu_si512(dst, line);
  }
}

// The weight rows after the ones a pass of tiles_forward_2x2 reads, into L2 a few lines at each of the pass's `steps`
// steps: the tiles' loads of 16 strided rows at once leave the hardware prefetcher behind (without it that forward
// ran 1.1-1.2x slower at 64-192 rows per expert; tiles_forward, whose rows are 4x longer, ran 1.03-1.15x slower with
// it: measured).
struct Ahead {
  const char *at, *end;
  long per;  // lines per step
  Ahead(const bf16 *begin, const bf16 *stop, long steps)
      : at(reinterpret_cast<const char *>(begin)), end(reinterpret_cast<const char *>(stop)),
        per(end > at ? ((end - at) / 64 + steps - 1) / steps : 0) {}
  void step() {
    for (long l = 0; l < per && at < end; l++, at += 64) _mm_prefetch(at, _MM_HINT_T1);
  }
};

// y[:, o0 : o1] = x @ w[o0 : o1].T for one expert, from x packed by tiles_pack; tiles configured by the caller.
void tiles_forward(const uint32_t *packed, const bf16 *w, bf16 *y, long rows, long out, long in, long o0, long o1) {
  const long blocks = (rows + TILE_ROWS - 1) / TILE_ROWS, block = in / 2 * TILE_ROWS;  // uint32s per packed block
  alignas(64) float acc[TILE_PASS][TILE_ROWS * TILE_ROWS];
  for (long o = o0; o < o1; o += TILE_ROWS) {
    const bf16 *wo = w + o * in;
    for (long m0 = 0; m0 < blocks; m0 += TILE_PASS) {
      const long n = blocks - m0 < TILE_PASS ? blocks - m0 : TILE_PASS;
      const uint32_t *p = packed + m0 * block;
      TILES_ZERO();
      for (long k = 0; k < in; k += TILE_K) {
        const uint32_t *pk = p + k / 2 * TILE_ROWS;
        _tile_loadd(4, wo + k, in * 2);
        _tile_loadd(5, pk, 64);
        _tile_dpbf16ps(0, 4, 5);
        if (n > 1) {
          _tile_loadd(6, pk + block, 64);
          _tile_dpbf16ps(1, 4, 6);
        }
        if (n > 2) {
          _tile_loadd(5, pk + 2 * block, 64);
          _tile_dpbf16ps(2, 4, 5);
        }
        if (n > 3) {
          _tile_loadd(6, pk + 3 * block, 64);
          _tile_dpbf16ps(3, 4, 6);
        }
      }
      _tile_stored(0, acc[0], 64);
      if (n > 1) _tile_stored(1, acc[1], 64);
      if (n > 2) _tile_stored(2, acc[2], 64);
      if (n > 3) _tile_stored(3, acc[3], 64);
      for (long m = 0; m < n; m++) {
        const long first = (m0 + m) * TILE_ROWS, valid = block_rows(rows, first);
        tiles_store_lines(acc[m], nullptr, y + first * out + o, out, valid);
      }
    }
  }
}

// tiles_forward for weights wider out than in (an FFN's first linear): blocks of 2 x 2 tiles, 32 weight rows by 32
// rows of x, each loaded operand serving two products and each row of y written a whole line at a time. tiles_forward
// writes half lines a row of y apart, each line's halves in two passes over the weight: at 2,048 x 512 that cost it a
// third of its time at 128 rows per expert. Where in >= out its single weight tile per pass pays instead: the weight's
// strided rows are read half as often (512 x 2,048 at 64 rows: 9.3-9.4 ms against 10.6, 64 experts;
// docs/performance.md).
void tiles_forward_2x2(const uint32_t *packed, const bf16 *w, bf16 *y, long rows, long out, long in, long o0,
                       long o1) {
  const long blocks = (rows + TILE_ROWS - 1) / TILE_ROWS, block = in / 2 * TILE_ROWS;  // uint32s per packed block
  alignas(64) Saved saved[4];
  for (long o = o0; o < o1; o += 2 * TILE_ROWS) {
    const bool two_o = o + TILE_ROWS < o1;
    const bf16 *wo = w + o * in;
    Ahead ahead(wo + 2 * TILE_ROWS * in, w + (o + 4 * TILE_ROWS < out ? o + 4 * TILE_ROWS : out) * in,
                (blocks + 1) / 2 * (in / TILE_K));
    for (long m = 0; m < blocks; m += 2) {
      const bool two_m = m + 1 < blocks;
      const uint32_t *p = packed + m * block;
      TILES_ZERO();
      for (long k = 0; k < in; k += TILE_K) {  // accumulators: 0 (o, m), 1 (o, m + 1), 2 (o + 16, m), 3 (o + 16, m + 1)
        const uint32_t *pk = p + k / 2 * TILE_ROWS;
        ahead.step();
        _tile_loadd(4, wo + k, in * 2);
        _tile_loadd(6, pk, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (two_m) { _tile_loadd(7, pk + block, 64); _tile_dpbf16ps(1, 4, 7); }
        if (two_o) { _tile_loadd(5, wo + TILE_ROWS * in + k, in * 2); _tile_dpbf16ps(2, 5, 6); }
        if (two_o && two_m) _tile_dpbf16ps(3, 5, 7);
      }
      for (int b = 0; b < (two_m ? 2 : 1); b++) {
        tiles_save(b, saved);
        if (two_o) tiles_save(2 + b, saved);
        const long first = (m + b) * TILE_ROWS, valid = block_rows(rows, first);
        tiles_store_lines(saved[b], two_o ? saved[2 + b] : nullptr, y + first * out + o, out, valid);
      }
    }
  }
}

// The bfloat16 weight gradient on tiles, gw = g.T x, for experts with more than TILE_GRAD_MIN_ROWS rows: A holds
// pairs of g's rows transposed to one row per output, B pairs of x's rows side by side, both laid out once per call
// with zeros past the expert's last row; the accumulators go to gw row-major, rounded as the other builds round.
// (The input gradient's tiles, below, interleave the weight in pieces that stay in cache: laid out whole before the
// products it ran 1.1-1.9x torch's path at 1-128 rows; docs/performance.md.)

// Lane 2 j of the result: lane j of the first operand, lane 2 j + 1: lane j of the second (vpermt2w's indices).
alignas(64) const uint16_t PAIR_LANES[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                              8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};

// 16 columns of rows r0 and r1 side by side: 32-bit element j holds (r0[j], r1[j]); a row not present reads as zeros.
inline __m512i pairs(const bf16 *r0, const bf16 *r1, bool has0, bool has1) {
  __m512i a = _mm512_maskz_loadu_epi16(has0 ? 0xFFFF : 0, r0), b = _mm512_maskz_loadu_epi16(has1 ? 0xFFFF : 0, r1);
  return _mm512_permutex2var_epi16(a, _mm512_load_si512(PAIR_LANES), b);
}

// The weight gradient's operands: x (rows, in) as B tiles, tile (k, n) = 16 pairs of x's rows from 32 k side by
// side over columns 16 n.., at (n * kp + 16 k) * 16 uint32s (kp: row_pairs); and
// g (rows, out) as A tiles, tile (o, k) = for each of 16 outputs its 16 pairs of g's rows from 32 k, at
// (o * kp + 16 k) * 16 uint32s (g's pairs, transposed through a buffer by gathers).
void tiles_pack_pairs(const bf16 *x, uint32_t *packed, long rows, long in) {
  const long kp = row_pairs(rows);
  for (long n = 0; n < in / TILE_ROWS; n++)
    for (long p = 0; p < kp; p++)
      _mm512_store_si512(packed + (n * kp + p) * TILE_ROWS,
                         pairs(x + 2 * p * in + n * TILE_ROWS, x + (2 * p + 1) * in + n * TILE_ROWS, 2 * p < rows,
                               2 * p + 1 < rows));
}
void tiles_pack_transposed(const bf16 *g, uint32_t *packed, long rows, long out) {
  const long kp = row_pairs(rows);
  const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(TILE_ROWS));
  alignas(64) uint32_t block[TILE_ROWS * TILE_ROWS];  // 16 pairs (rows) by 16 outputs (columns)
  for (long o = 0; o < out / TILE_ROWS; o++)
    for (long p0 = 0; p0 < kp; p0 += TILE_ROWS) {
      for (long j = 0, p = p0; j < TILE_ROWS; j++, p++)
        _mm512_store_si512(block + j * TILE_ROWS, pairs(g + 2 * p * out + o * TILE_ROWS,
                                                        g + (2 * p + 1) * out + o * TILE_ROWS, 2 * p < rows,
                                                        2 * p + 1 < rows));
      for (long r = 0; r < TILE_ROWS; r++)
        _mm512_store_si512(packed + (o * kp + p0 + r) * TILE_ROWS,
                           _mm512_i32gather_epi32(column, reinterpret_cast<const int *>(block + r), 4));
    }
}

// Rows [0, valid) of `count` saved tiles side by side (16 columns each) into dst (row stride ld) as bfloat16: each
// row's columns written in order, so that streamed stores fill whole lines (tile after tile, 16 rows apart, left
// partial lines that the write-combining buffers flushed half-written: 4-6x slower, measured).
void tiles_rows(const Saved *saved, int count, bf16 *dst, long ld, long valid, bool stream) {
  for (long j = 0; j < valid; j++)
    for (int c = 0; c < count; c++) store(dst + j * ld + c * TILE_ROWS, load(saved[c] + j * TILE_ROWS), stream);
}

// gw[o0 : o1] = g[:, o0 : o1].T @ x for one expert, from packed (tiles_pack_transposed's g, then
// tiles_pack_pairs' x); written with non-temporal stores, as weight_grad_block's. Blocks of 2 x 2 tiles (2 of 16
// outputs by 2 of 16 inputs): each loaded operand serves two products.
void tiles_weight_grad(const uint32_t *packed, bf16 *gw, long rows, long out, long in, long o0, long o1) {
  const long kp = row_pairs(rows), kb = kp / TILE_ROWS, nb = in / TILE_ROWS, step = kp * TILE_ROWS;
  const uint32_t *ga = packed, *xb = packed + out * kp;
  alignas(64) Saved saved[4];
  for (long o = o0 / TILE_ROWS; o < o1 / TILE_ROWS; o += 2) {
    const bool two_o = o + 1 < o1 / TILE_ROWS;
    for (long n = 0; n < nb; n += 2) {
      const bool two_n = n + 1 < nb;
      TILES_ZERO();
      for (long k = 0; k < kb; k++) {
        const uint32_t *a = ga + (o * kp + k * TILE_ROWS) * TILE_ROWS, *b = xb + (n * kp + k * TILE_ROWS) * TILE_ROWS;
        _tile_loadd(4, a, 64);
        _tile_loadd(6, b, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (two_n) { _tile_loadd(7, b + step, 64); _tile_dpbf16ps(1, 4, 7); }
        if (two_o) { _tile_loadd(5, a + step, 64); _tile_dpbf16ps(2, 5, 6); }
        if (two_o && two_n) _tile_dpbf16ps(3, 5, 7);
      }
      const int count = two_n ? 2 : 1;
      for (int h = 0; h < (two_o ? 2 : 1); h++) {  // accumulators 2 h and 2 h + 1: output block o + h
        for (int c = 0; c < count; c++) tiles_save(2 * h + c, saved);
        tiles_rows(saved + 2 * h, count, gw + (o + h) * TILE_ROWS * in + n * TILE_ROWS, in, TILE_ROWS, true);
      }
    }
  }
}

// The bfloat16 input gradient on tiles, gx = g w: A holds g's rows as they are (tiles_pack_rows: 16 rows by 32
// outputs, zeros past the expert's last row and past out), B pairs of the weight's rows side by side, interleaved
// from the weight in cache for each step of 32 of its rows across 256 columns (TILE_IG_COLS), and the
// accumulators of every 16 x 16 block of gx wait in a buffer in cache between steps. The weight is read once per 64
// rows of g, row after row in runs of 256 columns. Interleaving two rows' 32 columns within 128-bit lanes
// (vpunpck*wd) gives B tiles whose 16 columns are 0-3, 8-11, 16-19, 24-27 (lo) and 4-7, 12-15, 20-23, 28-31 (hi) of
// the 32: the accumulators keep that order, and tiles_columns puts it back as gx is written.
constexpr int TILE_IG_BLOCKS = 4;   // blocks of 16 rows of g per pass over the weight (A tiles 0-3)
constexpr long TILE_IG_AHEAD = 128; // weight rows prefetched ahead
typedef uint32_t TileOperand[TILE_ROWS * TILE_ROWS];  // one B tile: 16 rows of 64 bytes

// g (rows, out) as A tiles: tile (m, s) = rows 16 m.. by outputs 32 s.., at (m * steps + s) * 256 uint32s.
void tiles_pack_rows(const bf16 *g, uint32_t *packed, long rows, long out) {
  const long steps = tile_steps(out);
  for (long m = 0; m < (rows + TILE_ROWS - 1) / TILE_ROWS; m++)
    for (long s = 0; s < steps; s++) {
      const long valid = out - s * TILE_K < TILE_K ? out - s * TILE_K : TILE_K;
      const __mmask32 columns = valid == TILE_K ? ~__mmask32(0) : (__mmask32(1) << valid) - 1;
      for (long j = 0, r = m * TILE_ROWS; j < TILE_ROWS; j++, r++)
        _mm512_store_si512(packed + ((m * steps + s) * TILE_ROWS + j) * TILE_ROWS,
                           _mm512_maskz_loadu_epi16(r < rows ? columns : 0, g + r * out + s * TILE_K));
    }
}

// Weight rows o.. (pairs o + 2 p, o + 2 p + 1 for p < 16; rows past out read as zeros), columns i..i + 32 groups, as
// B tiles: b[2 q] and b[2 q + 1] the lo and hi tiles of group q. Prefetches the rows TILE_IG_AHEAD further on.
void tiles_interleave(const bf16 *w, TileOperand *b, long out, long in, long o, long i, long groups) {
  for (long p = 0; p < TILE_ROWS; p++) {
    const long r = o + 2 * p;
    const bf16 *r0 = w + r * in + i, *r1 = r0 + in;
    for (long line = 0; line < groups * TILE_K * 2; line += 64) {  // into L2: 1.2x faster than into L1, measured
      _mm_prefetch(reinterpret_cast<const char *>(r0 + TILE_IG_AHEAD * in) + line, _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char *>(r1 + TILE_IG_AHEAD * in) + line, _MM_HINT_T1);
    }
    const __mmask32 has0 = r < out ? ~__mmask32(0) : 0, has1 = r + 1 < out ? ~__mmask32(0) : 0;
    for (long q = 0; q < groups; q++) {
      const __m512i a = _mm512_maskz_loadu_epi16(has0, r0 + q * TILE_K);
      const __m512i c = _mm512_maskz_loadu_epi16(has1, r1 + q * TILE_K);
      _mm512_store_si512(b[2 * q] + p * TILE_ROWS, _mm512_unpacklo_epi16(a, c));
      _mm512_store_si512(b[2 * q + 1] + p * TILE_ROWS, _mm512_unpackhi_epi16(a, c));
    }
  }
}

// Row j of a lo and a hi accumulator tile (tiles_interleave's column order) as 32 columns of bfloat16 at dst, one
// 64-byte line, streamed where it is a whole line in memory (`stream`).
inline void tiles_columns(const float *lo, const float *hi, bf16 *dst, bool stream) {
  alignas(64) static const int first[16] = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23};
  alignas(64) static const int second[16] = {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
  const __m512 l = _mm512_load_ps(lo), h = _mm512_load_ps(hi);
  const __m512i line =
      _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16(_mm512_permutex2var_ps(l, _mm512_load_si512(first), h))),
                         to_bf16(_mm512_permutex2var_ps(l, _mm512_load_si512(second), h)), 1);
  if (stream && (reinterpret_cast<uintptr_t>(dst) & 63) == 0)
    _mm512_stream_si512(reinterpret_cast<__m512i *>(dst), line);
  else _mm512_storeu_si512(dst, line);
}

// One accumulator tile's step: zeroed at the first step, else loaded from acc; += A x B (tile 4); stored back.
#define TILES_IG_STEP(A, C, acc, first) \
  do {                                  \
    if (first) _tile_zero(C);           \
    else _tile_loadd(C, acc, 64);       \
    _tile_dpbf16ps(C, A, 4);            \
    _tile_stored(C, acc, 64);           \
  } while (0)

// gx[:, i0 : i0 + cols] = g @ w[:, i0 : i0 + cols] for one expert, from packed (tiles_pack_rows' g); cols a multiple of
// 32, taken TILE_IG_COLS at a time.
void tiles_input_grad(const uint32_t *packed, const bf16 *w, bf16 *gx, long rows, long out, long in, long i0,
                      long cols) {
  const long steps = tile_steps(out), blocks = (rows + TILE_ROWS - 1) / TILE_ROWS;
  const long next = steps * TILE_ROWS * TILE_ROWS;  // uint32s from one block of rows' A tile to the next's
  alignas(64) TileOperand b[TILE_IG_COLS / TILE_ROWS];
  alignas(64) Saved acc[TILE_IG_BLOCKS][TILE_IG_COLS / TILE_ROWS];
  for (long i = i0; i < i0 + cols; i += TILE_IG_COLS) {
    const long groups = (i0 + cols - i < TILE_IG_COLS ? i0 + cols - i : TILE_IG_COLS) / TILE_K, tiles = 2 * groups;
    for (long m0 = 0; m0 < blocks; m0 += TILE_IG_BLOCKS) {
      const long n = blocks - m0 < TILE_IG_BLOCKS ? blocks - m0 : TILE_IG_BLOCKS;
      for (long s = 0; s < steps; s++) {
        tiles_interleave(w, b, out, in, s * TILE_K, i, groups);
        const uint32_t *a = packed + (m0 * steps + s) * TILE_ROWS * TILE_ROWS;
        _tile_loadd(0, a, 64);
        if (n > 1) _tile_loadd(1, a + next, 64);
        if (n > 2) _tile_loadd(2, a + 2 * next, 64);
        if (n > 3) _tile_loadd(3, a + 3 * next, 64);
        for (long c = 0; c < tiles; c++) {
          _tile_loadd(4, b[c], 64);
          TILES_IG_STEP(0, 5, acc[0][c], s == 0);
          if (n > 1) TILES_IG_STEP(1, 6, acc[1][c], s == 0);
          if (n > 2) TILES_IG_STEP(2, 5, acc[2][c], s == 0);
          if (n > 3) TILES_IG_STEP(3, 6, acc[3][c], s == 0);
        }
      }
      for (long m = 0; m < n; m++) {
        const long first = (m0 + m) * TILE_ROWS, valid = block_rows(rows, first);
        for (long j = 0; j < valid; j++)
          for (long q = 0; q < groups; q++)
            tiles_columns(acc[m][2 * q] + j * TILE_ROWS, acc[m][2 * q + 1] + j * TILE_ROWS,
                          gx + (first + j) * in + i + q * TILE_K, false);
      }
    }
  }
}

// tiles_input_grad for an expert with at least TILE_IG_BLOCK_ROWS rows: blocks of 2 x 2 tiles (32 rows of g by a
// group's lo and hi tiles), each accumulator held in its tile over every step and written once. For each piece of
// TILE_IG_COLS columns the weight is interleaved once, row after row, into b (tiles_input_grad_b uint32s; step s,
// group q at b[2 (s * groups + q)]), then served to every block of rows from cache. Where out <= in: 0.92-0.96x
// torch's path at 32-128 rows per expert (tiles_input_grad there: 1.04-1.65x); where out > in 1.2-1.3x, so the limits
// leave it to torch there (bench_skinny). What it costs is the interleaving: with one piece reused for every expert
// the products alone ran 2-3x faster (docs/performance.md).
void tiles_input_grad_blocks(const uint32_t *packed, const bf16 *w, bf16 *gx, long rows, long out, long in, long i0,
                             long cols, uint32_t *buffer) {
  TileOperand *b = reinterpret_cast<TileOperand *>(buffer);
  const long steps = tile_steps(out), blocks = (rows + TILE_ROWS - 1) / TILE_ROWS;
  const long next = steps * TILE_ROWS * TILE_ROWS;  // uint32s from one block of rows' A tiles to the next's
  alignas(64) Saved saved[4];
  for (long i = i0; i < i0 + cols; i += TILE_IG_COLS) {
    const long groups = (i0 + cols - i < TILE_IG_COLS ? i0 + cols - i : TILE_IG_COLS) / TILE_K;
    for (long s = 0; s < steps; s++) tiles_interleave(w, b + 2 * s * groups, out, in, s * TILE_K, i, groups);
    for (long q = 0; q < groups; q++)
      for (long m = 0; m < blocks; m += 2) {
        const bool two_m = m + 1 < blocks;
        const uint32_t *a = packed + m * next;
        TILES_ZERO();
        for (long s = 0; s < steps; s++) {  // accumulators: 0 (m, lo), 1 (m, hi), 2 (m + 1, lo), 3 (m + 1, hi)
          const TileOperand *bs = b + 2 * (s * groups + q);
          _tile_loadd(4, a + s * TILE_ROWS * TILE_ROWS, 64);
          _tile_loadd(6, bs[0], 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_loadd(7, bs[1], 64);
          _tile_dpbf16ps(1, 4, 7);
          if (two_m) {
            _tile_loadd(5, a + next + s * TILE_ROWS * TILE_ROWS, 64);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        for (int h = 0; h < (two_m ? 2 : 1); h++) {
          tiles_save(2 * h, saved);
          tiles_save(2 * h + 1, saved);
          const long first = (m + h) * TILE_ROWS, valid = block_rows(rows, first);
          for (long j = 0; j < valid; j++)
            tiles_columns(saved[2 * h] + j * TILE_ROWS, saved[2 * h + 1] + j * TILE_ROWS,
                          gx + (first + j) * in + i + q * TILE_K, true);
        }
      }
  }
}
constexpr bool TILES = true;
#else  // other builds never take the tiles' path (TILES): these only let work() compile
constexpr bool TILES = false;
void tiles_configure() {}
void tiles_release() {}
void tiles_pack(const bf16 *, uint32_t *, long, long) {}
void tiles_forward(const uint32_t *, const bf16 *, bf16 *, long, long, long, long, long) {}
void tiles_forward_2x2(const uint32_t *, const bf16 *, bf16 *, long, long, long, long, long) {}
void tiles_pack_pairs(const bf16 *, uint32_t *, long, long) {}
void tiles_pack_transposed(const bf16 *, uint32_t *, long, long) {}
void tiles_weight_grad(const uint32_t *, bf16 *, long, long, long, long, long) {}
void tiles_pack_rows(const bf16 *, uint32_t *, long, long) {}
void tiles_input_grad_blocks(const uint32_t *, const bf16 *, bf16 *, long, long, long, long, long, uint32_t *) {}
void tiles_input_grad(const uint32_t *, const bf16 *, bf16 *, long, long, long, long, long) {}
#endif

// Rows of a bfloat16 operand laid out in pairs for the pair dot product (vdpbf16ps): uint32 k of pair q holds rows 2q
// and 2q + 1's elements k (a zero for the second where rows is odd).
inline long pair_rows(long rows) { return (rows + 1) / 2; }
void pairs_pack(const bf16 *a, uint32_t *p, long rows, long cols) {
  for (long q = 0; q < pair_rows(rows); q++) {
    const bf16 *r0 = a + 2 * q * cols, *r1 = 2 * q + 1 < rows ? r0 + cols : nullptr;
    uint32_t *pq = p + q * cols;
    if (r1 == nullptr) {
      for (long k = 0; k < cols; k++) pq[k] = r0[k];
    } else {
      for (long k = 0; k < cols; k++) pq[k] = uint32_t(r0[k]) | uint32_t(r1[k]) << 16;
    }
  }
}

#if defined(__AVX512BF16__) && !defined(__AMX_BF16__)
// The bfloat16 weight gradient on AVX-512 without tiles: gw[o + r, i0 : i0 + W C] for r < 4 from g and x laid out in
// pairs of rows (pairs_pack), each vdpbf16ps adding two rows' products, where widening both to float32 took twice
// the arithmetic instructions and the widening besides (0.52-0.74x its time at 8-128 rows on the AMD EPYC).
// Streamed out, as weight_grad_block.
template <int C>
void pairs_weight_grad_block(const uint32_t *gp, const uint32_t *xp, bf16 *gw, long pairs, long out, long in, long o,
                             long i0) {
  __m512 acc[4][C];
  for (int r = 0; r < 4; r++)
    for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
  for (long q = 0; q < pairs; q++) {
    __m512bh xv[C];
    for (int c = 0; c < C; c++) xv[c] = (__m512bh)_mm512_loadu_si512(xp + q * in + i0 + W * c);
    for (int r = 0; r < 4; r++) {
      __m512bh gv = (__m512bh)_mm512_set1_epi32(int(gp[q * out + o + r]));
      for (int c = 0; c < C; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], gv, xv[c]);
    }
  }
  for (int r = 0; r < 4; r++)
    for (int c = 0; c < C; c++) store(gw + (o + r) * in + i0 + W * c, acc[r][c], true);
}
#else
template <int C>
void pairs_weight_grad_block(const uint32_t *, const uint32_t *, bf16 *, long, long, long, long, long) {}
#endif

enum Op { FORWARD = 0, INPUT_GRAD = 1, WEIGHT_GRAD = 2 };
// The forward hands out work in units of about this much weight: each unit one sequential stream, with fewer
// hand-overs and prefetcher restarts than units of OUT_ROWS rows. Measured on three machines: AVX2 (1.3-2.1x faster
// at 1-3 rows per expert), AMX (float32 E 128-256 / 1,024 tokens, 4-10 rows per expert: 0.79-0.82x the time) and
// AVX-512 on AMD EPYC (64 experts, 1-32 rows: float32 0.90-0.96x, bfloat16 0.60x at 8-16 rows where out > in).
constexpr long FORWARD_UNIT_BYTES = 1 << 20;
constexpr long OUT_ROWS = 16;  // weight rows per unit of the forward (or a multiple, above); WG_UNIT_ROWS's a multiple
constexpr long IN_COLS = STREAM_INPUT_GRAD ? STREAM_COLS : RUN_COLS;  // input columns per unit (input gradient)

struct Task {
  int op;
  long n;  // experts
  const long *rows;
  const void *const *a;
  const void *const *b;
  void *const *c;
  long out, in;
  long unit, per_expert;  // weight rows (forward, weight gradient) or input columns per unit; units per expert
  bool tiles;              // on AMX tiles (bfloat16, the AMX build), each expert as on_tiles says
  bool outer;              // float32 forward and weight gradient on packed operands (AVX-512), from OUTER_MIN_ROWS rows
  bool pairs;              // the bfloat16 weight gradient on operands in pairs of rows (PAIRS)
  bool pair_outer;         // the bfloat16 forward as outer products on pairs (with outer: its packing and staging)
};

// The calling thread's buffers (below): the tiles' or the outer products' packed operands, laid out by the calling
// thread for every thread's units; tiles_input_grad_blocks' interleaved weight (or, in float32, input_grad_packed's
// strip), and outer_forward's staging, each thread's own.
enum Scratch { SCRATCH_PACKED, SCRATCH_INTERLEAVED, SCRATCH_STAGING, SCRATCHES };
uint32_t *scratch(long n, Scratch which);

// A unit's weight gradient, rows o0 .. o1 of gw, as the blocks block(C, o, i0) computes: 4 rows by C vectors of
// columns from column i0, C = WG_VECS, then 1 for the columns left.
template <typename F>
void weight_grad_blocks(long o0, long o1, long in, F block) {
  for (long o = o0; o < o1; o += 4) {
    long i0 = 0;
    for (; i0 + WG_VECS * W <= in; i0 += WG_VECS * W) block(std::integral_constant<int, WG_VECS>(), o, i0);
    for (; i0 < in; i0 += W) block(std::integral_constant<int, 1>(), o, i0);
  }
}

// One unit: t.unit output rows (forward, weight gradient) or input columns (input gradient) of one expert.
template <typename X, typename T>
void run_unit(const Task &t, long u) {
  long e = u / t.per_expert, j = u % t.per_expert, rows = t.rows[e], out = t.out, in = t.in;
  if (t.op == FORWARD) {  // a = x (rows, in), b = w (out, in), c = y (rows, out)
    const X *x = static_cast<const X *>(t.a[e]);
    const T *w = static_cast<const T *>(t.b[e]);
    X *y = static_cast<X *>(t.c[e]);
    for (long o = j * t.unit; o < (j + 1) * t.unit && o < out; o += 4)
      for (long k = 0; k < rows; k += KB)
        with_rows(int(rows - k < KB ? rows - k : KB), [&](auto K) {
          forward_any<X, T, decltype(K)::value>(x + k * in, w, y + k * out, out, in, o);
        });
  } else if (t.op == INPUT_GRAD) {  // a = g (rows, out), b = w (out, in), c = gx (rows, in)
    const X *g = static_cast<const X *>(t.a[e]);
    const T *w = static_cast<const T *>(t.b[e]);
    X *gx = static_cast<X *>(t.c[e]);
    long i0 = j * t.unit, cols = in - i0 < t.unit ? in - i0 : t.unit;
    float *panel = nullptr;  // the packed strip's buffer: float32 from PANEL_MIN_ROWS rows on AVX-512
    if constexpr (OUTER && std::is_same_v<X, float> && std::is_same_v<T, float>) {
      if (rows >= PANEL_MIN_ROWS) panel = reinterpret_cast<float *>(scratch(out * IN_VECS * W, SCRATCH_INTERLEAVED));
      if (panel != nullptr) return input_grad_packed(g, w, gx, rows, out, in, i0, cols, panel);
    }
    if constexpr (STREAM_INPUT_GRAD) input_grad_stream<X, T>(g, w, gx, rows, out, in, i0, cols);
    else input_grad_runs<X, T>(g, w, gx, rows, out, in, i0, cols);
  } else {  // a = g (rows, out), b = x (rows, in), c = gw (out, in)
    const X *g = static_cast<const X *>(t.a[e]);
    const X *x = static_cast<const X *>(t.b[e]);
    T *gw = static_cast<T *>(t.c[e]);
    const long o1 = (j + 1) * t.unit < out ? (j + 1) * t.unit : out;
    weight_grad_blocks(j * t.unit, o1, in, [&](auto C, long o, long i0) {
      weight_grad_block<X, T, decltype(C)::value>(g, x, gw, rows, out, in, o, i0);
    });
  }
}

// Whether an expert with this many rows runs on the tiles (a call with t.tiles).
bool on_tiles(const Task &t, long rows) {
  return rows > (t.op == FORWARD ? 0 : t.op == INPUT_GRAD ? TILE_IG_MIN_ROWS : TILE_GRAD_MIN_ROWS);
}

// uint32s of one expert's operands laid out for the tiles: x (forward), or g and x (weight gradient).
long tiles_packed(const Task &t, long rows) {
  if (!on_tiles(t, rows)) return 0;
  if (t.op == INPUT_GRAD) return ceil_to(rows, TILE_ROWS) * tile_steps(t.out) * TILE_K / 2;
  return t.op == FORWARD ? ceil_to(rows, TILE_ROWS) * (t.in / 2) : row_pairs(rows) * (t.out + t.in);
}

void tiles_pack_expert(const Task &t, long e, uint32_t *packed) {
  const bf16 *a = static_cast<const bf16 *>(t.a[e]);
  if (!on_tiles(t, t.rows[e])) return;
  if (t.op == FORWARD) return tiles_pack(a, packed, t.rows[e], t.in);
  if (t.op == INPUT_GRAD) return tiles_pack_rows(a, packed, t.rows[e], t.out);
  tiles_pack_transposed(a, packed, t.rows[e], t.out);
  tiles_pack_pairs(static_cast<const bf16 *>(t.b[e]), packed + row_pairs(t.rows[e]) * t.out, t.rows[e], t.in);
}

// One unit of a call on AMX tiles: the unit's weight rows for every row of its expert, on the tiles or, for
// experts with few rows, by the loops above.
void tiles_unit(const Task &t, const uint32_t *packed, long u) {
  const long e = u / t.per_expert, rows = t.rows[e], o0 = u % t.per_expert * t.unit;
  const long o1 = o0 + t.unit < t.out ? o0 + t.unit : t.out;
  if (!on_tiles(t, rows)) return run_unit<bf16, bf16>(t, u);
  if (t.op == INPUT_GRAD) {  // the unit is columns o0 .. o0 + t.unit of gx: the loops' units (IN_COLS)
    const bf16 *w = static_cast<const bf16 *>(t.b[e]);
    bf16 *gx = static_cast<bf16 *>(t.c[e]);
    const long cols = t.in - o0 < t.unit ? t.in - o0 : t.unit;
    uint32_t *b = rows >= TILE_IG_BLOCK_ROWS ? scratch(tiles_input_grad_b(t.out), SCRATCH_INTERLEAVED) : nullptr;
    if (b != nullptr) return tiles_input_grad_blocks(packed, w, gx, rows, t.out, t.in, o0, cols, b);
    return tiles_input_grad(packed, w, gx, rows, t.out, t.in, o0, cols);
  }
  if (t.op == FORWARD)
    (t.in < t.out ? tiles_forward_2x2 : tiles_forward)(packed, static_cast<const bf16 *>(t.b[e]),
                                                       static_cast<bf16 *>(t.c[e]), rows, t.out, t.in, o0, o1);
  else
    tiles_weight_grad(packed, static_cast<bf16 *>(t.c[e]), rows, t.out, t.in, o0, o1);
}

// The forward's rows of x that its outer products take, laid out transposed: all but a tail's (outer_tail).
inline long outer_rows(long rows, long in) { return rows - outer_tail(rows, in); }

// Floats of one expert's operands laid out for the outer products: x transposed (forward; for pair_outer uint32 pairs
// of x's columns), or g transposed and x in strips (weight gradient); none where its rows take the loops.
long outer_packed(const Task &t, long rows) {
  if (t.pair_outer)  // x in pairs, transposed, but a tail's rows
    return rows >= PAIR_OUTER_MIN_ROWS ? t.in / 2 * outer_ld(rows - pair_outer_tail(rows)) : 0;
  const bool long_rows = t.op == FORWARD && t.in >= OUTER_WHOLE_MIN_IN;
  if (!t.outer || rows < (long_rows ? OUTER_MIN_ROWS_LONG : OUTER_MIN_ROWS)) return 0;
  // x.T but the tail's rows; or g.T and x's strips
  return t.op == FORWARD ? t.in * outer_ld(outer_rows(rows, t.in)) : t.out * outer_ld(rows) + rows * t.in;
}

// Lays out expert e's operands for the outer products at p (outer_packed's floats).
void outer_pack_expert(const Task &t, long e, float *p) {
  const long rows = t.rows[e];
  if (outer_packed(t, rows) == 0) return;
  if (t.pair_outer)
    return pair_outer_pack(static_cast<const bf16 *>(t.a[e]), reinterpret_cast<uint32_t *>(p),
                           rows - pair_outer_tail(rows), t.in);
  if (t.op == FORWARD) return outer_pack(static_cast<const float *>(t.a[e]), p, outer_rows(rows, t.in), t.in);
  outer_pack(static_cast<const float *>(t.a[e]), p, rows, t.out);
  wgrad_pack_x(static_cast<const float *>(t.b[e]), p + t.out * outer_ld(rows), rows, t.in);
}

// One unit of a float32 forward or weight gradient, or a bfloat16 forward (pair_outer), on packed operands: the unit's
// weight rows for every row of its expert, by outer_forward, pair_outer_forward or wgrad_packed from p
// (outer_pack_expert's), or by the loops for experts with few rows (or, forward, without a staging buffer).
void outer_unit(const Task &t, const float *p, float *st, long u) {
  const long e = u / t.per_expert, rows = t.rows[e], o0 = u % t.per_expert * t.unit;
  const long o1 = o0 + t.unit < t.out ? o0 + t.unit : t.out;
  if (t.pair_outer) {
    if (outer_packed(t, rows) == 0 || st == nullptr) return run_unit<bf16, bf16>(t, u);
    return pair_outer_forward(reinterpret_cast<const uint32_t *>(p), static_cast<const bf16 *>(t.a[e]),
                              static_cast<const bf16 *>(t.b[e]), static_cast<bf16 *>(t.c[e]), rows, t.out, t.in, o0,
                              o1, st);
  }
  if (outer_packed(t, rows) == 0 || t.op == FORWARD && st == nullptr) return run_unit<float, float>(t, u);
  if (t.op == FORWARD)
    return outer_forward(p, static_cast<const float *>(t.a[e]), static_cast<const float *>(t.b[e]),
                         static_cast<float *>(t.c[e]), rows, t.out, t.in, o0, o1, st);
  wgrad_packed(p, p + t.out * outer_ld(rows), static_cast<float *>(t.c[e]), rows, t.in, o0, o1);
}

// uint32s of one expert's operands in pairs of rows for the weight gradient: g's, then x's.
long pairs_packed(const Task &t, long rows) { return pair_rows(rows) * (t.out + t.in); }

void pairs_pack_expert(const Task &t, long e, uint32_t *p) {
  pairs_pack(static_cast<const bf16 *>(t.a[e]), p, t.rows[e], t.out);
  pairs_pack(static_cast<const bf16 *>(t.b[e]), p + pair_rows(t.rows[e]) * t.out, t.rows[e], t.in);
}

// One unit of the weight gradient on pairs of rows: the unit's rows of gw from p (pairs_pack_expert's).
void pairs_unit(const Task &t, const uint32_t *p, long u) {
  const long e = u / t.per_expert, q = pair_rows(t.rows[e]), o0 = u % t.per_expert * t.unit;
  const long o1 = o0 + t.unit < t.out ? o0 + t.unit : t.out;
  bf16 *gw = static_cast<bf16 *>(t.c[e]);
  weight_grad_blocks(o0, o1, t.in, [&](auto C, long o, long i0) {
    pairs_weight_grad_block<decltype(C)::value>(p, p + q * t.out, gw, q, t.out, t.in, o, i0);
  });
}

// Uninitialised, 64-byte aligned uint32s (every element is written before it is read; zeroing the tiles' operands
// would cost a pass over them).
struct Free {
  void operator()(uint32_t *p) const { free(p); }
};
typedef std::unique_ptr<uint32_t[], Free> Buffer;
Buffer buffer(long n) { return Buffer(static_cast<uint32_t *>(aligned_alloc(64, ceil_to(n * 4 + 4, 64)))); }

// Each thread's buffers, kept from call to call and grown as needed, until moeify_release frees them. A fresh one
// each call is a fresh mapping once it is large (glibc maps blocks above its threshold anew, and raises the threshold
// to at most 32 MB), and its first touch faults every page: the weight gradient's operands of 64 experts with 128
// rows each are 42 MB.
thread_local Buffer scratch_kept[SCRATCHES];
thread_local long scratch_size[SCRATCHES] = {};

// The calling thread's buffer `which` of at least n uint32s (nullptr without memory).
uint32_t *scratch(long n, Scratch which) {
  if (n > scratch_size[which]) {
    scratch_kept[which].reset();  // the old one first: never both at once
    scratch_kept[which] = buffer(n);
    scratch_size[which] = scratch_kept[which] ? n : 0;
  }
  return scratch_kept[which].get();
}

void release_scratch() {
  for (int i = 0; i < SCRATCHES; i++) {
    scratch_kept[i].reset();
    scratch_size[i] = 0;
  }
}

template <typename X, typename T>
void work(Task &t, int threads) {
  long total = t.n * t.per_expert, staging = 0;
  std::vector<long> start;      // tiles, outer, pairs: each expert's first uint32 in packed
  uint32_t *packed = nullptr;  // tiles, outer, pairs: every expert's small operands, laid out by its *_pack_expert
  if (t.tiles || t.outer || t.pairs) {
    start.assign(t.n + 1, 0);
    for (long e = 0; e < t.n; e++) {
      const long rows = t.rows[e];
      const long n = t.tiles ? tiles_packed(t, rows) : t.outer ? outer_packed(t, rows) : pairs_packed(t, rows);
      start[e + 1] = start[e] + n;
      if (n && t.op == FORWARD) staging = staging > t.unit * outer_ld(rows) ? staging : t.unit * outer_ld(rows);
    }
    packed = scratch(start[t.n], SCRATCH_PACKED);
    // without memory for the layout, the loops (any unit size) do the work
    t.tiles = t.tiles && packed != nullptr;
    t.outer = t.outer && packed != nullptr;
    t.pairs = t.pairs && packed != nullptr;
  }
  // OpenMP from the process's libgomp: the team torch's own ops use, already awake between torch's ops. Threads of
  // our own would compete with that team's spinning workers for the same cores (1.3-2x slower, measured).
#pragma omp parallel num_threads(threads)
  {
    if (t.tiles) {  // tile configurations are per thread
#pragma omp for schedule(dynamic, 1)
      for (long e = 0; e < t.n; e++) tiles_pack_expert(t, e, packed + start[e]);
      tiles_configure();
#pragma omp for schedule(dynamic, 1) nowait
      for (long u = 0; u < total; u++) tiles_unit(t, packed + start[u / t.per_expert], u);
      tiles_release();
    } else if (t.outer) {  // float32 (X and T) by construction, or bfloat16's pair_outer forward
      float *p = reinterpret_cast<float *>(packed);
#pragma omp for schedule(dynamic, 1)
      for (long e = 0; e < t.n; e++) outer_pack_expert(t, e, p + start[e]);
      float *st = reinterpret_cast<float *>(scratch(staging, SCRATCH_STAGING));
#pragma omp for schedule(dynamic, 1) nowait
      for (long u = 0; u < total; u++) outer_unit(t, p + start[u / t.per_expert], st, u);
    } else if (t.pairs) {  // bfloat16 by construction
#pragma omp for schedule(dynamic, 1)
      for (long e = 0; e < t.n; e++) pairs_pack_expert(t, e, packed + start[e]);
#pragma omp for schedule(dynamic, 1) nowait
      for (long u = 0; u < total; u++) pairs_unit(t, packed + start[u / t.per_expert], u);
    } else {
#pragma omp for schedule(dynamic, 1) nowait
      for (long u = 0; u < total; u++) run_unit<X, T>(t, u);
    }
    _mm_sfence();  // each thread's streamed stores are visible before the caller reads the gradient
  }
}

// Dropout of the experts' hidden activations (the cpu kernel's ReLU, fused). Whether element i of a call is kept
// is a counter-based hash of (seed, i) against a threshold: the mask depends on neither the thread count nor the
// build, costs no state, and the loops below vectorize (torch's CPU dropout with its ReLU took 7-15 ns per element of
// t5-small's hidden here, these 0.2-0.35 ns; docs/performance.md).
inline uint32_t fmix32(uint32_t h) {  // MurmurHash3's finalizer: a bijection with full avalanche
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}
enum { RELU_DROPOUT = 0, RELU_DROPOUT_GRAD = 1, RELU = 2, RELU_GRAD = 3 };

// float32 -> bfloat16 as to_bf16 above, without a branch (so that the loops below vectorize).
inline bf16 to_bf16_select(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  uint32_t nan = (u >> 16) | 0x40, rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16;
  return static_cast<bf16>(f != f ? nan : rounded);
}
inline float to_element(float f, float) { return f; }
inline bf16 to_element(float f, bf16) { return to_bf16_select(f); }

// RELU_DROPOUT: dst = relu(src) * (kept ? scale : 0), dst may be src. NaN stays NaN, dropped or not, as in torch's
// relu and dropout (relu(NaN) is NaN, NaN * 0 is NaN).
// RELU_DROPOUT_GRAD: dst = y > 0 ? src * scale : 0, y that op's output: y > 0 exactly where the element was kept and
// its input positive, which is where both ReLU's and dropout's gradients pass.
template <typename T, int OP>
void dropout_range(const T *src, const T *y, T *dst, long begin, long end, uint64_t seed, uint32_t threshold,
                   float scale) {
  // Element i's hash mixes its low 32 bits with the seed's low half, then the seed's high half and i's high bits,
  // which are constant over a piece (pieces never straddle a multiple of 2^32): the loop is 32-bit and vectorizes.
  const uint32_t low = static_cast<uint32_t>(seed), first = static_cast<uint32_t>(begin);
  const uint32_t high = static_cast<uint32_t>(seed >> 32) + static_cast<uint32_t>(begin >> 32) * 0x9E3779B9u;
  src += begin, dst += begin;
  if (OP == RELU_DROPOUT_GRAD) y += begin;
  const int n = static_cast<int>(end - begin);
  for (int j = 0; j < n; j++) {
    float v = scalar(src[j]), r;
    if (OP == RELU_DROPOUT) {
      float m = fmix32(fmix32((first + static_cast<uint32_t>(j)) ^ low) + high) >= threshold ? scale : 0.f;
      r = (v < 0.f ? 0.f : v) * m;
    } else {
      float g = v * scale;  // computed either way, so that the choice below is a select
      r = scalar(y[j]) > 0.f ? g : 0.f;
    }
    dst[j] = to_element(r, T());
  }
}

// RELU: dst = relu(src) on the bits, dst may be src: negative numbers and -0 become +0, NaN stays. RELU_GRAD:
// dst = y <= 0 ? 0 : src, y that op's output, as torch's threshold_backward (a NaN output passes its gradient).
// (torch's bfloat16 relu_ and threshold_backward widen each element to float32 and back: 2-11x and 1.3-3x these
// loops' time, measured; docs/performance.md.)
inline uint32_t relu_bits(uint32_t v) { return (v >> 31) && (v & 0x7FFFFFFFu) <= 0x7F800000u ? 0u : v; }
inline uint16_t relu_bits(uint16_t v) { return (v >> 15) && (v & 0x7FFFu) <= 0x7F80u ? uint16_t(0) : v; }
template <typename U>
inline bool passes(U y) { return relu_bits(y) != 0; }  // y is neither +-0 nor below 0
template <typename T, int OP>
void relu_range(const T *src, const T *y, T *dst, long begin, long end) {
  typedef std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t> U;
  const U *s = reinterpret_cast<const U *>(src) + begin, *r = reinterpret_cast<const U *>(y) + begin;
  U *d = reinterpret_cast<U *>(dst) + begin;
  for (long j = 0; j < end - begin; j++) d[j] = OP == RELU ? relu_bits(s[j]) : passes(r[j]) ? s[j] : U(0);
}

template <typename T, int OP>
void dropout_all(const T *src, const T *y, T *dst, long n, uint64_t seed, uint32_t threshold, float scale,
                 int threads) {
  constexpr long CHUNK = 1 << 14;  // elements per piece of work
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long c = 0; c < (n + CHUNK - 1) / CHUNK; c++) {
    const long begin = c * CHUNK, end = begin + CHUNK < n ? begin + CHUNK : n;
    if constexpr (OP >= RELU) relu_range<T, OP>(src, y, dst, begin, end);
    else dropout_range<T, OP>(src, y, dst, begin, end, seed, threshold, scale);
  }
}

template <typename T>
void dropout_typed(int op, const T *src, const T *y, T *dst, long n, uint64_t seed, uint32_t threshold, float scale,
                   int threads) {
  if (op == RELU_DROPOUT) dropout_all<T, RELU_DROPOUT>(src, y, dst, n, seed, threshold, scale, threads);
  else if (op == RELU_DROPOUT_GRAD) dropout_all<T, RELU_DROPOUT_GRAD>(src, y, dst, n, seed, threshold, scale, threads);
  else if (op == RELU) dropout_all<T, RELU>(src, y, dst, n, seed, threshold, scale, threads);
  else dropout_all<T, RELU_GRAD>(src, y, dst, n, seed, threshold, scale, threads);
}

}  // namespace

// dst[b, c, r] = src[b, r, c] for b < batches, r < rows, c < cols: each of `batches` matrices transposed, for GEMMs
// that run at twice the rate on an operand laid out than on its transposed view (oneDNN's bfloat16 bmm, the weight
// gradient g.T x; docs/performance.md). torch's copy of a transposed view walks one side an element at a time (8 x
// 1,154 x 2,048 bfloat16: 63-72 ms, a plain copy 3). Here with AVX-512 16-bit elements go 32 x 32 at a time through
// registers, in strips of TRANSPOSE_ROWS rows walked across all their columns, the next line of each row prefetched:
// 3.0-3.5 ms from cache, 8-9 from memory (the plain copy 3.1). Square blocks of 64 took 5.0 and 10-14.
constexpr long TRANSPOSE_ROWS = 64;

#if defined(__AVX512F__) && defined(__AVX512BW__)
// The even 16-bit lanes of a, then those of b; the odd ones (vpermt2w's indices).
alignas(64) const uint16_t EVEN_LANES[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                             32, 34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
alignas(64) const uint16_t ODD_LANES[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31,
                                            33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63};

// The 32 x 32 block of 16-bit elements at s (row stride cols) into d (row stride rows), transposed: each 16 rows'
// 32 columns as 16 pairs of columns (32-bit lanes) through transpose16, then each output row's 32 elements gathered
// from the two halves' pairs.
inline void transpose32x32(const uint16_t *s, uint16_t *d, long rows, long cols) {
  __m512 a[16], b[16];
  for (int i = 0; i < 16; i++) {
    a[i] = _mm512_loadu_ps(s + i * cols);
    b[i] = _mm512_loadu_ps(s + (i + 16) * cols);
  }
  transpose16(a);  // a[j] lane k: row k's columns 2j and 2j + 1
  transpose16(b);
  const __m512i even = _mm512_load_si512(EVEN_LANES), odd = _mm512_load_si512(ODD_LANES);
  for (int j = 0; j < 16; j++) {
    const __m512i lo = _mm512_castps_si512(a[j]), hi = _mm512_castps_si512(b[j]);
    _mm512_storeu_si512(d + 2 * j * rows, _mm512_permutex2var_epi16(lo, even, hi));
    _mm512_storeu_si512(d + (2 * j + 1) * rows, _mm512_permutex2var_epi16(lo, odd, hi));
  }
}
#endif

// Rows r0 .. r1 of one matrix (s: rows x cols) into d (cols x rows).
template <typename E>
void transpose_strip(const E *s, E *d, long rows, long cols, long r0, long r1) {
  long c = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if constexpr (sizeof(E) == 2) {  // whole 32 x 32 pieces in registers, column after column; the edges below
    const long r_end = r0 + (r1 - r0) / 32 * 32;
    for (c = 0; c + 32 <= cols; c += 32)
      for (long r = r0; r < r_end; r += 32) {
        for (int i = 0; i < 32; i++) _mm_prefetch(reinterpret_cast<const char *>(s + (r + i) * cols + c + 64),
                                                  _MM_HINT_T0);
        transpose32x32(s + r * cols + c, d + c * rows + r, rows, cols);
      }
    for (long cc = 0; cc < c; cc++)  // rows past the last whole piece, in its columns
      for (long rr = r_end; rr < r1; rr++) d[cc * rows + rr] = s[rr * cols + cc];
  }
#endif
  for (long cc = c; cc < cols; cc++)  // columns past the last whole piece, every row
    for (long rr = r0; rr < r1; rr++) d[cc * rows + rr] = s[rr * cols + cc];
}

template <typename E>
void transpose_typed(const E *src, E *dst, long batches, long rows, long cols, int threads) {
  const long strips = (rows + TRANSPOSE_ROWS - 1) / TRANSPOSE_ROWS;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
  for (long b = 0; b < batches; b++) {
    for (long strip = 0; strip < strips; strip++) {
      const long r0 = strip * TRANSPOSE_ROWS;
      transpose_strip(src + b * rows * cols, dst + b * rows * cols, rows, cols, r0,
                      r0 + TRANSPOSE_ROWS < rows ? r0 + TRANSPOSE_ROWS : rows);
    }
  }
}

// The router's float32 logits and their gradients for few experts (E <= ROUTER_MAX_EXPERTS), on bfloat16 or float32
// activations x (T, d) and a float32 weight w (E, d), d a multiple of 2 W. torch computes them from a float32 copy of
// x, with a GEMM of E columns at a fraction of its rate, and the input's gradient in float32 to round it again: the
// layer's bfloat16 forward at E 8 / 8,192 tokens took 1.08x these loops' (docs/performance.md). Here x is read as it
// lies, once per op. Every sum runs in a fixed order that depends on indices only (lanes over d, then folded; over e;
// over t): the same bits at any thread count.
constexpr long ROUTER_MAX_EXPERTS = 16;

// logits[t, e] = sum over k of x[t, k] w[e, k]
template <typename X>
void router_logits(const X *x, const float *w, float *logits, long T, long E, long d, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long t = 0; t < T; t++) {
    const X *xt = x + t * d;
    for (long e0 = 0; e0 < E; e0 += 4) {
      const long n = E - e0 < 4 ? E - e0 : 4;
      V a[4] = {vzero(), vzero(), vzero(), vzero()};
      for (long k = 0; k < d; k += W) {
        const V xv = load(xt + k);
        for (long j = 0; j < 4; j++)
          if (j < n) a[j] = vfma(xv, load(w + (e0 + j) * d + k), a[j]);
      }
      float sums[4];
      sums4(a[0], a[1], a[2], a[3], sums);
      for (long j = 0; j < n; j++) logits[t * E + e0 + j] = sums[j];
    }
  }
}

// gx[t, k] = sum over e of g[t, e] w[e, k] (in x's dtype), and gw[e, k] = sum over t of g[t, e] x[t, k]; either may
// be null. gw by columns (each thread its own, two vectors of them a pass over the rows), so each sum runs over t in
// order whatever the threads.
template <typename X>
void router_grads(const float *g, const X *x, const float *w, X *gx, float *gw, long T, long E, long d, int threads) {
  if (gx) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < T; t++)
      for (long k = 0; k < d; k += W) {
        V acc = vzero();
        for (long e = 0; e < E; e++) acc = vfma(vset1(g[t * E + e]), load(w + e * d + k), acc);
        store(gx + t * d + k, acc, false);
      }
  }
  if (gw) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long k = 0; k < d; k += 2 * W) {
      V lo[ROUTER_MAX_EXPERTS], hi[ROUTER_MAX_EXPERTS];
      for (long e = 0; e < E; e++) lo[e] = hi[e] = vzero();
      for (long t = 0; t < T; t++) {
        const V a = load(x + t * d + k), b = load(x + t * d + k + W);
        for (long e = 0; e < E; e++) {
          const V ge = vset1(g[t * E + e]);
          lo[e] = vfma(ge, a, lo[e]);
          hi[e] = vfma(ge, b, hi[e]);
        }
      }
      for (long e = 0; e < E; e++) {
        store(gw + e * d + k, lo[e], false);
        store(gw + e * d + k + W, hi[e], false);
      }
    }
  }
}

extern "C" {

// 1 where this CPU runs the instructions this build was compiled for.
int moeify_skinny_supported() { return supported() ? 1 : 0; }

// Frees the buffers kept between calls by the calling thread and by a team of `threads` OpenMP threads (the team
// moeify_skinny runs with the same count). Returns the bytes the calling thread kept before.
long moeify_release(int threads) {
  long bytes = 0;
  for (int i = 0; i < SCRATCHES; i++) bytes += scratch_size[i] * 4;
  release_scratch();
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
  release_scratch();
  return bytes;
}

// For each of n experts: op 0 c = a @ b.T (x, w -> y); op 1 c = a @ b (g, w -> gx); op 2 c = a.T @ b (g, x -> gw).
// Every operand is contiguous; out and in are multiples of 16; dtype 0 float32, 1 bfloat16, 2 float32 activations
// (x, y, g, gx) on bfloat16 weights (w, gw). Returns 0, or -1 on bad arguments.
int moeify_skinny(int op, int dtype, long n, const long *rows, const void *const *a, const void *const *b,
                  void *const *c, long out, long in, int threads) {
  if (op < 0 || op > 2 || dtype < 0 || dtype > 2 || n < 0 || out % 16 || in % 16 || out <= 0 || in <= 0) return -1;
  long unit = op == INPUT_GRAD ? IN_COLS : op == WEIGHT_GRAD ? WG_UNIT_ROWS : OUT_ROWS;
  if (op == FORWARD) {  // about FORWARD_UNIT_BYTES of weight in whole blocks of OUT_ROWS rows
    long bytes = in * (dtype == 0 ? 4 : 2), blocks = FORWARD_UNIT_BYTES / (bytes * OUT_ROWS);
    unit = blocks > 1 ? blocks * OUT_ROWS : OUT_ROWS;
  }
  // On tiles: the bfloat16 forward and input gradient (in a multiple of TILE_K) and weight gradient.
  bool tiles = TILES && dtype == 1 && (op == WEIGHT_GRAD || in % TILE_K == 0);
  // The input gradient keeps the loops' units, which its experts with few rows take: in units of 256 columns they
  // ran 1.1-1.5x slower at 1-4 rows (measured).
  if (tiles && op != INPUT_GRAD) unit = op == FORWARD ? TILE_UNIT_ROWS : TILE_GRAD_ROWS;
  if (op != INPUT_GRAD && unit > out) unit = out;  // units of weight rows: at most all of them
  Task t{op, n, rows, a, b, c, out, in, unit, ((op == INPUT_GRAD ? in : out) + unit - 1) / unit, tiles,
         OUTER && op != INPUT_GRAD && dtype == 0, PAIRS && HAS_DPBF16 && op == WEIGHT_GRAD && dtype == 1,
         PAIRS && HAS_DPBF16 && op == FORWARD && dtype == 1 && in % 32 == 0 && in <= PAIR_OUTER_MAX_IN};
  t.outer = t.outer || t.pair_outer;
  threads = threads > 0 ? threads : 1;
  if (dtype == 0) work<float, float>(t, threads);
  else if (dtype == 1) work<bf16, bf16>(t, threads);
  else work<float, bf16>(t, threads);
  return 0;
}

// Writes nbytes zero bytes at p with non-temporal stores, which do not read the lines they overwrite first, split
// between `threads` threads. A weight gradient's experts without rows are zeroed so every step: on the AMX machine
// 50 GB/s with 2 threads against 16.6 GB/s for torch's zero_ (ordinary stores; benchmarks/bench_zeroing.py) and 10.3
// for glibc 2.36's memset (one thread). The lines it writes are not left in the cache. Returns 0, or -1 on bad
// arguments.
int moeify_zero(void *p, long nbytes, int threads) {
  if (nbytes < 0 || (nbytes && !p)) return -1;
  char *c = static_cast<char *>(p);
  long head = static_cast<long>(-reinterpret_cast<uintptr_t>(c) & 63);  // bytes up to the first whole line
  if (head > nbytes) head = nbytes;
  memset(c, 0, head);
  char *body = c + head;
  const long lines = (nbytes - head) / 64;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
  for (long i = 0; i < lines; i++) {
    float *line = reinterpret_cast<float *>(body + i * 64);
    for (int k = 0; k < 16; k += W) store(line + k, vzero(), true);
  }
  _mm_sfence();  // the streamed zeros are visible before the caller reads them
  memset(body + lines * 64, 0, nbytes - head - lines * 64);
  return 0;
}

// router_logits (above) on x of dtype 0 float32 or 1 bfloat16. Returns 0, or -1 on bad arguments.
int moeify_router_logits(int dtype, const void *x, const float *w, float *logits, long T, long E, long d,
                         int threads) {
  if (dtype < 0 || dtype > 1 || T < 0 || E < 1 || E > ROUTER_MAX_EXPERTS || d < 0 || d % (2 * W)) return -1;
  threads = threads > 0 ? threads : 1;
  if (dtype == 0) router_logits(static_cast<const float *>(x), w, logits, T, E, d, threads);
  else router_logits(static_cast<const bf16 *>(x), w, logits, T, E, d, threads);
  return 0;
}

// router_grads (above), likewise.
int moeify_router_grads(int dtype, const float *g, const void *x, const float *w, void *gx, float *gw, long T, long E,
                        long d, int threads) {
  if (dtype < 0 || dtype > 1 || T < 0 || E < 1 || E > ROUTER_MAX_EXPERTS || d < 0 || d % (2 * W)) return -1;
  threads = threads > 0 ? threads : 1;
  if (dtype == 0) router_grads(g, static_cast<const float *>(x), w, static_cast<float *>(gx), gw, T, E, d, threads);
  else router_grads(g, static_cast<const bf16 *>(x), w, static_cast<bf16 *>(gx), gw, T, E, d, threads);
  return 0;
}

// transpose_typed (above) for elements of `size` bytes, 2 or 4. Returns 0, or -1 on bad arguments.
int moeify_transpose(const void *src, void *dst, long batches, long rows, long cols, int size, int threads) {
  if (batches < 0 || rows < 0 || cols < 0 || (size != 2 && size != 4) || (batches * rows * cols != 0 && (!src || !dst)))
    return -1;
  threads = threads > 0 ? threads : 1;
  if (size == 2) transpose_typed(static_cast<const uint16_t *>(src), static_cast<uint16_t *>(dst), batches, rows,
                                 cols, threads);
  else transpose_typed(static_cast<const uint32_t *>(src), static_cast<uint32_t *>(dst), batches, rows, cols,
                       threads);
  return 0;
}

// op RELU_DROPOUT, RELU_DROPOUT_GRAD, RELU or RELU_GRAD (above) over n contiguous elements of dtype 0 float32 or 1
// bfloat16; an element is kept where its hash is at least threshold (p * 2^32 drops a fraction p; the last two read
// neither). Returns 0, or -1 on bad arguments.
int moeify_dropout(int op, int dtype, long n, const void *src, const void *y, void *dst, uint64_t seed,
                   uint32_t threshold, float scale, int threads) {
  if (op < 0 || op > 3 || dtype < 0 || dtype > 1 || n < 0) return -1;
  threads = threads > 0 ? threads : 1;
  if (dtype == 0) dropout_typed(op, static_cast<const float *>(src), static_cast<const float *>(y),
                                static_cast<float *>(dst), n, seed, threshold, scale, threads);
  else dropout_typed(op, static_cast<const bf16 *>(src), static_cast<const bf16 *>(y), static_cast<bf16 *>(dst), n,
                     seed, threshold, scale, threads);
  return 0;
}
}
