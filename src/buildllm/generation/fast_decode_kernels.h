// The matrix-vector products of one decoding step, one kernel per weight format.
//
// A batch-1 step multiplies every weight matrix by one vector: each weight is read once and used
// once, so the speed is set by how fast the weights stream from memory. These kernels read each
// weight row exactly once per step for up to 8 rows of the batch together, keep everything else in
// registers, and turn int8 and int4 codes into numbers in registers (nothing dequantized is ever
// written to memory).
//
// Every kernel computes the dot products of several weight rows with M input vectors and writes
// them to out[m * stride + r]. fp32 and bf16 weights are row-major (out, in), as PyTorch stores
// them; int8 and int4 codes come in tiles of 16 rows (quantization.py stores them so). Either way
// the fast path reads the model's own tensors.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && defined(__AVX512VL__))
#error "the fast decoding step is written for AVX-512 with BF16; elsewhere generation uses the readable model"
#endif
#include <immintrin.h>

namespace buildllm {

inline float bf16_to_f32(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest, ties to even: what PyTorch does
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

// 16 bf16 numbers (fewer under `mask`, zeros elsewhere) as fp32.
inline __m512 widen16(const uint16_t* p, __mmask16 mask) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

// 16 fp32 numbers as bf16 (the low half of each lane) rounded as f32_to_bf16 rounds them: to
// nearest, ties to even, a NaN still a NaN, and subnormals kept (vcvtneps2bf16 flushes them).
inline __m512i to_bf16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v), high = _mm512_srli_epi32(u, 16);
    const __m512i tie = _mm512_and_si512(high, _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), tie)), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_or_epi32(rounded, nan, high, _mm512_set1_epi32(0x40));
}

// int8 and int4 kernels take their inputs as int8 numbers in blocks of 32 (the last filled with
// zeros) and their weight rows in tiles of 16 (quantization.py stores them so).
constexpr int64_t INPUT_BLOCK = 32, TILE_ROWS = 16;
inline int64_t input_blocks(int64_t n) { return (n + INPUT_BLOCK - 1) / INPUT_BLOCK; }
inline int64_t tiles_of(int64_t rows) { return (rows + TILE_ROWS - 1) / TILE_ROWS; }

// What a kernel reads: the M input vectors in the forms the kernels multiply, made once per input
// (fast_decode.cpp, prepare_inputs) and shared by every row of every layer that reads that input.
struct Inputs {
    int64_t in;                  // their length
    const float* x;              // fp32, (M, in)
    const uint16_t* xb;          // rounded to bf16, (M, in)
    // int8 and int4 weights: the bf16 inputs as int8 numbers times one scale per block of 32 (the
    // last block filled with zeros), and each block's sum of those numbers
    const int8_t* x8;            // (M, blocks * 32)
    const float* x8_scale;       // (M, blocks)
    const int32_t* x8_sum;       // (M, blocks)
    const float* group_sums;     // the sum of each group of the bf16 inputs (int4's offsets multiply it), (M, groups)
};

// An fp32 or bf16 kernel takes R consecutive weight rows and M input vectors at once and keeps
// their R x M sums in registers: each weight vector it loads serves M inputs and each input vector
// R rows. While the weights' stream from memory sets the speed, one row at a time streams best;
// once the batch makes the core's own instructions the limit (a 512-bit load costs as much as a
// multiply-add here), R rows at once divide the input loads by R. Where that happens was measured
// per format and batch (benchmarks/README.md): fp32 from batch 5; bf16 one row at a time while
// its M inputs stay in the L1 cache (GPT-2's 768-wide inputs), and 4 rows from batch 5 where the
// inputs are wider and come back from L2 for every row (GPT-2's 3072, a Llama's 2048 and 8192).
// (int8 and int4 kernels take a tile of 16 rows at once.)
template <int M>
constexpr int f32_rows_at_once() { return M <= 4 ? 1 : M <= 6 ? 4 : 3; }
constexpr int64_t L1_BYTES = 32768;
template <int M>
constexpr bool bf16_rows_by_four(int64_t in) { return M >= 5 && M * in * 2 > L1_BYTES; }

// Independent sums per accumulator: enough of them hide the latency of the multiply-adds.
template <int R, int M>
constexpr int unroll() { return R * M == 1 ? 4 : R * M == 2 ? 2 : 1; }

// A kernel may ask for its weights `ahead` bytes before it reads them (0: it leaves them to the
// processor's own prefetcher); how far pays depends on the processor, the format and the batch
// (fast_decode.cpp, prefetch_ahead).
inline void prefetch(const void* p, int64_t ahead) {
    if (ahead) _mm_prefetch((const char*)p + ahead, _MM_HINT_T0);
}

