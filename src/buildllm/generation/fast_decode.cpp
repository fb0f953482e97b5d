// One decoding step of a decoder-only transformer, in C++: buildllm.generation.fast_decode.
//
// The step the readable model takes for one new token per row (``model(tokens, kv_cache=cache)``),
// computed with the model's own weight tensors, in one parallel region: the threads split every
// matrix-vector product by rows and meet at a barrier between the stages, where PyTorch would pay
// its per-operation overhead about 200 times per token. The numbers follow the readable model's
// at its precision: fp32 throughout for an fp32 model; for a bf16 model every stage's output is
// rounded to bf16 where PyTorch's would be; int8 and int4 products take bf16 inputs and give bf16
// outputs, as PyTorch's int8/int4 kernels do (and multiply them as int8 numbers per block of 32,
// as llama.cpp does: fast_decode_kernels.h).
//
// The Python side (fast_decode.py) reads a model into a Decoder: per layer its norms, the linear
// layers that make queries, keys and values (one fused, as GPT-2's, or three), the output
// projection, and the feed-forward's linear layers (GELU or ReLU^2 after one, SwiGLU over two).
// ATen's tensor and PyTorch's pybind11 casters, all the step uses: parsing the whole of
// <torch/extension.h> (autograd, nn, optim, ...) is most of the time a build takes.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "fast_decode_kernels.h"

namespace buildllm {

enum Format { F32 = 0, BF16 = 1, INT8 = 2, INT4 = 3 };
enum Activation { GELU_TANH = 0, SWIGLU = 1, RELU2 = 2 };
enum NormKind { LAYER_NORM = 0, RMS_NORM = 1 };

inline float activation_round(float v, bool bf16) { return bf16 ? round_bf16(v) : v; }

struct Norm {
    int64_t kind;
    float eps;
    std::vector<float> weight, bias;

    Norm(int64_t kind, double eps, at::Tensor weight, std::optional<at::Tensor> bias)
        : kind(kind), eps(float(eps)) {
        auto w = weight.to(at::kFloat).contiguous();
        this->weight.assign(w.data_ptr<float>(), w.data_ptr<float>() + w.numel());
        if (bias) {
            auto b = bias->to(at::kFloat).contiguous();
            this->bias.assign(b.data_ptr<float>(), b.data_ptr<float>() + b.numel());
        }
    }

    // y = norm(x) over n features, rounded as the readable model rounds (see RMSNorm in blocks.py),
    // 16 features at a time.
    void apply(const float* x, float* y, int64_t n, bool bf16) const {
        auto round = [bf16](__m512 v) { return bf16 ? round16_bf16(v) : v; };
        auto sum_over = [&](auto term) {  // the sum of term(16 features, their mask) over x
            __m512 sum = _mm512_setzero_ps();
            for (int64_t k = 0; k < n; k += 16) {
                const __mmask16 m = mask16(n - k);
                sum = _mm512_add_ps(sum, term(_mm512_maskz_loadu_ps(m, x + k), m));
            }
            return _mm512_reduce_add_ps(sum);
        };
        if (kind == LAYER_NORM) {
            const __m512 mean = _mm512_set1_ps(sum_over([](__m512 v, __mmask16) { return v; }) / n);
            const float var = sum_over([&](__m512 v, __mmask16 m) {
                const __m512 d = _mm512_maskz_sub_ps(m, v, mean);
                return _mm512_mul_ps(d, d);
            }) / n;
            const __m512 rstd = _mm512_set1_ps(1.f / std::sqrt(var + eps));
            for (int64_t k = 0; k < n; k += 16) {
                const __mmask16 m = mask16(n - k);
                const __m512 b = bias.empty() ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, bias.data() + k);
                const __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + k), mean), rstd);
                _mm512_mask_storeu_ps(y + k, m, round(_mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m, weight.data() + k), b)));
            }
        } else {
            const float squares = sum_over([](__m512 v, __mmask16) { return _mm512_mul_ps(v, v); });
            const __m512 rrms = _mm512_set1_ps(1.f / std::sqrt(squares / n + eps));
            for (int64_t k = 0; k < n; k += 16) {
                const __mmask16 m = mask16(n - k);
                const __m512 v = round(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), rrms));
                _mm512_mask_storeu_ps(y + k, m, round(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, weight.data() + k), v)));
            }
        }
    }
};

struct Linear {
    int64_t format, in, out, group;
    at::Tensor weight, scale, zero;  // the model's own tensors, not copies
    const void* w = nullptr;
    const uint16_t *s = nullptr, *z = nullptr;
    std::vector<float> bias;
    bool bf16_activations;

    // `in`, `out`: the layer's sizes (int8 and int4 codes have their rows padded to tiles of 16,
    // and int8's inputs to a multiple of 32: quantization.py).
    Linear(int64_t format, at::Tensor weight, std::optional<at::Tensor> scale, std::optional<at::Tensor> zero,
           std::optional<at::Tensor> bias, int64_t group, bool bf16_activations, int64_t in, int64_t out)
        : format(format), in(in), out(out), group(group), weight(weight), bf16_activations(bf16_activations) {
        TORCH_CHECK(weight.is_contiguous() && weight.dim() == 2, "fast_decode: a weight must be a contiguous matrix");
        const bool tiled = format == INT8 || format == INT4;
        const int64_t stored = format == INT4 ? in / 2 : format == INT8 ? input_blocks(in) * INPUT_BLOCK : in;
        TORCH_CHECK(weight.size(0) == (tiled ? tiles_of(out) * TILE_ROWS : out) && weight.size(1) == stored,
                    "fast_decode: the weight's shape does not match the layer's sizes");
        if (scale) this->scale = scale->contiguous(), s = (const uint16_t*)this->scale.data_ptr();
        if (zero) this->zero = zero->contiguous(), z = (const uint16_t*)this->zero.data_ptr();
        w = weight.data_ptr();
        TORCH_CHECK(format != INT4 || (group >= 32 && group % 32 == 0 && in % group == 0),
                    "fast_decode: int4 groups must be a multiple of 32 inputs");
        if (bias) {
            auto b = bias->to(at::kFloat).contiguous();
            this->bias.assign(b.data_ptr<float>(), b.data_ptr<float>() + b.numel());
            if (bf16_activations)  // the quantized layers add their fp32 bias in the activations' dtype
                for (auto& v : this->bias) v = round_bf16(v);
        }
    }
};

