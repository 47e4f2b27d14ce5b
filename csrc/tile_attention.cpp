// tile_attention: self-attention of packed bfloat16 sequences of up to 128 tokens on the CPU's AMX tile units
// (contract: echo/ops/attention.py, varlen_attention), head_dim 64, inference only. SDPA spends as long on a
// 126-token sequence as the two matrix products would take on AMX several times over (a fifth of a bf16 encode
// of 60 s clips went there), and short_attention's vector FMAs run at a fraction of the tiles' rate.
//
// One work item is one (sequence, head), padded to 32 tokens: Q K^T on the tiles in float32, the softmax in
// float32 vectors, its numerators rounded to bf16 for P V on the tiles (as torch's SDPA rounds them), the
// division by the sum last, in float32. The tiles take their B operand in pairs of rows (VNNI): K^T's pairs of
// channels are K's own rows read as 32-bit words, transposed; V's pairs of keys are two rows interleaved.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_vector.h"
#include "sequences.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define ECHO_HAS_TILES 1
// GCC 12's AVX-512 headers trip its own -Wmaybe-uninitialized (their `__Y = __Y` placeholders)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define ECHO_TILES __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16")))
#else
#define ECHO_HAS_TILES 0
#endif

namespace echo {
namespace {

constexpr int64_t kHeadDim = 64;
constexpr int64_t kMaxTokens = 128;
typedef uint16_t u16x32 __attribute__((vector_size(64)));

#if ECHO_HAS_TILES

// The CPU has AMX-TILE, AMX-BF16 and AVX-512 (F, BW, BF16), and Linux lets this process use the tile registers
// (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, once per process; oneDNN asks the same).
bool tiles_usable() {
  static const bool usable = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0, bf16 = 0, unused = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !__get_cpuid_count(7, 1, &bf16, &unused, &unused, &unused))
      return false;
    const bool avx512 = (ebx >> 16 & 1) && (ebx >> 30 & 1) && (bf16 >> 5 & 1), amx = (edx >> 22 & 1) && (edx >> 24 & 1);
    constexpr long kRequestPermission = 0x1023, kTileData = 18;
    return avx512 && amx && syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return usable;
}

// ldtilecfg's 64-byte layout: palette 1, every tile 16 rows of 64 bytes (tiles 0-3 accumulate, 4-5 hold
// the A operand, 6-7 the B operand).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// One thread's buffers for one (sequence, head); rows and columns past the sequence are zero where a tile reads.
struct Scratch {
  alignas(64) c10::BFloat16 q[16][kHeadDim];  // a partial last block of queries
  alignas(64) uint32_t kt[kHeadDim / 2][kMaxTokens];      // kt[p][j]: channels 2p, 2p + 1 of key j
  alignas(64) c10::BFloat16 vv[kMaxTokens / 2][2 * kHeadDim];  // vv[r][2c + t]: channel c of value 2r + t
  alignas(64) float scores[kMaxTokens][kMaxTokens];
  alignas(64) c10::BFloat16 weights[kMaxTokens][kMaxTokens];  // softmax numerators
  alignas(64) float out[kMaxTokens][kHeadDim];
  float total[kMaxTokens];
};

// e^x for x <= 0 in the lanes of `keep` (0 elsewhere, and where x < -87: no subnormal weights, whose products
// cost the CPU a microcode assist; a NaN stays NaN, as in the reference's softmax, where a mask of x >= -87 made
// it a weight of 0): x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor polynomial of degree 6
// (relative error < 2e-7, far under the bf16 rounding of the numerators), 2^n by vscalefps. The AVX-512 twin of
// cpu_vector.h's exp_nonpositive, which must also compile for AVX2: with vscalefps, masks and the rounding
// instruction it takes about half the instructions, and the softmax is this kernel's largest part.
ECHO_TILES ECHO_INLINE __m512 masked_exp_nonpositive(__m512 x, __mmask16 keep) {
  keep = _mm512_mask_cmp_ps_mask(keep, x, _mm512_set1_ps(-87.f), _CMP_NLT_UQ);  // x >= -87 or NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147180559945f), x);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 1.f / 2, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

// Softmax numerators and their sums of rows i..i + kRows - 1 of the scores. Several rows at once: one row's
// chain (maximum, reduction across lanes, exponentials, sum) is mostly latency.
template <int kRows>
ECHO_TILES ECHO_INLINE void softmax_rows(Scratch& s, int64_t i, int64_t blocks, int64_t padded, __mmask16 last) {
  const __m512 scale = _mm512_set1_ps(1.f / std::sqrt(static_cast<float>(kHeadDim)));
  __m512 top[kRows], shift[kRows], total[kRows];
  for (int r = 0; r < kRows; ++r) top[r] = _mm512_set1_ps(-INFINITY);
  for (int64_t c = 0; c < blocks; ++c)
    for (int r = 0; r < kRows; ++r)
      top[r] = _mm512_mask_max_ps(top[r], c + 1 < blocks ? 0xffff : last, top[r],
                                  _mm512_load_ps(s.scores[i + r] + 16 * c));
  for (int r = 0; r < kRows; ++r) {
    shift[r] = _mm512_mul_ps(_mm512_set1_ps(-_mm512_reduce_max_ps(top[r])), scale);
    total[r] = _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < padded / 16; ++c) {
    const __mmask16 real = c + 1 < blocks ? 0xffff : c + 1 == blocks ? last : 0;
    for (int r = 0; r < kRows; ++r) {
      const __m512 e = masked_exp_nonpositive(
          _mm512_fmadd_ps(_mm512_maskz_load_ps(real, s.scores[i + r] + 16 * c), scale, shift[r]), real);
      total[r] = _mm512_add_ps(total[r], e);
      _mm256_store_si256(reinterpret_cast<__m256i*>(s.weights[i + r] + 16 * c),
                         reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(e)));
    }
  }
  for (int r = 0; r < kRows; ++r) s.total[i + r] = _mm512_reduce_add_ps(total[r]);
}

// One head of one sequence of `length` tokens; q, k, v rows `stride` elements apart, out rows `out_stride`.
ECHO_TILES void attend(Scratch& s, const c10::BFloat16* q, const c10::BFloat16* k, const c10::BFloat16* v,
                       c10::BFloat16* out, int64_t length, int64_t stride, int64_t out_stride) {
  const int64_t blocks = (length + 15) / 16;  // 16-token blocks holding real tokens
  const int64_t padded = (length + 31) / 32 * 32;  // P V takes keys 32 at a time
  const int64_t full = length / 16;  // query blocks read in place; a partial last one is copied, zero-padded
  for (int64_t i = 0; i < 16 && 16 * full < length; ++i) {
    if (16 * full + i < length)
      std::memcpy(s.q[i], q + (16 * full + i) * stride, sizeof s.q[i]);
    else
      std::memset(s.q[i], 0, sizeof s.q[i]);
  }
  for (int64_t kb = 0; kb < blocks; ++kb)  // K's rows as 32-bit words, transposed 16 x 16 at a time
    for (int64_t w = 0; w < kHeadDim / 2; w += 16) {
      v16 block[16];
      for (int64_t l = 0; l < 16; ++l) {
        const int64_t j = 16 * kb + l;
        block[l] = j < length ? load16(reinterpret_cast<const float*>(k + j * stride) + w) : v16{};
      }
      transpose16(block);
      for (int64_t l = 0; l < 16; ++l) std::memcpy(&s.kt[w + l][16 * kb], &block[l], sizeof block[l]);
    }
  for (int64_t r = 0; r < padded / 2; ++r)  // pairs of value rows interleaved, 32 channels at a time
    for (int64_t c = 0; c < kHeadDim; c += 32) {
      u16x32 even{}, odd{};
      if (2 * r < length) std::memcpy(&even, v + 2 * r * stride + c, sizeof even);
      if (2 * r + 1 < length) std::memcpy(&odd, v + (2 * r + 1) * stride + c, sizeof odd);
      const u16x32 low = __builtin_shufflevector(even, odd, 0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47);
      const u16x32 high = __builtin_shufflevector(even, odd, 16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54,
                                                  23, 55, 24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31,
                                                  63);
      std::memcpy(&s.vv[r][2 * c], &low, sizeof low);
      std::memcpy(&s.vv[r][2 * c + 32], &high, sizeof high);
    }
  // scores of every query block against every key block: two 32-channel steps per 16 x 16 tile
  for (int64_t qb = 0; qb < blocks; ++qb) {
    const c10::BFloat16* block = qb < full ? q + 16 * qb * stride : s.q[0];
    const int64_t block_stride = (qb < full ? stride : kHeadDim) * static_cast<int64_t>(sizeof *q);
    _tile_loadd(4, block, block_stride);
    _tile_loadd(5, block + 32, block_stride);
    for (int64_t kb = 0; kb < blocks; ++kb) {
      _tile_zero(0);
      _tile_loadd(6, &s.kt[0][16 * kb], sizeof s.kt[0]);
      _tile_loadd(7, &s.kt[16][16 * kb], sizeof s.kt[0]);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(0, 5, 7);
      _tile_stored(0, &s.scores[16 * qb][16 * kb], sizeof s.scores[0]);
    }
  }
  // softmax numerators e^(scale (s - max)) over the real keys, four rows at a time; 0 past the real ones
  const __mmask16 last = length % 16 ? static_cast<__mmask16>((1u << (length % 16)) - 1) : 0xffff;
  int64_t i = 0;
  for (; i + 4 <= length; i += 4) softmax_rows<4>(s, i, blocks, padded, last);
  for (; i < length; ++i) softmax_rows<1>(s, i, blocks, padded, last);
  for (; i < 16 * blocks; ++i) std::memset(s.weights[i], 0, padded * sizeof(c10::BFloat16));
  // P V: four 16-channel accumulators per query block, keys 32 at a time
  for (int64_t qb = 0; qb < blocks; ++qb) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kb = 0; kb < padded / 32; ++kb) {
      _tile_loadd(4, &s.weights[16 * qb][32 * kb], sizeof s.weights[0]);
      _tile_loadd(6, &s.vv[16 * kb][0], sizeof s.vv[0]);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(7, &s.vv[16 * kb][32], sizeof s.vv[0]);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(6, &s.vv[16 * kb][64], sizeof s.vv[0]);
      _tile_dpbf16ps(2, 4, 6);
      _tile_loadd(7, &s.vv[16 * kb][96], sizeof s.vv[0]);
      _tile_dpbf16ps(3, 4, 7);
    }
    _tile_stored(0, &s.out[16 * qb][0], sizeof s.out[0]);
    _tile_stored(1, &s.out[16 * qb][16], sizeof s.out[0]);
    _tile_stored(2, &s.out[16 * qb][32], sizeof s.out[0]);
    _tile_stored(3, &s.out[16 * qb][48], sizeof s.out[0]);
  }
  for (int64_t i = 0; i < length; ++i) {
    const float inverse = 1.f / s.total[i];
    for (int64_t c = 0; c < kHeadDim; c += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * out_stride + c),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(s.out[i] + c),
                                                                                     _mm512_set1_ps(inverse)))));
  }
}