// The lanes of eight vectors summed, sum i in lane i: a transposing tree of 24 instructions
// where eight reductions one vector at a time take about 70.
inline __m256 reduce8(const __m512 (&a)[8]) {
    __m512 b[4], c[2];
    for (int i = 0; i < 4; ++i)  // the halves of a[2i] (lanes 0-1) and a[2i+1] (lanes 2-3), added
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; ++i)  // 128-bit lane j: four partial sums of a[4i + j]
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    __m512 e = _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1]));
    __m512 f = _mm512_add_ps(e, _mm512_shuffle_ps(e, e, _MM_SHUFFLE(1, 0, 3, 2)));  // lane j: sums j, j + 4
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castps512_ps256(_mm512_permutexvar_ps(order, f));
}

// The R x M sums, each over its U accumulators and 16 lanes: row r's with input m into out[m * stride + r].
template <int U, int R, int M>
inline void store_sums(__m512 (&acc)[U][R][M], float* out, int64_t stride) {
    constexpr int N = R * M;
    __m512 total[N];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) {
            total[r * M + m] = acc[0][r][m];
            for (int u = 1; u < U; ++u) total[r * M + m] = _mm512_add_ps(total[r * M + m], acc[u][r][m]);
        }
    if (N <= 2) {
        for (int i = 0; i < N; ++i) out[(i % M) * stride + i / M] = _mm512_reduce_add_ps(total[i]);
        return;
    }
    for (int i0 = 0; i0 < N; i0 += 8) {
        __m512 eight[8];
        for (int j = 0; j < 8; ++j) eight[j] = i0 + j < N ? total[i0 + j] : _mm512_setzero_ps();
        alignas(32) float sums[8];
        _mm256_store_ps(sums, reduce8(eight));
        for (int j = 0; j < 8 && i0 + j < N; ++j) out[((i0 + j) % M) * stride + (i0 + j) / M] = sums[j];
    }
}

template <int U, int R, int M>
inline void zero(__m512 (&acc)[U][R][M]) {
    for (int u = 0; u < U; ++u)
        for (int r = 0; r < R; ++r)
            for (int m = 0; m < M; ++m) acc[u][r][m] = _mm512_setzero_ps();
}

inline __mmask16 mask16(int64_t left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1); }
inline __mmask32 mask32(int64_t left) { return left >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << left) - 1); }

// Each kernel: the dot products of R weight rows (`ld` elements apart) with the M inputs, row r's
// with input m into out[m * stride + r].

template <int R, int M>
void dot_f32(const float* w, int64_t ld, const Inputs& in, float* out, int64_t stride, int64_t ahead) {
    constexpr int U = unroll<R, M>();
    const int64_t n = in.in;
    __m512 acc[U][R][M];
    zero(acc);
    int64_t k = 0;
    for (; k + 16 * U <= n; k += 16 * U)
        for (int u = 0; u < U; ++u) {
            __m512 wv[R];
            for (int r = 0; r < R; ++r) {
                prefetch(w + r * ld + k + 16 * u, ahead);
                wv[r] = _mm512_loadu_ps(w + r * ld + k + 16 * u);
            }
            for (int m = 0; m < M; ++m) {
                __m512 xv = _mm512_loadu_ps(in.x + m * n + k + 16 * u);
                for (int r = 0; r < R; ++r) acc[u][r][m] = _mm512_fmadd_ps(wv[r], xv, acc[u][r][m]);
            }
        }
    for (; k < n; k += 16) {
        __m512 wv[R];
        for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_ps(mask16(n - k), w + r * ld + k);
        for (int m = 0; m < M; ++m) {
            __m512 xv = _mm512_maskz_loadu_ps(mask16(n - k), in.x + m * n + k);
            for (int r = 0; r < R; ++r) acc[0][r][m] = _mm512_fmadd_ps(wv[r], xv, acc[0][r][m]);
        }
    }
    store_sums<U, R, M>(acc, out, stride);
}

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