// Up to 8 rows of the batch share each pass over a weight row. At batch 1 the weight rows are read
// one after another (one sequential stream per thread is what the processor's prefetcher follows
// best); with more rows of the batch an fp32 kernel takes a few weight rows at once, a bf16 one
// too where its inputs are wide (f32_rows_at_once, bf16_rows_by_four in fast_decode_kernels.h).
// int8 and int4 kernels take a tile of 16 rows. Each asks for its weights ahead (prefetch_ahead).
constexpr int64_t MAX_M = 8;
constexpr int64_t BLOCK_ROWS = 16;

// Rows r0..r1, R at a time (the rest one at a time): pass(R, r) for each first row r.
template <int R, typename Pass>
inline void in_passes(int64_t r0, int64_t r1, Pass&& pass) {
    int64_t r = r0;
    for (; r + R <= r1; r += R) pass(std::integral_constant<int, R>{}, r);
    for (; r < r1; ++r) pass(std::integral_constant<int, 1>{}, r);
}

// How far ahead (bytes) a kernel asks for the weights it reads next, by format and batch; 0 leaves
// them to the processor's own prefetcher. What pays was measured on two processors
// (benchmarks/README.md): on AMD's Zen 4, a prefetch only once several rows of the batch slow the
// stream (and int4's codes, the most instructions per byte, at every batch); on an Intel Xeon with
// AMX, 1 KiB ahead for fp32 and bf16 at batch 1 (farther lost) and 8 KiB everywhere else.
inline int64_t prefetch_ahead(int64_t format, int64_t M) {
    static const bool amd = __builtin_cpu_is("amd");
    if (!amd) return M == 1 && (format == F32 || format == BF16) ? 1024 : 8192;
    if (format == INT4) return 4096;
    return M < 4 ? 0 : format == F32 ? 8192 : 2048;
}

// Rows [r0, r1) (at most BLOCK_ROWS, r0 a multiple of it) of L for M inputs: out[m * BLOCK_ROWS + r - r0],
// so that each input's outputs lie side by side and are finished 16 at a time.
template <int M>
void rows_of(const Linear& L, int64_t r0, int64_t r1, const Inputs& in, float* out) {
    const int64_t n = L.in, ahead = prefetch_ahead(L.format, M);
    switch (L.format) {
        case F32:
            in_passes<f32_rows_at_once<M>()>(r0, r1, [&](auto rows, int64_t r) {
                dot_f32<decltype(rows)::value, M>((const float*)L.w + r * n, n, in, out + (r - r0), BLOCK_ROWS, ahead);
            });
            break;
        case BF16:
            if (bf16_rows_by_four<M>(n))
                in_passes<4>(r0, r1, [&](auto rows, int64_t r) {
                    dot_bf16<decltype(rows)::value, M>((const uint16_t*)L.w + r * n, n, in, out + (r - r0), BLOCK_ROWS, ahead);
                });
            else
                for (int64_t r = r0; r < r1; ++r) dot_bf16<1, M>((const uint16_t*)L.w + r * n, n, in, out + (r - r0), BLOCK_ROWS, ahead);
            break;
        case INT8:  // a tile of 16 rows
            static_assert(BLOCK_ROWS == TILE_ROWS, "int8 and int4 kernels take a tile at a time");
            dot_int8<M>((const int8_t*)L.w + r0 * L.weight.size(1), L.s + r0, r1 - r0, in, out, BLOCK_ROWS, ahead);
            break;
        default: {  // a tile of 16 rows (pack_codes); its scales and zeros (groups, 16)
            const int64_t groups = n / L.group;
            dot_int4<M>((const uint8_t*)L.w + r0 * L.weight.size(1), L.s + r0 * groups, L.z + r0 * groups, L.group, in,
                        out, BLOCK_ROWS, ahead);
        }
    }
}

// f(std::integral_constant<int, M>{}) for a batch of M rows known at run time, 1 to MAX_M.
template <typename F>
inline void with_batch(int64_t M, F&& f) {
    switch (M) {
        case 1: f(std::integral_constant<int, 1>{}); break;
        case 2: f(std::integral_constant<int, 2>{}); break;
        case 3: f(std::integral_constant<int, 3>{}); break;
        case 4: f(std::integral_constant<int, 4>{}); break;
        case 5: f(std::integral_constant<int, 5>{}); break;
        case 6: f(std::integral_constant<int, 6>{}); break;
        case 7: f(std::integral_constant<int, 7>{}); break;
        default: f(std::integral_constant<int, 8>{});
    }
}

void rows_of(int64_t M, const Linear& L, int64_t r0, int64_t r1, const Inputs& in, float* out) {
    with_batch(M, [&](auto m) { rows_of<decltype(m)::value>(L, r0, r1, in, out); });
}

// Where a linear layer's output goes: stored, or added to the residual stream.
struct Destination {
    float* data;
    int64_t stride;  // between rows of the batch
    bool add;
};

struct Layer {
    Norm norm1;
    std::vector<Linear> attn_in;  // [qkv] or [q, k, v]
    Linear attn_out;
    std::optional<Norm> q_norm, k_norm;
    Norm norm2;
    std::vector<Linear> mlp_in;  // [fc] or [gate, up]
    Linear mlp_out;
};