// Items [begin, end) of one thread; the tile configuration is per thread.
ECHO_TILES void attend_items(const c10::BFloat16* in, c10::BFloat16* result, const int64_t* bounds, int64_t dim,
                             int64_t heads, int64_t begin, int64_t end) {
  const std::unique_ptr<Scratch> scratch(new Scratch);  // every element a tile or the softmax reads is written first
  const TileConfig config;
  _tile_loadconfig(&config);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t sequence = item / heads, h = item % heads, first = bounds[sequence];
    const int64_t length = bounds[sequence + 1] - first;
    const c10::BFloat16* q = in + first * 3 * dim + h * kHeadDim;
    c10::BFloat16* out = result + first * dim + h * kHeadDim;
    if (length == 1)  // its one weight is 1: a pass's padding rows are such sequences, many of them
      std::memcpy(out, q + 2 * dim, kHeadDim * sizeof *out);
    else
      attend(*scratch, q, q + dim, q + 2 * dim, out, length, 3 * dim, dim);
  }
  _tile_release();
}

#else

bool tiles_usable() { return false; }

#endif

bool tile_attention_usable() { return tiles_usable(); }

at::Tensor tile_attention_cpu(const at::Tensor& qkv, const at::Tensor& cu_seqlens, int64_t heads) {
  TORCH_CHECK(tiles_usable(), "tile_attention: this CPU (or its kernel) offers no AMX tiles; "
              "check torch.ops.echo.tile_attention_usable() first");
  TORCH_CHECK(qkv.scalar_type() == at::kBFloat16, "tile_attention: qkv must be bfloat16, got ", qkv.scalar_type());
  const at::Tensor offsets = checked_offsets("tile_attention", qkv, cu_seqlens, heads, kHeadDim, kMaxTokens);
  const int64_t* bounds = offsets.data_ptr<int64_t>();
  const int64_t sequences = offsets.size(0) - 1;
  at::Tensor out = at::empty({qkv.size(0), qkv.size(1) / 3}, qkv.options());
#if ECHO_HAS_TILES
  const c10::BFloat16* in = qkv.data_ptr<c10::BFloat16>();
  c10::BFloat16* result = out.data_ptr<c10::BFloat16>();
  const int64_t dim = qkv.size(1) / 3;
  parallel_over_items(bounds, sequences, heads, 8, [&](int64_t begin, int64_t end) {
    attend_items(in, result, bounds, dim, heads, begin, end);
  });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(echo, m) {
  m.def("tile_attention(Tensor qkv, Tensor cu_seqlens, int heads) -> Tensor");
  m.def("tile_attention_usable() -> bool", &tile_attention_usable);
}

TORCH_LIBRARY_IMPL(echo, CPU, m) { m.impl("tile_attention", &tile_attention_cpu); }

}  // namespace echo