template <int R, int M>
void dot_bf16(const uint16_t* w, int64_t ld, const Inputs& in, float* out, int64_t stride, int64_t ahead) {
    constexpr int U = unroll<R, M>();
    const int64_t n = in.in;
    __m512 acc[U][R][M];
    zero(acc);
    int64_t k = 0;
    for (; k + 32 * U <= n; k += 32 * U)  // 32 products per instruction, summed pairwise into 16 lanes
        for (int u = 0; u < U; ++u) {
            __m512i wv[R];
            for (int r = 0; r < R; ++r) {
                prefetch(w + r * ld + k + 32 * u, ahead);
                wv[r] = _mm512_loadu_si512(w + r * ld + k + 32 * u);
            }
            for (int m = 0; m < M; ++m) {
                __m512bh xv = as_bh(_mm512_loadu_si512(in.xb + m * n + k + 32 * u));
                for (int r = 0; r < R; ++r) acc[u][r][m] = _mm512_dpbf16_ps(acc[u][r][m], as_bh(wv[r]), xv);
            }
        }
    for (; k < n; k += 32) {
        __m512i wv[R];
        for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi16(mask32(n - k), w + r * ld + k);
        for (int m = 0; m < M; ++m) {
            __m512bh xv = as_bh(_mm512_maskz_loadu_epi16(mask32(n - k), in.xb + m * n + k));
            for (int r = 0; r < R; ++r) acc[0][r][m] = _mm512_dpbf16_ps(acc[0][r][m], as_bh(wv[r]), xv);
        }
    }
    store_sums<U, R, M>(acc, out, stride);
}

// sum + codes times the 4 int8 inputs at x + OFFSET, broadcast to every row: one vpdpbusd that
// reads its broadcast from memory itself. GCC writes _mm512_set1_epi32 as a separate broadcast
// load, and each load waits in the processor's scheduler beside the multiply-add it feeds: full of
// chains of multiply-adds, the scheduler then holds fewer of them at once (benchmarks/README.md).
// The address is a base register and a constant offset: with an index register as well, the
// combined instruction measured no faster (Intel's cores split it in two). AT&T syntax, GCC's and
// Clang's default.
template <int OFFSET>
inline __m512i dot4(__m512i sum, __m512i codes, const int8_t* x) {
    asm("vpdpbusd %c[offset](%[x])%{1to16%}, %[codes], %[sum]"
        : [sum] "+v"(sum)
        : [codes] "v"(codes), [x] "r"(x), [offset] "i"(OFFSET), "m"(*(const int32_t*)(x + OFFSET)));
    return sum;
}

// int8 weights (q * scale, one scale per row; quantization.Int8Linear) and int4 weights come in
// tiles of 16 rows laid out for `vpdpbusd`, which multiplies 64 pairs of bytes and sums them by
// fours into 16 int32 lanes: a run of 64 bytes holds 4 consecutive weights of each of the 16 rows,
// and one instruction multiplies them by the same 4 inputs (as int8 numbers, broadcast) into the
// 16 rows' sums. Where a row at a time takes 32 products per instruction (bf16 or int16 numbers)
// and a batch of 8 rows ran out of instructions near 2-2.5x its batch 1, this takes 64 (the
// measurements: benchmarks/README.md). The inputs are int8 numbers times one scale per block of 32
// (Inputs::x8, made once per input), as llama.cpp multiplies its Q8_0 and Q4_0 weights: each
// block's sum is exact in int32, and its scale multiplies it. The 16 rows' sums with input m go
// to out[m * stride + r].
//
// vpdpbusd takes one side unsigned: int8 codes become q + 128 (their top bit flipped), and
// sum (q + 128) x = sum q x + 128 sum x, so each block's sum starts from -128 sum x. int8: the
// runs of a tile follow each other 4 inputs at a time (quantization.Int8Linear), the inputs padded
// with zero weights to a multiple of 32; `scale`: the tile's 16 rows' (bf16), `rows` of them real.
// One block of 32 inputs of a tile: each of its 16 rows' sum of codes times inputs, from `start`.
// codes[j]: the rows' codes (unsigned bytes) for inputs 4j .. 4j + 3; x: the 32 inputs as int8
// numbers, 4 of them broadcast to each instruction. Below M = 4 rows of the batch, two chains of
// four, so that a row does not wait on each sum in turn; from 4 on, the rows' chains overlap and
// one chain saves the instruction that joins two.
template <int M>
inline __m512i block_dot(const __m512i* codes, const int8_t* x, __m512i start) {
    if constexpr (M >= 4)
        return [&]<int... J>(std::integer_sequence<int, J...>) {
            ((start = dot4<4 * J>(start, codes[J], x)), ...);
            return start;
        }(std::make_integer_sequence<int, 8>{});
    __m512i d0 = start, d1 = _mm512_setzero_si512();
    [&]<int... J>(std::integer_sequence<int, J...>) {
        ((d0 = dot4<4 * J>(d0, codes[J], x), d1 = dot4<16 + 4 * J>(d1, codes[4 + J], x)), ...);
    }(std::make_integer_sequence<int, 4>{});
    return _mm512_add_epi32(d0, d1);
}