class Decoder {
   public:
    Decoder(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t activation, bool bf16_activations,
            at::Tensor wte, std::optional<at::Tensor> wpe, std::optional<at::Tensor> rope_freqs, Norm final_norm,
            Linear head)
        : n_heads(n_heads), n_kv_heads(n_kv_heads), head_dim(head_dim), activation(activation), bf16(bf16_activations),
          wte(wte.contiguous()), final_norm(std::move(final_norm)), head(std::move(head)) {
        TORCH_CHECK(wte.scalar_type() == at::kFloat || wte.scalar_type() == at::kBFloat16,
                    "fast_decode: the token embedding must be fp32 or bf16");
        if (wpe) this->wpe = wpe->contiguous();
        if (rope_freqs) {
            auto f = rope_freqs->to(at::kFloat).contiguous();
            freqs.assign(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
        }
        emb_dim = wte.size(1);
    }

    void add_layer(Norm norm1, std::vector<Linear> attn_in, Linear attn_out, std::optional<Norm> q_norm,
                   std::optional<Norm> k_norm, Norm norm2, std::vector<Linear> mlp_in, Linear mlp_out) {
        layers.push_back(Layer{std::move(norm1), std::move(attn_in), std::move(attn_out), std::move(q_norm),
                               std::move(k_norm), std::move(norm2), std::move(mlp_in), std::move(mlp_out)});
        int64_t hidden = layers.back().mlp_out.in;
        hidden_dim = std::max(hidden_dim, hidden);
        if (layers.back().mlp_in.size() == 2) hidden_dim = std::max(hidden_dim, 2 * hidden);
    }

    // Logits (batch, vocab) for one new token per row; the cache's keys and values at position
    // `length` are written. keys, values: (layers, batch, kv_heads, positions, head_dim); valid:
    // (batch, positions), False at left padding (read only when `padded`). With `pick`, also each
    // row's index of its largest logit, (batch,) int64 (else an empty tensor): see pick_largest.
    std::tuple<at::Tensor, at::Tensor> step(at::Tensor tokens, at::Tensor keys, at::Tensor values, at::Tensor valid,
                                            int64_t length, bool padded, bool pick) {
        TORCH_CHECK(tokens.dim() == 1 && tokens.scalar_type() == at::kLong, "fast_decode: tokens must be (batch,) int64");
        TORCH_CHECK(keys.dim() == 5 && keys.stride(4) == 1 && values.stride(4) == 1 && keys.strides() == values.strides(),
                    "fast_decode: the cache must be (layers, batch, heads, positions, head_dim) with contiguous heads");
        TORCH_CHECK(length < keys.size(3), "fast_decode: the cache is full");
        batch = tokens.size(0);
        auto tok = tokens.contiguous();
        auto ok = valid.to(at::kBool).contiguous();
        const bool* valid_ptr = ok.data_ptr<bool>();
        positions.assign(batch, length);
        if (padded) {  // a row's position counts its real tokens only (models/layers.positions_and_mask)
            for (int64_t b = 0; b < batch; ++b) {
                int64_t seen = 0;
                for (int64_t j = 0; j <= length; ++j) seen += valid_ptr[b * ok.size(1) + j];
                positions[b] = std::max<int64_t>(seen - 1, 0);
            }
        }
        threads = std::max(1, at::get_num_threads());
        allocate(keys.size(3));
        auto logits = at::empty({batch, head.out}, at::kFloat);
        auto picks = at::empty({pick ? batch : 0}, at::kLong);
        const int64_t* ids = tok.data_ptr<int64_t>();
#pragma omp parallel num_threads(threads)
        {
            embed(ids);
            for (size_t l = 0; l < layers.size(); ++l) {
                const Layer& layer = layers[l];
                normalize(layer.norm1, x.data(), h.data(), emb_dim);
                attention_inputs(layer);
                place_keys_and_values(layer, keys, values, l, length);
                attend(keys, values, l, length, padded, valid_ptr, ok.size(1));
                run_linears({&layer.attn_out}, context.data(), {{x.data(), emb_dim, true}});
                normalize(layer.norm2, x.data(), h.data(), emb_dim);
                feed_forward(layer);
            }
            normalize(final_norm, x.data(), h.data(), emb_dim);
            run_linears({&head}, h.data(), {{logits.data_ptr<float>(), head.out, false}});
            if (pick) pick_largest(logits.data_ptr<float>(), picks.data_ptr<int64_t>());
        }
        return {logits, picks};
    }

   private:
    int64_t n_heads, n_kv_heads, head_dim, activation, emb_dim, hidden_dim = 0, batch = 0;
    int threads = 1;  // of the parallel region (asked of PyTorch outside it: inside, it answers 1)
    bool bf16;
    at::Tensor wte, wpe;
    std::vector<float> freqs;
    Norm final_norm;
    Linear head;
    std::vector<Layer> layers;
    // Work space, reused across steps.
    std::vector<int64_t> positions;
    std::vector<float> x, h, qkv, context, hidden, activated, partial, scores;
    std::vector<uint16_t> input_b;  // the input of a linear layer, as Inputs has it
    std::vector<float> group_sums;
    std::vector<int8_t> input_8;
    std::vector<float> input_8_scale;
    std::vector<int32_t> input_8_sum;
    struct Candidate {  // a row's largest logit so far, and where
        float value;
        int64_t index;
        bool nan;
    };
    std::vector<Candidate> candidates;  // (threads, batch)

    int64_t qkv_width() const { return (n_heads + 2 * n_kv_heads) * head_dim; }

    void allocate(int64_t max_positions) {
        int64_t widest = std::max({emb_dim, hidden_dim, n_heads * head_dim});
        x.resize(batch * emb_dim);
        h.resize(batch * emb_dim);
        qkv.resize(batch * qkv_width());
        context.resize(batch * n_heads * head_dim);
        hidden.resize(batch * std::max<int64_t>(hidden_dim, 1));
        activated.resize(batch * std::max<int64_t>(hidden_dim, 1));
        input_b.resize(batch * widest);
        const int64_t blocks = input_blocks(widest);
        group_sums.resize(batch * widest);
        input_8.resize(batch * blocks * INPUT_BLOCK);
        input_8_scale.resize(batch * blocks);
        input_8_sum.resize(batch * blocks);
        partial.resize(threads * BLOCK_ROWS * MAX_M);
        candidates.resize(threads * batch);
        scores.resize(threads * max_positions);
    }

    static int thread_id() {
#ifdef _OPENMP
        return omp_get_thread_num();
#else
        return 0;
#endif
    }

    void embed(const int64_t* ids) {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; ++b) {
            float* row = x.data() + b * emb_dim;
            for (int64_t i = 0; i < emb_dim; i += 16) {
                const __mmask16 mask = mask16(emb_dim - i);
                __m512 v = row_of(wte, ids[b], i, mask);
                if (wpe.defined()) {
                    v = _mm512_add_ps(v, row_of(wpe, positions[b], i, mask));
                    if (bf16) v = _mm512_castsi512_ps(_mm512_slli_epi32(to_bf16(v), 16));
                }
                _mm512_mask_storeu_ps(row + i, mask, v);
            }
        }
    }

