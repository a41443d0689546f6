// A step of a Llama-architecture model on a CPU, in one call: every layer's RMSNorm,
// products, rotary embedding, KV-cache write, attention and MLP, the final norm and the
// lm_head, for B rows, each a token at its position in its KV-cache slot (a decode step of B
// sequences, or a prefill: every prompt token a row). Registered as torch.ops.chatbot.decode_step;
// chatbot/inference/native.py builds it, checks which models it can serve and passes the
// weights. The Python model (model.py) is the reference: tests/unit/inference/test_native.py
// compares the two.
//
// Why: a decode step of SmolLM2-135M is about 1,300 small PyTorch operations, each
// dispatched from Python, and half of a one-sequence step went there. Here they are loops
// over raw fp32 buffers, and the products read int8 (or fp32) weights directly.
//
// Numbers: each row's sums never depend on another row and run in the same order whatever
// the call holds, so a sequence's tokens do not change with what else is decoded beside it,
// and a prompt prefilled in one call gives what decoding it token by token gives. fp32
// weights: fp32 products; int8 weights: y = scale[n] * sum_k x[k] q[n,k], with x in fp32, or
// quantised to int8 in blocks of 16 where the CPU has VNNI (below).
//
// Vectors: 16 floats, in AVX-512 or AVX2 intrinsics where the CPU has them, plain loops
// elsewhere; the file is compiled with -march=native for the CPU it runs on (native.py keys
// the build by the CPU's flags).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

bool int8_activations();  // below: whether int8 products take int8 activations (VNNI)