template <int M>
void dot_int8(const int8_t* w, const uint16_t* scale, int64_t rows, const Inputs& in, float* out, int64_t stride,
              int64_t ahead) {
    const int64_t blocks = input_blocks(in.in);
    const __m512i flip = _mm512_set1_epi8(char(0x80));
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b, w += 512) {
        __m512i codes[8];  // codes[j]: the 16 rows' weights for inputs 32b + 4j .. + 3, plus 128
        for (int j = 0; j < 8; ++j) {
            prefetch(w + 64 * j, ahead);
            codes[j] = _mm512_xor_si512(_mm512_loadu_si512(w + 64 * j), flip);
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
            const int64_t mb = m * blocks + b;
            const __m512i sums = block_dot<M>(codes, in.x8 + mb * INPUT_BLOCK, _mm512_set1_epi32(-128 * in.x8_sum[mb]));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(in.x8_scale[mb]), acc[m]);
        }
    }
    const __m512 s = widen16(scale, mask16(rows));
    for (int m = 0; m < M; ++m) _mm512_storeu_ps(out + m * stride, _mm512_mul_ps(acc[m], s));
}

// int4 (packed by quantization.pack_codes): a group of `group` inputs is (q - 8) * scale + zero,
// q in 0..15, so its share of a row's sum is scale * sum q x + (zero - 8 scale) * sum x: per block
// of 32 inputs scale x8_scale sum q x8 (exact in int32), and once per group its offset
// zero - 8 scale times the sum of its bf16 inputs. Each 64 inputs of a tile are 8 runs of 64
// bytes, run j holding bytes 4j .. 4j + 3 of each of the 16 rows, and byte i of a row's 32 holds
// its input i in the low 4 bits and input i + 32 in the high ones: the low halves of run j are the
// rows' codes for inputs 4j .. 4j + 3 (block 2i), the high halves those for 32 + 4j .. 32 + 4j + 3
// (block 2i + 1), and each row of the batch multiplies both blocks at once, two independent chains.
// The high halves stay in place, 16 q (one instruction fewer per run than shifting them down), and
// their block's scale takes the 16 back out: exact, a power of two (the sums stay far below 2^24).
// A last 32 inputs are 4 runs, byte i holding inputs i and i + 16. `scale`, `zero`: the tile's,
// (groups, 16) bf16.
template <int M>
void dot_int4(const uint8_t* w, const uint16_t* scale, const uint16_t* zero, int64_t group, const Inputs& in,
              float* out, int64_t stride, int64_t ahead) {
    const int64_t n = in.in, blocks = n / INPUT_BLOCK, groups = n / group;
    const __m512i low_bits = _mm512_set1_epi8(15), high_bits = _mm512_set1_epi8(char(0xF0));
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    // Group g's scales, and its offsets zero - 8 scale.
    auto scales = [&](int64_t g) __attribute__((always_inline)) { return widen16(scale + g * 16, 0xffff); };
    auto offsets = [&](int64_t g, __m512 s) __attribute__((always_inline)) {
        return _mm512_fnmadd_ps(_mm512_set1_ps(8.f), s, widen16(zero + g * 16, 0xffff));
    };
    // Row m of the batch: its group g's offsets times its inputs' sum there, then block b's sums times their scales.
    auto add_offsets = [&](int m, __m512 offset, int64_t g) __attribute__((always_inline)) {
        acc[m] = _mm512_fmadd_ps(offset, _mm512_set1_ps(in.group_sums[m * groups + g]), acc[m]);
    };
    auto add_block = [&](int m, __m512i sums, __m512 s, int64_t b) __attribute__((always_inline)) {
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(s, _mm512_set1_ps(in.x8_scale[m * blocks + b])), acc[m]);
    };
    __m512 s = _mm512_setzero_ps(), offset = s;  // the group's, where a group spans 64 inputs or more
    int64_t k = 0;
    for (; k + 64 <= n; k += 64, w += 512) {
        __m512i low[8], high[8];
        for (int j = 0; j < 8; ++j) {
            prefetch(w + 64 * j, ahead);
            const __m512i run = _mm512_loadu_si512(w + 64 * j);
            low[j] = _mm512_and_si512(run, low_bits);
            high[j] = _mm512_and_si512(run, high_bits);
        }
        const int64_t b = k / INPUT_BLOCK, g = k / group;
        const bool two_groups = group == INPUT_BLOCK, new_group = two_groups || k % group == 0;
        if (!two_groups && new_group) s = scales(g), offset = offsets(g, s);
        const __m512 s0 = two_groups ? scales(g) : s, s1 = two_groups ? scales(g + 1) : s;
        const __m512 s1_16 = _mm512_mul_ps(s1, _mm512_set1_ps(1.f / 16));
        const __m512 offset0 = two_groups ? offsets(g, s0) : offset, offset1 = two_groups ? offsets(g + 1, s1) : offset;
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
            const int8_t* x = in.x8 + (m * blocks + b) * INPUT_BLOCK;
            __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512();
            [&]<int... J>(std::integer_sequence<int, J...>) {
                ((d0 = dot4<4 * J>(d0, low[J], x), d1 = dot4<32 + 4 * J>(d1, high[J], x)), ...);
            }(std::make_integer_sequence<int, 8>{});
            if (new_group) add_offsets(m, offset0, g);
            add_block(m, d0, s0, b);
            if (two_groups) add_offsets(m, offset1, g + 1);
            add_block(m, d1, s1_16, b + 1);
        }
    }
    if (k < n) {  // a last 32 inputs (then the groups are 32 inputs)
        __m512i codes[8];
        for (int j = 0; j < 4; ++j) {
            const __m512i run = _mm512_loadu_si512(w + 64 * j);
            codes[j] = _mm512_and_si512(run, low_bits);
            codes[4 + j] = _mm512_and_si512(_mm512_srli_epi16(run, 4), low_bits);
        }
        const int64_t b = k / INPUT_BLOCK;
        const __m512 s0 = scales(b), offset0 = offsets(b, s0);
        for (int m = 0; m < M; ++m) {
            add_offsets(m, offset0, b);
            add_block(m, block_dot<M>(codes, in.x8 + (m * blocks + b) * INPUT_BLOCK, _mm512_setzero_si512()), s0, b);
        }
    }
    for (int m = 0; m < M; ++m) _mm512_storeu_ps(out + m * stride, acc[m]);
}

}  // namespace buildllm