    // Row `row` of an fp32 or bf16 table, its 16 numbers from `col` (fewer under `mask`), as fp32.
    static __m512 row_of(const at::Tensor& t, int64_t row, int64_t col, __mmask16 mask) {
        int64_t at = row * t.size(1) + col;
        return t.scalar_type() == at::kFloat ? _mm512_maskz_loadu_ps(mask, t.data_ptr<float>() + at)
                                             : widen16((const uint16_t*)t.data_ptr() + at, mask);
    }

    void normalize(const Norm& norm, const float* in, float* out, int64_t n) {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; ++b) norm.apply(in + b * n, out + b * n, n, bf16);
    }

    // Each row's index of its largest logit, as logits.max(-1).indices gives it: the first largest,
    // or the first NaN where there is one. Each thread looks through the blocks of 16 logits it
    // wrote (the same static schedule as run_linears' loop), still in its own cache, where a pass
    // afterwards would read half of them from the other core's: per lane, the first largest so
    // far; then one thread takes the threads' candidates.
    void pick_largest(const float* logits, int64_t* picks) {
        const int64_t vocab = head.out, blocks = (vocab + BLOCK_ROWS - 1) / BLOCK_ROWS;
        const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        Candidate* mine = candidates.data() + thread_id() * batch;
        for (int64_t m0 = 0; m0 < batch; m0 += MAX_M) {
            const int64_t M = std::min(MAX_M, batch - m0);
            __m512 best[MAX_M];
            __m512i where[MAX_M];  // int32: a vocabulary fits
            for (int64_t m = 0; m < M; ++m) best[m] = lowest, where[m] = _mm512_set1_epi32(std::numeric_limits<int32_t>::max());
            bool first = true;
#pragma omp for schedule(static)
            for (int64_t blk = 0; blk < blocks; ++blk) {
                const __mmask16 real = mask16(vocab - blk * BLOCK_ROWS);
                const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(int32_t(blk * BLOCK_ROWS)), lanes);
                for (int64_t m = 0; m < M; ++m) {
                    const __m512 v = _mm512_mask_loadu_ps(lowest, real, logits + (m0 + m) * vocab + blk * BLOCK_ROWS);
                    // a lane takes a larger number, or a NaN where it holds none; the thread's first block whole
                    __mmask16 take = _mm512_cmp_ps_mask(v, best[m], _CMP_GT_OQ) |
                                     (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) & _mm512_cmp_ps_mask(best[m], best[m], _CMP_ORD_Q));
                    if (first) take = real;
                    best[m] = _mm512_mask_mov_ps(best[m], take, v);
                    where[m] = _mm512_mask_mov_epi32(where[m], take, index);
                }
                first = false;
            }
            for (int64_t m = 0; m < M; ++m) {  // the lanes' first largest (a NaN lane first), the lowest index
                const __mmask16 nan = _mm512_cmp_ps_mask(best[m], best[m], _CMP_UNORD_Q);
                const float top = _mm512_reduce_max_ps(best[m]);
                const __mmask16 at = nan ? nan : _mm512_cmp_ps_mask(best[m], _mm512_set1_ps(top), _CMP_EQ_OQ);
                mine[m0 + m] = {nan ? std::numeric_limits<float>::quiet_NaN() : top,
                                _mm512_mask_reduce_min_epi32(at, where[m]), nan != 0};
            }
        }
