// Grouped GEMMs for experts with few rows each (AVX-512; float32 and bfloat16, accumulated in float32).
//
// With few rows per expert a GEMM is bound by streaming the expert's weight (forward, input gradient) or by writing
// its weight gradient, and MKL / oneDNN do both at a third to a half of the memory's rate here (docs/performance.md).
// These loops keep the rows' partial sums in registers, read each weight row once per block of rows, and write the
// weight gradient with non-temporal stores (no read of the lines they overwrite). Each output element is summed in
// a fixed order that depends on indices only, never on where the operands lie, so results are reproducible bits.
//
// Built by moeify/layers/kernels/native.py with the system compiler and called through ctypes.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

namespace {

typedef uint16_t bf16;

inline __m512 load16(const float *p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16 *p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline float scalar(float v) { return v; }
inline float scalar(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// float32 -> bfloat16, rounding to nearest even as torch does; NaN stays a (quiet) NaN.
inline __m256i to_bf16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}
inline bf16 to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if (f != f) return static_cast<bf16>((u >> 16) | 0x40);
  return static_cast<bf16>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// Non-temporal only at the vector's own boundary (the stream instructions require it).
inline void store16(float *p, __m512 v, bool stream) {
  if (stream && (reinterpret_cast<uintptr_t>(p) & 63) == 0) _mm512_stream_ps(p, v);
  else _mm512_storeu_ps(p, v);
}
inline void store16(bf16 *p, __m512 v, bool stream) {
  __m256i h = to_bf16(v);
  if (stream && (reinterpret_cast<uintptr_t>(p) & 31) == 0) _mm256_stream_si256(reinterpret_cast<__m256i *>(p), h);
  else _mm256_storeu_si256(reinterpret_cast<__m256i *>(p), h);
}
inline void store1(float *p, float v) { *p = v; }
inline void store1(bf16 *p, float v) { *p = to_bf16(v); }

// The four sums of a, b, c and d (four weight rows' dot products with one row of x), stored to p[0..3]: one folding
// of four vectors together instead of four separate reductions, a third of the instructions.
template <typename T>
inline void store_sums4(T *p, __m512 a, __m512 b, __m512 c, __m512 d) {
  __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, t);
  store1(p + 0, lanes[0]);
  store1(p + 1, lanes[4]);
  store1(p + 2, lanes[8]);
  store1(p + 3, lanes[12]);
}

// The next four weight rows' lines at column i: the forward reads four rows side by side, short streams that the
// hardware prefetcher does not follow far enough ahead. A prefetch never faults, past the end included.
template <typename T>
inline void prefetch_next(const T *w, long in, long o, long i) {
  for (int r = 4; r < 8; r++) _mm_prefetch(reinterpret_cast<const char *>(w + (o + r) * in + i), _MM_HINT_T0);
}

constexpr int KB = 6;  // rows of x (or of the gradient) held in registers at once: 6 x 4 accumulators + operands

// y[k, o + r] = x[k, :] . w[o + r, :] for k < K (<= KB), r < 4: four weight rows read once for K rows.
template <typename T, int K>
void forward_block(const T *x, const T *w, T *y, long out, long in, long o) {
  __m512 acc[K][4];
  for (int k = 0; k < K; k++)
    for (int r = 0; r < 4; r++) acc[k][r] = _mm512_setzero_ps();
  for (long i = 0; i < in; i += 16) {
    __m512 w0 = load16(w + (o + 0) * in + i), w1 = load16(w + (o + 1) * in + i);
    __m512 w2 = load16(w + (o + 2) * in + i), w3 = load16(w + (o + 3) * in + i);
    prefetch_next(w, in, o, i);
    for (int k = 0; k < K; k++) {
      __m512 xv = load16(x + k * in + i);
      acc[k][0] = _mm512_fmadd_ps(xv, w0, acc[k][0]);
      acc[k][1] = _mm512_fmadd_ps(xv, w1, acc[k][1]);
      acc[k][2] = _mm512_fmadd_ps(xv, w2, acc[k][2]);
      acc[k][3] = _mm512_fmadd_ps(xv, w3, acc[k][3]);
    }
  }
  for (int k = 0; k < K; k++) store_sums4(y + k * out + o, acc[k][0], acc[k][1], acc[k][2], acc[k][3]);
}

// gx[k, i0 : i0 + 16 C] = sum over o of g[k, o] * w[o, i0 : i0 + 16 C], for k < K: the weight panel streamed once.
template <typename T, int K, int C>
void input_grad_block(const T *g, const T *w, T *gx, long out, long in, long i0) {
  __m512 acc[K][C];
  for (int k = 0; k < K; k++)
    for (int c = 0; c < C; c++) acc[k][c] = _mm512_setzero_ps();
  for (long o = 0; o < out; o++) {
    __m512 wv[C];
    for (int c = 0; c < C; c++) wv[c] = load16(w + o * in + i0 + 16 * c);
    for (int c = 0; c < C; c++)  // a strided walk down the weight's rows: fetch a few rows ahead
      _mm_prefetch(reinterpret_cast<const char *>(w + (o + 8) * in + i0 + 16 * c), _MM_HINT_T0);
    for (int k = 0; k < K; k++) {
      __m512 gv = _mm512_set1_ps(scalar(g[k * out + o]));
      for (int c = 0; c < C; c++) acc[k][c] = _mm512_fmadd_ps(gv, wv[c], acc[k][c]);
    }
  }
  for (int k = 0; k < K; k++)
    for (int c = 0; c < C; c++) store16(gx + k * in + i0 + 16 * c, acc[k][c], false);
}

// gw[o + r, i0 : i0 + 16 C] = sum over k < rows of g[k, o + r] * x[k, i0 : i0 + 16 C], r < 4, streamed out.
template <typename T, int C>
void weight_grad_block(const T *g, const T *x, T *gw, long rows, long out, long in, long o, long i0) {
  __m512 acc[4][C];
  for (int r = 0; r < 4; r++)
    for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
  for (long k = 0; k < rows; k++) {
    __m512 xv[C];
    for (int c = 0; c < C; c++) xv[c] = load16(x + k * in + i0 + 16 * c);
    for (int r = 0; r < 4; r++) {
      __m512 gv = _mm512_set1_ps(scalar(g[k * out + o + r]));
      for (int c = 0; c < C; c++) acc[r][c] = _mm512_fmadd_ps(gv, xv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < 4; r++)
    for (int c = 0; c < C; c++) store16(gw + (o + r) * in + i0 + 16 * c, acc[r][c], true);
}

#ifdef __AVX512BF16__
// A static initializer may run before libgcc has read the CPU model: read it first.
const bool HAS_DPBF16 = (__builtin_cpu_init(), __builtin_cpu_supports("avx512bf16"));

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
const bool HAS_DPBF16 = false;
template <int K>
void forward_block_dp(const bf16 *, const bf16 *, bf16 *, long, long, long) {}
#endif

template <typename T, int K>
void forward_any(const T *x, const T *w, T *y, long out, long in, long o) {
  if constexpr (sizeof(T) == 2) {
    if (HAS_DPBF16 && in % 32 == 0) return forward_block_dp<K>(x, w, y, out, in, o);
  }
  forward_block<T, K>(x, w, y, out, in, o);
}

// A runtime row count (1..KB) to the templates above.
template <typename T>
void forward_rows(int k, const T *x, const T *w, T *y, long out, long in, long o) {
  switch (k) {
    case 1: return forward_any<T, 1>(x, w, y, out, in, o);
    case 2: return forward_any<T, 2>(x, w, y, out, in, o);
    case 3: return forward_any<T, 3>(x, w, y, out, in, o);
    case 4: return forward_any<T, 4>(x, w, y, out, in, o);
    case 5: return forward_any<T, 5>(x, w, y, out, in, o);
    default: return forward_any<T, 6>(x, w, y, out, in, o);
  }
}

template <typename T, int C>
void input_grad_rows(int k, const T *g, const T *w, T *gx, long out, long in, long i0) {
  switch (k) {
    case 1: return input_grad_block<T, 1, C>(g, w, gx, out, in, i0);
    case 2: return input_grad_block<T, 2, C>(g, w, gx, out, in, i0);
    case 3: return input_grad_block<T, 3, C>(g, w, gx, out, in, i0);
    case 4: return input_grad_block<T, 4, C>(g, w, gx, out, in, i0);
    case 5: return input_grad_block<T, 5, C>(g, w, gx, out, in, i0);
    default: return input_grad_block<T, 6, C>(g, w, gx, out, in, i0);
  }
}

enum Op { FORWARD = 0, INPUT_GRAD = 1, WEIGHT_GRAD = 2 };
constexpr long OUT_ROWS = 16;  // weight rows per unit of work (forward, weight gradient)
constexpr long IN_COLS = 64;   // input columns per unit of work (input gradient)

struct Task {
  int op;
  long n;  // experts
  const long *rows;
  const void *const *a;
  const void *const *b;
  void *const *c;
  long out, in, per_expert;  // per_expert: units of work per expert
};

// One unit: OUT_ROWS output rows (forward, weight gradient) or IN_COLS input columns (input gradient) of one expert.
template <typename T>
void run_unit(const Task &t, long u) {
  long e = u / t.per_expert, j = u % t.per_expert, rows = t.rows[e], out = t.out, in = t.in;
  const T *a = static_cast<const T *>(t.a[e]);
  const T *b = static_cast<const T *>(t.b[e]);
  T *c = static_cast<T *>(t.c[e]);
  if (t.op == FORWARD) {  // a = x (rows, in), b = w (out, in), c = y (rows, out)
    for (long o = j * OUT_ROWS; o < (j + 1) * OUT_ROWS && o < out; o += 4)
      for (long k = 0; k < rows; k += KB) forward_rows<T>(int(rows - k < KB ? rows - k : KB), a + k * in, b, c + k * out, out, in, o);
  } else if (t.op == INPUT_GRAD) {  // a = g (rows, out), b = w (out, in), c = gx (rows, in)
    long i0 = j * IN_COLS, cols = in - i0 < IN_COLS ? in - i0 : IN_COLS;
    for (long k = 0; k < rows; k += KB) {
      int kb = int(rows - k < KB ? rows - k : KB);
      switch (cols / 16) {
        case 1: input_grad_rows<T, 1>(kb, a + k * out, b, c + k * in, out, in, i0); break;
        case 2: input_grad_rows<T, 2>(kb, a + k * out, b, c + k * in, out, in, i0); break;
        case 3: input_grad_rows<T, 3>(kb, a + k * out, b, c + k * in, out, in, i0); break;
        default: input_grad_rows<T, 4>(kb, a + k * out, b, c + k * in, out, in, i0); break;
      }
    }
  } else {  // a = g (rows, out), b = x (rows, in), c = gw (out, in)
    for (long o = j * OUT_ROWS; o < (j + 1) * OUT_ROWS && o < out; o += 4) {
      long i0 = 0;
      for (; i0 + 64 <= in; i0 += 64) weight_grad_block<T, 4>(a, b, c, rows, out, in, o, i0);
      for (; i0 < in; i0 += 16) weight_grad_block<T, 1>(a, b, c, rows, out, in, o, i0);
    }
  }
}

template <typename T>
void work(Task &t, int threads) {
  long total = t.n * t.per_expert;
  // OpenMP from the process's libgomp: the team torch's own ops use, already awake between torch's ops. Threads of
  // our own would compete with that team's spinning workers for the same cores (1.3-2x slower, measured).
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(dynamic, 1) nowait
    for (long u = 0; u < total; u++) run_unit<T>(t, u);
    _mm_sfence();  // each thread's streamed stores are visible before the caller reads the gradient
  }
}

}  // namespace

extern "C" {

// 1 where this CPU runs the AVX-512 instructions above.
int moeify_skinny_supported() { return __builtin_cpu_supports("avx512f") ? 1 : 0; }

// For each of n experts: op 0 c = a @ b.T (x, w -> y); op 1 c = a @ b (g, w -> gx); op 2 c = a.T @ b (g, x -> gw).
// Every operand is contiguous; out and in are multiples of 16; dtype 0 float32, 1 bfloat16. Returns 0, or -1 on bad
// arguments.
int moeify_skinny(int op, int dtype, long n, const long *rows, const void *const *a, const void *const *b,
                  void *const *c, long out, long in, int threads) {
  if (op < 0 || op > 2 || dtype < 0 || dtype > 1 || n < 0 || out % 16 || in % 16 || out <= 0 || in <= 0) return -1;
  Task t{op, n, rows, a, b, c, out, in, op == INPUT_GRAD ? (in + IN_COLS - 1) / IN_COLS : (out + OUT_ROWS - 1) / OUT_ROWS};
  if (dtype == 0) work<float>(t, threads > 0 ? threads : 1);
  else work<bf16>(t, threads > 0 ? threads : 1);
  return 0;
}
}