namespace buildllm {

// Small vector helpers for attention over the KV cache (float or bf16 keys and values).

inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load16(const uint16_t* p, __mmask16 mask) { return widen16(p, mask); }

// The query's dot products with the keys of positions j0 .. j0 + count - 1 (count <= 8, `step`
// apart), times `scale`, into scores[0 .. count): eight dot products summed by one transposing
// reduction (reduce8), where a reduction per position costs more than its multiply-adds.
template <typename T>
inline void key_scores(const float* q, const T* keys, int64_t step, int64_t D, int count, float scale, float* scores) {
    __m512 part[8];
    for (int i = 0; i < 8; ++i) part[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 mask = mask16(D - d);
        const __m512 qv = load16(q + d, mask);
        for (int i = 0; i < 8; ++i)  // positions past `count` load nothing
            part[i] = _mm512_fmadd_ps(qv, load16(keys + i * step + d, i < count ? mask : __mmask16(0)), part[i]);
    }
    _mm256_mask_storeu_ps(scores, __mmask8((1u << count) - 1), _mm256_mul_ps(reduce8(part), _mm256_set1_ps(scale)));
}

// out[0 .. D) = sum over positions j of weights[j] * values[j * step .. + D), in registers 64
// numbers at a time (positions of weight 0, the masked ones, skipped).
template <typename T>
inline void weighted_values(const float* weights, const T* values, int64_t step, int64_t positions, int64_t D, float* out) {
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
        __m512 acc[4];
        for (int c = 0; c < 4; ++c) acc[c] = _mm512_setzero_ps();
        for (int64_t j = 0; j < positions; ++j) {
            if (weights[j] == 0.f) continue;
            const __m512 a = _mm512_set1_ps(weights[j]);
            for (int c = 0; c < 4; ++c)
                if (d0 + 16 * c < D) acc[c] = _mm512_fmadd_ps(a, load16(values + j * step + d0 + 16 * c, mask16(D - d0 - 16 * c)), acc[c]);
        }
        for (int c = 0; c < 4; ++c)
            if (d0 + 16 * c < D) _mm512_mask_storeu_ps(out + d0 + 16 * c, mask16(D - d0 - 16 * c), acc[c]);
    }
}

// e^x for 16 numbers, within about an ulp: x = k ln 2 + r with |r| <= ln(2) / 2, Cephes' degree-6
// polynomial for e^r, and 2^k applied exactly (scalef also overflows to inf and underflows to 0).
inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.8f)), _mm512_set1_ps(-104.f));
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, k);
}

// 16 numbers rounded to bf16 (to nearest, ties to even) and back.
inline __m512 round16_bf16(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

}  // namespace buildllm