namespace {

// 16 floats: one AVX-512 register, two AVX2 ones, or a plain array elsewhere
#if defined(__AVX512F__)
struct vf16 {
  __m512 v;
};
inline vf16 zero() { return {_mm512_setzero_ps()}; }
inline vf16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline vf16 load(const int8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
inline vf16 splat(float f) { return {_mm512_set1_ps(f)}; }
inline void store(float* p, vf16 a) { _mm512_storeu_ps(p, a.v); }
inline vf16 fma(vf16 a, vf16 b, vf16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }  // a * b + c
inline float hsum(vf16 a) { return _mm512_reduce_add_ps(a.v); }
#elif defined(__AVX2__) && defined(__FMA__)
struct vf16 {
  __m256 lo, hi;
};
inline vf16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline vf16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline vf16 load(const int8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))};
}
inline vf16 splat(float f) { return {_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
inline void store(float* p, vf16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline vf16 fma(vf16 a, vf16 b, vf16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline float hsum(vf16 a) {
  __m256 s = _mm256_add_ps(a.lo, a.hi);
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
#else
struct vf16 {
  float v[16];
};
inline vf16 zero() { return {}; }
inline vf16 load(const float* p) {
  vf16 a;
  for (int i = 0; i < 16; ++i) a.v[i] = p[i];
  return a;
}
inline vf16 load(const int8_t* p) {
  vf16 a;
  for (int i = 0; i < 16; ++i) a.v[i] = static_cast<float>(p[i]);
  return a;
}
inline vf16 splat(float f) {
  vf16 a;
  for (int i = 0; i < 16; ++i) a.v[i] = f;
  return a;
}
inline void store(float* p, vf16 a) {
  for (int i = 0; i < 16; ++i) p[i] = a.v[i];
}
inline vf16 fma(vf16 a, vf16 b, vf16 c) {
  for (int i = 0; i < 16; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
inline float hsum(vf16 a) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += a.v[i];
  return s;
}
#endif
constexpr int64_t W = 16;  // floats in a vf16

// A product's weight: int8 rows with one scale per row, or fp32 rows; a bias or none.
struct Weight {
  const int8_t* q = nullptr;
  const float* scale = nullptr;
  const float* w = nullptr;
  const float* bias = nullptr;
  int64_t n = 0, k = 0;
  bool packed = false;  // int8 in blocks of [4 rows, 64 inputs]: [n / 4, k / 64, 4, 64]
};

Weight weight_of(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& bias) {
  TORCH_CHECK((w.dim() == 2 || w.dim() == 4) && w.is_contiguous(), "a weight must be a contiguous matrix");
  Weight out;
  out.n = w.size(0);
  out.k = w.size(1);
  if (w.dim() == 4) {  // packed (native.py: pack_int8)
    TORCH_CHECK(w.scalar_type() == at::kChar && w.size(2) == 4 && w.size(3) == 64 && int8_activations(),
                "packed weights are int8 [n / 4, k / 64, 4, 64], for a CPU with VNNI");
    out.n = w.size(0) * 4;
    out.k = w.size(1) * 64;
    out.packed = true;
  }
  TORCH_CHECK(out.k % W == 0, "a weight's input size must be a multiple of ", W);
  if (w.scalar_type() == at::kChar) {
    TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == out.n && scale.is_contiguous(),
                "int8 weights need one fp32 scale per row");
    out.q = w.data_ptr<int8_t>();
    out.scale = scale.data_ptr<float>();
  } else {
    TORCH_CHECK(w.scalar_type() == at::kFloat, "weights must be int8 or fp32");
    out.w = w.data_ptr<float>();
  }
  if (bias.numel() > 0) {
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == out.n && bias.is_contiguous(),
                "a bias must be fp32, one per row");
    out.bias = bias.data_ptr<float>();
  }
  return out;
}

// y[r, n] for weight rows n0 .. n0+NB and inputs rows r < R (R <= 4): every weight vector
// loaded (and converted) once for all R rows.
template <typename T, int NB, int R>
inline void tile(const T* w, int64_t k, const float* x, int64_t ldx, float* sums) {
  vf16 acc[NB][R];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = zero();
  for (int64_t i = 0; i < k; i += W) {
    vf16 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = load(x + r * ldx + i);
    for (int b = 0; b < NB; ++b) {
      const vf16 wv = load(w + b * k + i);
      for (int r = 0; r < R; ++r) acc[b][r] = fma(wv, xv[r], acc[b][r]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) sums[r * NB + b] = hsum(acc[b][r]);
}

// f.template operator()<R>(r) for row groups r .. r + R covering rows, four at a time
template <typename F>
inline void row_groups(int64_t rows, F&& f) {
  int64_t r = 0;
  for (; rows - r >= 4; r += 4) f.template operator()<4>(r);
  switch (rows - r) {
    case 3: f.template operator()<3>(r); break;
    case 2: f.template operator()<2>(r); break;
    case 1: f.template operator()<1>(r); break;
    default: break;
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// int8 weights on a CPU with AVX512-VNNI: the activations are quantised too, in blocks of
// AB = 16 (one scale per block and row: absmax / 127, as llama.cpp's Q8 blocks), and the
// products run in int8 (vpdpbusd: 64 multiply-adds an instruction, no conversion of the
// weights to float). Blocks of 64 cost a little more quality (held-out loss +1.2% against
// fp32 on SmolLM2-135M); a vpdpbusd's 16 int32 lanes each sum 4 bytes, so each lane takes
// its block's scale from a vector of 16 per 64 inputs at no extra cost. vpdpbusd multiplies
// unsigned by signed bytes: the weights' bytes are flipped to unsigned (w + 128, an xor)
// and 128 * sum(scale * xq) taken off again (`offset`).
constexpr int64_t QB = 64;  // inputs per vpdpbusd
constexpr int64_t AB = 16;  // inputs per activation scale (one vector: `quantise` relies on it)
constexpr bool kVnni = true;
// the weights are streamed from memory once a step: asking for those of 8 row blocks ahead
// took the lm_head's product from 12.8 to 20 GB/s (2 cores, one row)
constexpr int64_t kPrefetchBlocks = 8;

struct Quantised {
  std::vector<int8_t> q;       // [rows, k]
  std::vector<float> scale;    // [rows, k / QB, 16]: each int32 lane's scale
  std::vector<float> offset;   // [rows]
};

Quantised quantise(const float* x, int64_t rows, int64_t k) {
  Quantised out;
  out.q.resize(rows * k);
  out.scale.resize(rows * (k / QB) * 16);
  out.offset.resize(rows);
  for (int64_t r = 0; r < rows; ++r) {
    float offset = 0.f;
    for (int64_t b = 0; b < k / AB; ++b) {
      const __m512 xb = _mm512_loadu_ps(x + r * k + b * AB);  // AB == 16: one vector a block
      const float scale = _mm512_reduce_max_ps(_mm512_abs_ps(xb)) / 127.f;
      int32_t sum = 0;
      __m128i bytes = _mm_setzero_si128();
      if (scale > 0.f) {  // x / scale rounded half to even, as torch.round
        const __m512i v = _mm512_cvt_roundps_epi32(_mm512_div_ps(xb, _mm512_set1_ps(scale)),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        bytes = _mm512_cvtsepi32_epi8(v);
        sum = _mm512_reduce_add_epi32(v);
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(&out.q[r * k + b * AB]), bytes);
      for (int64_t lane = 0; lane < AB / 4; ++lane) out.scale[r * (k / 4) + b * (AB / 4) + lane] = scale;
      offset += scale * static_cast<float>(sum);
    }
    out.offset[r] = 128.f * offset;
  }
  return out;
}

// sums[r * NB + b] = sum_k x[r, k] w[n0 + b, k] (before the weight's scale) for R rows
// weight row b's inputs c * 64 .. c * 64 + 63 are at w + b * rs + c * cs (unpacked: rs = k,
// cs = 64; packed: rs = 64, cs = 4 * 64)
template <int NB, int R>
inline void vnni_tile(const int8_t* w, int64_t k, int64_t rs, int64_t cs, const Quantised& xq, int64_t r0,
                      float* sums) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t chunks = k / QB;
  __m512 acc[NB][R];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    __m512i xv[R];
    __m512 sv[R];
    for (int r = 0; r < R; ++r) {
      xv[r] = _mm512_loadu_si512(&xq.q[(r0 + r) * k + c * QB]);
      sv[r] = _mm512_loadu_ps(&xq.scale[(r0 + r) * (k / 4) + c * 16]);
    }
    for (int b = 0; b < NB; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchBlocks * NB * k + b * rs + c * cs), _MM_HINT_T0);
      const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(w + b * rs + c * cs), flip);
      for (int r = 0; r < R; ++r) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv[r]);
        acc[b][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sv[r], acc[b][r]);
      }
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) sums[r * NB + b] = _mm512_reduce_add_ps(acc[b][r]) - xq.offset[r0 + r];
}

#else
constexpr bool kVnni = false;
#endif

// y [rows, n] = x [rows, k] @ W.T (+ bias), split across threads by weight rows.
void linear(const Weight& wt, const float* x, int64_t rows, float* y) {
  constexpr int NB = 4;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const bool vnni = wt.q && wt.k % QB == 0;
  const Quantised xq = vnni ? quantise(x, rows, wt.k) : Quantised{};
#endif
  // sums[r * nb + b] of weight rows n0 .. n0 + nb (nb = NB, or 1 for the last rows)
  auto block = [&]<int nb>(int64_t n0, float* sums) {
    const int64_t k = wt.k;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (vnni) {  // packed weights come in whole blocks of NB rows (native.py: pack_int8)
      const int64_t rs = wt.packed ? QB : k, cs = wt.packed ? NB * QB : QB;
      row_groups(rows, [&]<int R>(int64_t r) { vnni_tile<nb, R>(wt.q + n0 * k, k, rs, cs, xq, r, sums + r * nb); });
      return;
    }
#endif
    row_groups(rows, [&]<int R>(int64_t r) {
      if (wt.q) tile<int8_t, nb, R>(wt.q + n0 * k, k, x + r * k, k, sums + r * nb);
      else tile<float, nb, R>(wt.w + n0 * k, k, x + r * k, k, sums + r * nb);
    });
  };
  const int64_t blocks = (wt.n + NB - 1) / NB;
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(rows * NB);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * NB;
      const int64_t nb = std::min<int64_t>(NB, wt.n - n0);
      if (nb == NB) {
        block.template operator()<NB>(n0, sums.data());
      } else {  // the last rows, one at a time
        std::vector<float> one(rows);
        for (int64_t b = 0; b < nb; ++b) {
          block.template operator()<1>(n0 + b, one.data());
          for (int64_t r = 0; r < rows; ++r) sums[r * NB + b] = one[r];
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t n = n0 + b;
          float v = sums[r * NB + b];
          if (wt.q) v *= wt.scale[n];
          if (wt.bias) v += wt.bias[n];
          y[r * wt.n + n] = v;
        }
    }
  });
}

// scores[j] = exp(scores[j] - top) for j < len; their sum
#if defined(__AVX512F__)
// exp of 16 floats <= 0 (Cephes' expf: 2^n * a degree-6 polynomial, within 2 ulp)
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

float exp_shifted(float* scores, int64_t len, float top) {
  const __m512 shift = _mm512_set1_ps(top);
  __m512 total = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + j), shift));
    _mm512_storeu_ps(scores + j, e);
    total = _mm512_add_ps(total, e);
  }
  if (j < len) {
    const __mmask16 m = static_cast<__mmask16>((1u << (len - j)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + j), shift));
    _mm512_mask_storeu_ps(scores + j, m, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
  }
  return _mm512_reduce_add_ps(total);
}
#else
float exp_shifted(float* scores, int64_t len, float top) {
  float total = 0.f;
  for (int64_t j = 0; j < len; ++j) {
    scores[j] = std::exp(scores[j] - top);
    total += scores[j];
  }
  return total;
}
#endif