#pragma omp barrier
#pragma omp single
        for (int64_t b = 0; b < batch; ++b) {
            Candidate pick = candidates[b];
            for (int t = 1; t < threads; ++t) {
                const Candidate& c = candidates[t * batch + b];
                const bool better = c.nan != pick.nan ? c.nan
                                    : !c.nan && c.value != pick.value ? c.value > pick.value
                                    : c.index < pick.index;
                if (better) pick = c;
            }
            picks[b] = pick.index;
        }
    }

    // Several linear layers over the same input (queries, keys and values; gate and up), their
    // rows shared out among the threads in blocks.
    void run_linears(std::vector<const Linear*> linears, const float* input, std::vector<Destination> outs) {
        const int64_t n = linears[0]->in;
        int64_t group = 0;
        bool as_int8 = false;
        for (auto* L : linears) {
            if (L->format == INT4) group = L->group;
            as_int8 |= L->format == INT8 || L->format == INT4;
        }
        prepare_inputs(input, n, as_int8, group);
        const int64_t blocks = input_blocks(n);
        std::vector<int64_t> first_block{0};
        for (auto* L : linears) first_block.push_back(first_block.back() + (L->out + BLOCK_ROWS - 1) / BLOCK_ROWS);
        float* out = partial.data() + thread_id() * BLOCK_ROWS * MAX_M;
        for (int64_t m0 = 0; m0 < batch; m0 += MAX_M) {
            const int64_t M = std::min(MAX_M, batch - m0);
            Inputs in{n, input + m0 * n, input_b.data() + m0 * n, input_8.data() + m0 * blocks * INPUT_BLOCK,
                      input_8_scale.data() + m0 * blocks, input_8_sum.data() + m0 * blocks,
                      group ? group_sums.data() + m0 * (n / group) : nullptr};
#pragma omp for schedule(static)
            for (int64_t blk = 0; blk < first_block.back(); ++blk) {
                size_t i = std::upper_bound(first_block.begin(), first_block.end(), blk) - first_block.begin() - 1;
                const Linear& L = *linears[i];
                const Destination& d = outs[i];
                int64_t r0 = (blk - first_block[i]) * BLOCK_ROWS, r1 = std::min(L.out, r0 + BLOCK_ROWS);
                rows_of(M, L, r0, r1, in, out);
                for (int64_t m = 0; m < M; ++m) finish_row_block(L, d, out + m * BLOCK_ROWS, r0, r1, m0 + m);
            }
        }
    }

    // The layer's outputs r0..r1 (at most 16) of one input from their dot products, rounded where
    // PyTorch rounds (the int8/int4 kernels' bf16 output, the bias, the activations' dtype), stored
    // or added to the residual stream.
    void finish_row_block(const Linear& L, const Destination& d, const float* out, int64_t r0, int64_t r1, int64_t m) {
        __mmask16 mask = __mmask16((1u << (r1 - r0)) - 1);
        // A whole block is loaded unmasked: a masked load waits for the kernel's store of `out` to
        // reach the cache, where a plain one takes it from the store in flight.
        __m512 v = r1 - r0 == BLOCK_ROWS ? _mm512_loadu_ps(out) : _mm512_maskz_loadu_ps(mask, out);
        if (L.format == INT8 || L.format == INT4) v = round16_bf16(v);
        if (!L.bias.empty()) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, L.bias.data() + r0));
        if (L.bf16_activations || L.format == BF16) v = round16_bf16(v);
        float* y = d.data + m * d.stride + r0;
        if (d.add) {
            v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, y));
            if (bf16) v = round16_bf16(v);
        }
        _mm512_mask_storeu_ps(y, mask, v);
    }

    // The input in the forms the kernels multiply (see Inputs), made once for all the rows that read it.
    void prepare_inputs(const float* input, int64_t n, bool as_int8, int64_t group) {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; ++b) {
            const float* x = input + b * n;
            uint16_t* xb = input_b.data() + b * n;
            for (int64_t k = 0; k < n; k += 16) {
                __mmask16 mask = mask16(n - k);
                _mm256_mask_storeu_epi16(xb + k, mask, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, x + k)));
            }
            if (as_int8) {  // int8 numbers per block: round(x / scale), scale = max |x| / 127 over the block
                const int64_t blocks = input_blocks(n);
                int8_t* x8 = input_8.data() + b * blocks * INPUT_BLOCK;
                for (int64_t i = 0; i < blocks; ++i) {
                    const int64_t k = INPUT_BLOCK * i;
                    __m512 lo = widen16(xb + k, mask16(n - k)), hi = widen16(xb + k + 16, n - k > 16 ? mask16(n - k - 16) : 0);
                    float largest = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
                    __m512 inverse = _mm512_set1_ps(largest > 0.f ? 127.f / largest : 0.f);
                    __m512i q_lo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse)), q_hi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse));
                    _mm_storeu_si128((__m128i*)(x8 + k), _mm512_cvtsepi32_epi8(q_lo));
                    _mm_storeu_si128((__m128i*)(x8 + k + 16), _mm512_cvtsepi32_epi8(q_hi));
                    input_8_scale[b * blocks + i] = largest / 127.f;
                    input_8_sum[b * blocks + i] = _mm512_reduce_add_epi32(_mm512_add_epi32(q_lo, q_hi));
                }
            }
            if (group) {  // int4: the sum of each group (its offset multiplies it)
                for (int64_t g = 0; g < n / group; ++g) {
                    __m512 sum = _mm512_setzero_ps();
                    for (int64_t k = g * group; k < (g + 1) * group; k += 16) sum = _mm512_add_ps(sum, widen16(xb + k, 0xffff));
                    group_sums[b * (n / group) + g] = _mm512_reduce_add_ps(sum);
                }
            }
        }
    }

    void attention_inputs(const Layer& layer) {
        const int64_t q = n_heads * head_dim, kv = n_kv_heads * head_dim, w = qkv_width();
        std::vector<const Linear*> linears;
        std::vector<Destination> outs;
        if (layer.attn_in.size() == 1) {
            linears = {&layer.attn_in[0]};
            outs = {{qkv.data(), w, false}};
        } else {
            linears = {&layer.attn_in[0], &layer.attn_in[1], &layer.attn_in[2]};
            outs = {{qkv.data(), w, false}, {qkv.data() + q, w, false}, {qkv.data() + q + kv, w, false}};
        }
        run_linears(linears, h.data(), outs);
    }

    // RMSNorm of each head's queries and keys (Qwen3), the rotation (RoPE), and the new keys and
    // values into the cache at `length`.
    void place_keys_and_values(const Layer& layer, at::Tensor& keys, at::Tensor& values, size_t l, int64_t length) {
        const int64_t heads = n_heads + n_kv_heads, w = qkv_width(), D = head_dim;
        std::vector<float> tmp(D);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < batch * heads; ++i) {
            int64_t b = i / heads, hd = i % heads;
            bool is_query = hd < n_heads;
            float* v = qkv.data() + b * w + hd * D;
            const std::optional<Norm>& norm = is_query ? layer.q_norm : layer.k_norm;
            if (norm) {
                std::copy(v, v + D, tmp.begin());
                norm->apply(tmp.data(), v, D, bf16);
            }
            if (!freqs.empty()) rotate(v, positions[b]);
            if (is_query) continue;
            int64_t kvh = hd - n_heads;
            const float* value = qkv.data() + b * w + (n_heads + n_kv_heads + kvh) * D;
            int64_t at = l * keys.stride(0) + b * keys.stride(1) + kvh * keys.stride(2) + length * keys.stride(3);
            if (keys.scalar_type() == at::kFloat) {
                std::copy(v, v + D, keys.data_ptr<float>() + at);
                std::copy(value, value + D, values.data_ptr<float>() + at);
            } else {
                uint16_t* kp = (uint16_t*)keys.data_ptr() + at;
                uint16_t* vp = (uint16_t*)values.data_ptr() + at;
                for (int64_t d = 0; d < D; d += 16) {
                    const __mmask16 mask = mask16(D - d);
                    _mm512_mask_cvtepi32_storeu_epi16(kp + d, mask, to_bf16(_mm512_maskz_loadu_ps(mask, v + d)));
                    _mm512_mask_cvtepi32_storeu_epi16(vp + d, mask, to_bf16(_mm512_maskz_loadu_ps(mask, value + d)));
                }
            }
        }
    }

    // Pair (i, i + D/2) turns by position * freqs[i] (blocks.apply_rope), cos and sin rounded to
    // the activations' dtype, and each product and the sum rounded as PyTorch's bf16 ops round.
    void rotate(float* v, int64_t position) const {
        const int64_t half = head_dim / 2;
        for (int64_t i = 0; i < half; ++i) {
            float angle = float(position) * freqs[i];
            float c = activation_round(std::cos(angle), bf16), s = activation_round(std::sin(angle), bf16);
            float a = v[i], b = v[i + half];
            v[i] = activation_round(activation_round(a * c, bf16) + activation_round(-b * s, bf16), bf16);
            v[i + half] = activation_round(activation_round(b * c, bf16) + activation_round(a * s, bf16), bf16);
        }
    }

    void attend(const at::Tensor& keys, const at::Tensor& values, size_t l, int64_t length, bool padded,
                const bool* valid, int64_t valid_stride) {
        const int64_t D = head_dim, group = n_heads / n_kv_heads, w = qkv_width();
        const float scale = 1.f / std::sqrt(float(D));
        const bool f32 = keys.scalar_type() == at::kFloat;
        const void *key_data = keys.data_ptr(), *value_data = values.data_ptr();
#pragma omp for schedule(static)
        for (int64_t i = 0; i < batch * n_heads; ++i) {
            int64_t b = i / n_heads, hd = i % n_heads, kvh = hd / group;
            const float* q = qkv.data() + b * w + hd * D;
            float* p = scores.data() + thread_id() * (length + 1);
            int64_t base = l * keys.stride(0) + b * keys.stride(1) + kvh * keys.stride(2), step = keys.stride(3);
            // The cache outgrows the L2 cache at batch 8, so its rows come from farther away each step:
            // while scoring 8 positions, ask for the keys 16 positions on and for these positions'
            // values (summed right after), and before the sum, for the next item's first keys.
            const int64_t row_bytes = step * keys.element_size(), positions = length + 1;
            auto ask = [&](const void* data, int64_t offset, int64_t from, int64_t to) {  // rows [from, to) of one item
                const char* start = (const char*)data + offset * keys.element_size() + from * row_bytes;
                for (int64_t o = 0; o < (std::min(to, positions) - from) * row_bytes; o += 64) _mm_prefetch(start + o, _MM_HINT_T0);
            };
            for (int64_t j = 0; j < positions; j += 8) {
                ask(key_data, base, j + 16, j + 24);
                ask(value_data, base, j, j + 8);
                const int count = int(std::min<int64_t>(8, positions - j));
                if (f32) key_scores(q, (const float*)key_data + base + j * step, step, D, count, scale, p + j);
                else key_scores(q, (const uint16_t*)key_data + base + j * step, step, D, count, scale, p + j);
            }
            if (padded)  // a row's left padding is masked (the new position never is)
                for (int64_t j = 0; j < length; ++j)
                    if (!valid[b * valid_stride + j]) p[j] = -std::numeric_limits<float>::infinity();
            // The largest score, 16 at a time (one at a time, each max waits on the last); a NaN
            // score is passed over, as std::max passes it over (vmaxps returns its second operand).
            const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
            __m512 largest = lowest;
            for (int64_t j = 0; j < positions; j += 16)
                largest = _mm512_max_ps(_mm512_mask_loadu_ps(lowest, mask16(positions - j), p + j), largest);
            const float top = _mm512_reduce_max_ps(largest);
            if (i + 1 < batch * n_heads) {
                const int64_t b2 = (i + 1) / n_heads, kvh2 = (i + 1) % n_heads / group;
                ask(key_data, l * keys.stride(0) + b2 * keys.stride(1) + kvh2 * keys.stride(2), 0, 16);
            }
            __m512 sum = _mm512_setzero_ps();
            for (int64_t j = 0; j < positions; j += 16) {  // e^(score - top), 0 where masked
                const __mmask16 mask = mask16(positions - j);
                const __m512 score = _mm512_maskz_loadu_ps(mask, p + j);
                const __m512 e = _mm512_maskz_mov_ps(mask & _mm512_cmp_ps_mask(score, lowest, _CMP_NEQ_OQ),
                                                     exp16(_mm512_sub_ps(score, _mm512_set1_ps(top))));
                _mm512_mask_storeu_ps(p + j, mask, e);
                sum = _mm512_add_ps(sum, e);
            }
            const float inverse_total = 1.f / _mm512_reduce_add_ps(sum);
            float* out = context.data() + b * n_heads * D + hd * D;
            if (f32) weighted_values(p, (const float*)value_data + base, step, positions, D, out);
            else weighted_values(p, (const uint16_t*)value_data + base, step, positions, D, out);
            for (int64_t d = 0; d < D; ++d) out[d] = activation_round(out[d] * inverse_total, bf16);
        }
    }

    void feed_forward(const Layer& layer) {
        const int64_t F = layer.mlp_out.in;
        if (layer.mlp_in.size() == 1) {
            run_linears({&layer.mlp_in[0]}, h.data(), {{hidden.data(), F, false}});
        } else {  // gate and up side by side in `hidden`: (batch, 2F)
            run_linears({&layer.mlp_in[0], &layer.mlp_in[1]}, h.data(),
                        {{hidden.data(), 2 * F, false}, {hidden.data() + F, 2 * F, false}});
        }
        // GELU (tanh form) is x * sigmoid(2u) with u = sqrt(2/pi) (x + 0.044715 x^3): the same number
        // as 0.5 x (1 + tanh u), with one exponential. SiLU is x * sigmoid(x).
        const int64_t chunks = (F + 255) / 256;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < batch * chunks; ++i) {
            const int64_t b = i / chunks, start = (i % chunks) * 256, end = std::min(F, start + 256);
            float* out = activated.data() + b * F;
            const float* in = hidden.data() + b * (activation == SWIGLU ? 2 * F : F);
            for (int64_t k = start; k < end; k += 16) {
                __mmask16 mask = end - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (end - k)) - 1);
                __m512 a = _mm512_maskz_loadu_ps(mask, in + k), y;
                const __m512 one = _mm512_set1_ps(1.f);
                if (activation == SWIGLU) {
                    __m512 silu = _mm512_div_ps(a, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), a))));
                    if (bf16) silu = round16_bf16(silu);
                    y = _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(mask, in + F + k));
                } else if (activation == GELU_TANH) {
                    __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                             _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), _mm512_mul_ps(a, a)), a, a));
                    y = _mm512_div_ps(a, _mm512_add_ps(one, exp16(_mm512_mul_ps(_mm512_set1_ps(-2.f), u))));
                } else {
                    __m512 r = _mm512_max_ps(a, _mm512_setzero_ps());
                    y = _mm512_mul_ps(r, r);
                }
                _mm512_mask_storeu_ps(out + k, mask, bf16 ? round16_bf16(y) : y);
            }
        }
        run_linears({&layer.mlp_out}, activated.data(), {{x.data(), emb_dim, true}});
    }
};