// o[D] = softmax(q . keys * scale) @ values for one query over `len` positions, `stride`
// floats apart. ND = D / 16 vectors held in registers (heads of 64 or 128); 0: any D.
template <int ND>
void attend(const float* q, const float* keys, const float* values, int64_t len, int64_t stride, int64_t D,
            float scale, float* scores, float* o) {
  constexpr int R = ND > 0 ? ND : 1;
  const int64_t nd = ND > 0 ? ND : D / W;
  vf16 qv[R];
  if (ND > 0)
    for (int n = 0; n < ND; ++n) qv[n] = load(q + n * W);
  float top = -INFINITY;
  for (int64_t j = 0; j < len; ++j) {
    const float* kj = keys + j * stride;
    vf16 acc = zero();
    for (int64_t n = 0; n < nd; ++n) acc = fma(ND > 0 ? qv[n] : load(q + n * W), load(kj + n * W), acc);
    scores[j] = hsum(acc) * scale;
    top = std::max(top, scores[j]);
  }
  const vf16 inv = splat(1.f / exp_shifted(scores, len, top));
  if (ND > 0) {
    vf16 ov[R];
    for (int n = 0; n < ND; ++n) ov[n] = zero();
    for (int64_t j = 0; j < len; ++j) {
      const vf16 p = splat(scores[j]);
      const float* vj = values + j * stride;
      for (int n = 0; n < ND; ++n) ov[n] = fma(p, load(vj + n * W), ov[n]);
    }
    for (int n = 0; n < ND; ++n) store(o + n * W, fma(ov[n], inv, zero()));
  } else {
    std::memset(o, 0, D * sizeof(float));
    for (int64_t j = 0; j < len; ++j) {
      const vf16 p = splat(scores[j]);
      for (int64_t n = 0; n < nd; ++n) store(o + n * W, fma(p, load(values + j * stride + n * W), load(o + n * W)));
    }
    for (int64_t n = 0; n < nd; ++n) store(o + n * W, fma(load(o + n * W), inv, zero()));
  }
}

// out = x * rsqrt(mean(x^2) + eps) * weight, row by row (as model.py's RMSNorm in fp32)
void rms_norm(const float* x, const float* weight, int64_t rows, int64_t h, double eps, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * h;
    vf16 acc = zero();
    for (int64_t i = 0; i < h; i += W) {
      const vf16 v = load(xr + i);
      acc = fma(v, v, acc);
    }
    const float inv = 1.0f / std::sqrt(hsum(acc) / static_cast<float>(h) + static_cast<float>(eps));
    for (int64_t i = 0; i < h; ++i) out[r * h + i] = weight[i] * (xr[i] * inv);
  }
}

// "rotate_half" rotary embedding of `heads` heads of size d, in place
void rope(float* v, int64_t heads, int64_t d, const float* cos, const float* sin) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* p = v + h * d;
    for (int64_t i = 0; i < half; ++i) {
      const float a = p[i], b = p[i + half];
      p[i] = a * cos[i] - b * sin[i];
      p[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

}  // namespace

// Logits [B, V] after B rows, each a token at its position in its KV-cache slot: a decode
// step of B sequences, or a prefill (every prompt token a row; the same slot may come many
// times, each row at its own position). Every row's keys and values are written before any
// row attends, and a row attends to its slot's positions 0 .. its own: causal, whatever the
// rows are, and each row computed as it would be alone (see the top of this file).
//   ids, positions, slots: [B] int64: the token fed, its position, its KV-cache slot
//   cache: [layers, 2, slots, max_len, n_kv, head_dim] fp32, written at each row's position
//   embed: [vocab, hidden] fp32; inv_freq: [head_dim / 2] fp32
//   weights: per layer 14 tensors (input norm; qkv weight, scale, bias; o weight, scale,
//   bias; post-attention norm; gate_up weight, scale, bias; down weight, scale, bias),
//   then the final norm and the lm_head's weight, scale, bias. An absent scale or bias is an
//   empty tensor.
//   logit_rows: the rows whose logits are returned, in that order ([len, V]); empty: all
at::Tensor decode_step(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& slots,
                       const at::Tensor& cache, const at::Tensor& embed, const at::Tensor& inv_freq,
                       std::vector<at::Tensor> weights, int64_t n_heads, int64_t n_kv, int64_t head_dim,
                       double eps, const at::Tensor& logit_rows) {
  TORCH_CHECK(cache.dim() == 6 && cache.is_contiguous() && cache.scalar_type() == at::kFloat,
              "the KV cache must be a contiguous fp32 [layers, 2, slots, max_len, n_kv, head_dim]");
  const int64_t layers = cache.size(0), num_slots = cache.size(2), max_len = cache.size(3);
  TORCH_CHECK(cache.size(4) == n_kv && cache.size(5) == head_dim, "the KV cache does not fit the model");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * 14 + 4, "expected ", layers * 14 + 4,
              " weight tensors, got ", weights.size());
  TORCH_CHECK(head_dim % W == 0 && n_heads % n_kv == 0, "unsupported head layout");
  TORCH_CHECK(embed.dim() == 2 && embed.is_contiguous() && embed.scalar_type() == at::kFloat,
              "the embedding must be a contiguous fp32 matrix");
  TORCH_CHECK(inv_freq.is_contiguous() && inv_freq.scalar_type() == at::kFloat && inv_freq.numel() == head_dim / 2,
              "inv_freq must be fp32 [head_dim / 2]");
  const int64_t B = ids.numel(), H = embed.size(1), vocab = embed.size(0);
  TORCH_CHECK(H % W == 0, "hidden size must be a multiple of ", W);
  TORCH_CHECK(positions.numel() == B && slots.numel() == B, "ids, positions and slots: one each per row");
  const at::Tensor ids_c = ids.to(at::kLong).contiguous(), pos_c = positions.to(at::kLong).contiguous(),
                   slots_c = slots.to(at::kLong).contiguous();
  const int64_t *id = ids_c.data_ptr<int64_t>(), *pos = pos_c.data_ptr<int64_t>(), *slot = slots_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(id[b] >= 0 && id[b] < vocab, "token id ", id[b], " is out of the vocabulary");
    TORCH_CHECK(pos[b] >= 0 && pos[b] < max_len, "position ", pos[b], " is beyond the KV cache length");
    TORCH_CHECK(slot[b] >= 0 && slot[b] < num_slots, "slot ", slot[b], " is not in the KV cache");
  }
  const at::Tensor wanted_c = logit_rows.to(at::kLong).contiguous();
  const int64_t* wanted = wanted_c.data_ptr<int64_t>();
  const int64_t out_rows = logit_rows.numel() > 0 ? logit_rows.numel() : B;
  for (int64_t i = 0; i < logit_rows.numel(); ++i)
    TORCH_CHECK(wanted[i] >= 0 && wanted[i] < B, "logit row ", wanted[i], " is not one of the ", B, " rows");
  const int64_t D = head_dim, qn = n_heads * D, kvn = n_kv * D, group = n_heads / n_kv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));

  // each row's rotary cos/sin: [B, D]
  std::vector<float> cosv(B * D), sinv(B * D);
  const float* inv = inv_freq.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < D; ++i) {
      const float f = static_cast<float>(pos[b]) * inv[i % (D / 2)];
      cosv[b * D + i] = std::cos(f);
      sinv[b * D + i] = std::sin(f);
    }

  std::vector<float> x(B * H), normed(B * H), attn(B * qn), out(B * H);
  const float* emb = embed.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) std::memcpy(&x[b * H], emb + id[b] * H, H * sizeof(float));
  float* kv = cache.data_ptr<float>();
  const int64_t pos_stride = n_kv * D, slot_stride = max_len * pos_stride, kv_stride = num_slots * slot_stride;
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, pos[b] + 1);

  std::vector<float> qkv, mlp, act;
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* t = &weights[l * 14];
    const Weight wqkv = weight_of(t[1], t[2], t[3]), wo = weight_of(t[4], t[5], t[6]);
    const Weight wgu = weight_of(t[8], t[9], t[10]), wdown = weight_of(t[11], t[12], t[13]);
    TORCH_CHECK(wqkv.k == H && wqkv.n == qn + 2 * kvn && wo.k == qn && wo.n == H && wgu.k == H &&
                    wgu.n % 2 == 0 && wdown.k == wgu.n / 2 && wdown.n == H,
                "layer ", l, "'s weights do not fit the model");
    const int64_t I = wgu.n / 2;

    rms_norm(x.data(), t[0].data_ptr<float>(), B, H, eps, normed.data());
    qkv.resize(B * wqkv.n);
    linear(wqkv, normed.data(), B, qkv.data());
    float* layer_k = kv + (2 * l) * kv_stride;
    float* layer_v = kv + (2 * l + 1) * kv_stride;
    for (int64_t b = 0; b < B; ++b) {
      float* row = &qkv[b * wqkv.n];
      rope(row, n_heads + n_kv, D, &cosv[b * D], &sinv[b * D]);  // q's heads, then k's
      const int64_t at_pos = slot[b] * slot_stride + pos[b] * pos_stride;
      std::memcpy(layer_k + at_pos, row + qn, kvn * sizeof(float));
      std::memcpy(layer_v + at_pos, row + qn + kvn, kvn * sizeof(float));
    }

    // attention of each row's one query to its keys 0 .. pos: one task per (row, head)
    at::parallel_for(0, B * n_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(longest);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / n_heads, h = task % n_heads, g = h / group;
        const float* q = &qkv[b * wqkv.n + h * D];
        const float* keys = layer_k + slot[b] * slot_stride + g * D;
        const float* values = layer_v + slot[b] * slot_stride + g * D;
        const int64_t len = pos[b] + 1;
        float* o = &attn[b * qn + h * D];
        switch (D / W) {
          case 4: attend<4>(q, keys, values, len, pos_stride, D, scale, scores.data(), o); break;
          case 8: attend<8>(q, keys, values, len, pos_stride, D, scale, scores.data(), o); break;
          default: attend<0>(q, keys, values, len, pos_stride, D, scale, scores.data(), o);
        }
      }
    });

    linear(wo, attn.data(), B, out.data());
    for (int64_t i = 0; i < B * H; ++i) x[i] += out[i];

    rms_norm(x.data(), t[7].data_ptr<float>(), B, H, eps, normed.data());
    mlp.resize(B * wgu.n);
    act.resize(B * I);
    linear(wgu, normed.data(), B, mlp.data());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < I; ++i) {
        const float g = mlp[b * wgu.n + i], u = mlp[b * wgu.n + I + i];
        act[b * I + i] = g / (1.0f + std::exp(-g)) * u;
      }
    linear(wdown, act.data(), B, out.data());
    for (int64_t i = 0; i < B * H; ++i) x[i] += out[i];
  }

  // the logits of the rows asked for (a prefill wants each sequence's last token only)
  std::vector<float> last(x);
  if (logit_rows.numel() > 0)
    for (int64_t i = 0; i < out_rows; ++i) std::memcpy(&last[i * H], &x[wanted[i] * H], H * sizeof(float));
  const at::Tensor* tail = &weights[layers * 14];
  rms_norm(last.data(), tail[0].data_ptr<float>(), out_rows, H, eps, normed.data());
  const Weight head = weight_of(tail[1], tail[2], tail[3]);
  TORCH_CHECK(head.k == H, "the lm_head does not fit the model");
  at::Tensor logits = at::empty({out_rows, head.n}, at::kFloat);
  linear(head, normed.data(), out_rows, logits.data_ptr<float>());
  return logits;
}

// x [rows, k] fp32 @ weight.T (+ bias): one product as decode_step computes it (benchmarks, tests)
at::Tensor linear_op(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& bias) {
  const Weight wt = weight_of(weight, scale, bias);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == wt.k && x.scalar_type() == at::kFloat, "x must be fp32 [rows, ", wt.k, "]");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({x.size(0), wt.n}, at::kFloat);
  linear(wt, xc.data_ptr<float>(), x.size(0), y.data_ptr<float>());
  return y;
}

bool int8_activations() { return kVnni; }

TORCH_LIBRARY(chatbot, m) {
  m.def("int8_activations() -> bool", &int8_activations);
  m.def("linear(Tensor x, Tensor weight, Tensor scale, Tensor bias) -> Tensor");
  m.impl("linear", c10::DispatchKey::CPU, TORCH_FN(linear_op));
  m.def("decode_step(Tensor ids, Tensor positions, Tensor slots, Tensor(a!) cache, Tensor embed, Tensor inv_freq, "
        "Tensor[] weights, int n_heads, int n_kv, int head_dim, float eps, Tensor logit_rows) -> Tensor");
  m.impl("decode_step", c10::DispatchKey::CPU, TORCH_FN(decode_step));
}