// A prompt's pass through an int8 or int4 layer: many input rows, each weight used by all of them,
// so the arithmetic is the bf16 matrix product's, over the weight the codes stand for in bf16, as
// the readable layer defines it (quantization.py). Writing that whole matrix out first costs more
// than the product (a fresh 32 MB buffer per layer of a 1B model, page by page); instead each
// thread turns a chunk of tiles at a time into bf16 rows in a buffer of its own, small enough to
// stay in its core's L2 cache, and multiplies the input rows by it there.

// Tile t of an int8 layer's codes (in tiles of 16 rows: int8_in_tiles) as bf16 numbers, exact
// (bf16 holds every integer up to 256): row r of the tile to dst + r * in. Each 64 inputs are 16
// runs of 64 bytes, run j holding 4 bytes of each row: as a 16 x 16 matrix of 4-byte numbers,
// transposed in registers, they are the 16 rows' 64 bytes.
void int8_tile_to_bf16(const int8_t* tile, int64_t width, int64_t in, uint16_t* dst) {
    for (int64_t k = 0; k < in; k += 64) {  // inputs k .. k + 63 (a width of 32 past the last 64: 8 runs)
        const int64_t runs = std::min<int64_t>(16, (width - k) / 4);
        __m512i a[16], t[16];
        for (int j = 0; j < 16; ++j) a[j] = j < runs ? _mm512_loadu_si512(tile + k * 16 + 64 * j) : _mm512_setzero_si512();
        for (int i = 0; i < 8; ++i) {  // in each 128-bit block L: rows 4L, 4L + 1 of runs 2i, 2i + 1; then rows 4L + 2, 4L + 3
            t[2 * i] = _mm512_unpacklo_epi32(a[2 * i], a[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(a[2 * i], a[2 * i + 1]);
        }
        for (int i = 0; i < 4; ++i) {  // a[4i + q], block L: row 4L + q of runs 4i .. 4i + 3
            a[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
            a[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
            a[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
            a[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
        }
        for (int q = 0; q < 4; ++q) {  // row 4L + q: block L of a[q], a[4 + q], a[8 + q], a[12 + q]
            const __m512i v1 = _mm512_shuffle_i32x4(a[q], a[4 + q], 0x44), v2 = _mm512_shuffle_i32x4(a[q], a[4 + q], 0xEE);
            const __m512i w1 = _mm512_shuffle_i32x4(a[8 + q], a[12 + q], 0x44), w2 = _mm512_shuffle_i32x4(a[8 + q], a[12 + q], 0xEE);
            t[q] = _mm512_shuffle_i32x4(v1, w1, 0x88);
            t[4 + q] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
            t[8 + q] = _mm512_shuffle_i32x4(v2, w2, 0x88);
            t[12 + q] = _mm512_shuffle_i32x4(v2, w2, 0xDD);
        }
        for (int r = 0; r < 16; ++r)  // t[r]: row r's 64 codes, 32 at a time as bf16
            for (int half = 0; half < 2 && k + 32 * half < in; ++half) {
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(t[r], 2 * half)));
                const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(t[r], 2 * half + 1)));
                _mm512_mask_storeu_epi16(dst + r * in + k + 32 * half, mask32(in - k - 32 * half),
                                         (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
            }
    }
}

// Tile t of an int4 layer's codes (packed by pack_codes) as the bf16 weights they stand for:
// (q - 8) * scale + zero in fp32, rounded to bf16 once, as Int4Linear.dequantized followed by
// .to(bfloat16) gives them; row r of the tile to dst + r * n. scale, zero: the tile's (groups, 16).
// A group's 16 possible weights are made once, and its codes pick from them (vpermw, 32 at once).
void int4_tile_to_bf16(const uint8_t* tile, const uint16_t* scale, const uint16_t* zero, int64_t n, int64_t group,
                       uint16_t* dst) {
    const int64_t full = n / 64 * 64;
    const __m512 levels = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i low4 = _mm512_set1_epi16(15);
    const __m256i runs = _mm256_setr_epi32(0, 64, 128, 192, 256, 320, 384, 448);  // a row's 4 bytes in each of 8 runs
    for (int r = 0; r < 16; ++r) {
        uint16_t* row = dst + r * n;
        auto table = [&](int64_t k) {  // the 16 bf16 weights of the group holding input k
            const int64_t g = k / group * 16 + r;
            return _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(
                _mm512_fmadd_ps(levels, _mm512_set1_ps(bf16_to_f32(scale[g])), _mm512_set1_ps(bf16_to_f32(zero[g])))));
        };
        for (int64_t k = 0; k < full; k += 64) {  // the row's 32 bytes: byte i holds inputs k + i and k + 32 + i
            const __m512i codes = _mm512_cvtepu8_epi16(_mm256_i32gather_epi32((const int*)(tile + k * 8 + 4 * r), runs, 1));
            _mm512_storeu_si512(row + k, _mm512_permutexvar_epi16(_mm512_and_si512(codes, low4), table(k)));
            _mm512_storeu_si512(row + k + 32, _mm512_permutexvar_epi16(_mm512_srli_epi16(codes, 4), table(k + 32)));
        }
        if (n > full) {  // a last 32 inputs in 4 runs: byte i holds inputs full + i and full + 16 + i
            const __m256i codes = _mm256_cvtepu8_epi16(_mm_i32gather_epi32((const int*)(tile + full * 8 + 4 * r),
                                                                           _mm256_castsi256_si128(runs), 1));
            const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(codes, _mm512_castsi512_si256(low4))),
                                                    _mm256_srli_epi16(codes, 4), 1);
            _mm512_storeu_si512(row + full, _mm512_permutexvar_epi16(both, table(full)));
        }
    }
}

// rows (R, in) bf16 times an int8 (`zero` absent) or int4 layer's weight: (R, out) bf16, as the
// readable layer computes it (up to the order of the sums). int4: the product
// with the bf16 weights its codes stand for (Int4Linear.dequantized, rounded to bf16). int8: the
// product with the codes (exact in bf16), times each row's scale, rounded to bf16 once as
// PyTorch's int8 kernel does below MATRIX_ROWS rows, and from there rounded before the scale as
// well (the bf16 matrix product's output is rounded: Int8Linear._kernel). Below MATRIX_ROWS rows
// (a prompt's last position through the output head, a short prompt) the decoding step's bf16
// kernel multiplies, 8 rows at a time: there the matrix product's call per chunk costs more than
// its arithmetic (measured: benchmarks/README.md).
constexpr int64_t MATRIX_ROWS = 32;
at::Tensor quantized_matmul(const at::Tensor& rows, const at::Tensor& codes, const at::Tensor& scale,
                            const std::optional<at::Tensor>& zero, int64_t group, int64_t in, int64_t out) {
    TORCH_CHECK(rows.dim() == 2 && rows.size(1) == in && rows.scalar_type() == at::kBFloat16 && rows.is_contiguous(),
                "quantized_matmul: the input must be (rows, in) contiguous bf16");
    TORCH_CHECK(codes.is_contiguous() && scale.is_contiguous() && (!zero || zero->is_contiguous()), "contiguous tensors expected");
    TORCH_CHECK(codes.size(0) == tiles_of(out) * TILE_ROWS, "quantized_matmul: the codes' rows do not match the outputs");
    const bool int4 = zero.has_value();
    TORCH_CHECK(int4 ? codes.size(1) * 2 == in && group % 32 == 0 && in % group == 0
                     : codes.size(1) == input_blocks(in) * INPUT_BLOCK,
                "quantized_matmul: the codes' width does not match the inputs");
    const int64_t R = rows.size(0), tiles = tiles_of(out), width = codes.size(1), groups = int4 ? in / group : 0;
    const auto* scales = reinterpret_cast<const uint16_t*>(scale.data_ptr());  // int8: (out,); int4: (tiles, groups, 16)
    constexpr int64_t CHUNK_BYTES = 512 * 1024;  // a thread's bf16 rows: half its L2 cache
    const int64_t chunk = std::max<int64_t>(1, CHUNK_BYTES / (TILE_ROWS * in * 2));  // tiles
    const bool few = R < MATRIX_ROWS;
    // few rows: (R, out); else transposed, (tiles * 16, R), so that a chunk's rows (padding included) are contiguous
    auto result = few ? at::empty({R, out}, rows.options()) : at::empty({tiles * TILE_ROWS, R}, rows.options());
    auto* y = reinterpret_cast<uint16_t*>(result.data_ptr());
    const auto inputs = rows.t();
    const bool inference = c10::InferenceMode::is_enabled();  // a thread-local mode: the workers take the caller's
    at::parallel_for(0, (tiles + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
        c10::InferenceMode mode(inference);
        auto weight = at::empty({chunk * TILE_ROWS, in}, rows.options());
        auto* w = reinterpret_cast<uint16_t*>(weight.data_ptr());
        for (int64_t c = c0; c < c1; ++c) {
            const int64_t t0 = c * chunk, t1 = std::min(tiles, t0 + chunk);
            for (int64_t t = t0; t < t1; ++t) {
                uint16_t* dst = w + (t - t0) * TILE_ROWS * in;
                if (int4)
                    int4_tile_to_bf16(codes.data_ptr<uint8_t>() + t * TILE_ROWS * width, scales + t * groups * 16,
                                      reinterpret_cast<const uint16_t*>(zero->data_ptr()) + t * groups * 16, in, group, dst);
                else
                    int8_tile_to_bf16(codes.data_ptr<int8_t>() + t * TILE_ROWS * width, width, in, dst);
            }
            if (!few) {
                auto part = result.narrow(0, t0 * TILE_ROWS, (t1 - t0) * TILE_ROWS);
                at::mm_out(part, weight.narrow(0, 0, (t1 - t0) * TILE_ROWS), inputs);  // one thread's: inside parallel_for
                if (!int4)
                    for (int64_t r = t0 * TILE_ROWS; r < std::min(out, t1 * TILE_ROWS); ++r)
                        for (int64_t i = 0; i < R; ++i) y[r * R + i] = f32_to_bf16(bf16_to_f32(y[r * R + i]) * bf16_to_f32(scales[r]));
                continue;
            }
            float sums[TILE_ROWS * MAX_M];  // sums[m * 16 + r]
            for (int64_t t = t0; t < t1; ++t)
                for (int64_t m0 = 0; m0 < R; m0 += MAX_M) {
                    const int64_t M = std::min(MAX_M, R - m0);
                    const Inputs x{in, nullptr, reinterpret_cast<const uint16_t*>(rows.data_ptr()) + m0 * in};
                    with_batch(M, [&](auto m) {
                        for (int r = 0; r < TILE_ROWS; ++r)
                            dot_bf16<1, decltype(m)::value>(w + ((t - t0) * TILE_ROWS + r) * in, in, x, sums + r, TILE_ROWS, 0);
                    });
                    for (int64_t m = 0; m < M; ++m)
                        for (int64_t r = t * TILE_ROWS; r < std::min(out, (t + 1) * TILE_ROWS); ++r) {
                            const float sum = sums[m * TILE_ROWS + r - t * TILE_ROWS];
                            y[(m0 + m) * out + r] = f32_to_bf16(int4 ? sum : sum * bf16_to_f32(scales[r]));
                        }
                }
        }
    });
    return few ? result : result.narrow(0, 0, out).t().contiguous();
}

}  // namespace buildllm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    using namespace buildllm;
    namespace py = pybind11;
    // module_local: two builds of this file (other flags, say) can be loaded side by side.
    py::class_<Norm>(m, "Norm", py::module_local()).def(py::init<int64_t, double, at::Tensor, std::optional<at::Tensor>>());
    py::class_<Linear>(m, "Linear", py::module_local())
        .def(py::init<int64_t, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>,
                      std::optional<at::Tensor>, int64_t, bool, int64_t, int64_t>());
    py::class_<Decoder>(m, "Decoder", py::module_local())
        .def(py::init<int64_t, int64_t, int64_t, int64_t, bool, at::Tensor, std::optional<at::Tensor>,
                      std::optional<at::Tensor>, Norm, Linear>())
        .def("add_layer", &Decoder::add_layer)
        .def("step", &Decoder::step, py::call_guard<py::gil_scoped_release>());
    m.def("quantized_matmul", &quantized_matmul, py::call_guard<py::gil_scoped_release>());
}
