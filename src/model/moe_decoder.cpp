#include "model/moe_decoder.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <sstream>

#include "model/moe_decoder_impl.h"
#include "model/moe_block.h"
#include "model/ops.h"
#include "model/weight_loader.h"

namespace moelora {

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  MOELORA_CHECK(in.good(), "{}: cannot open", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

MoeDecoder::MoeDecoder(const std::string& dir, const HfModelConfig& config,
                       const ModelOptions& options, const MoeDecoderFamily& family)
    : config_(config), options_(options), family_(family), stream_(Stream::create(Device::cpu())) {
  MOELORA_CHECK(options_.max_step_tokens > 0, "ModelOptions: max_step_tokens must be > 0");
  MOELORA_CHECK(options_.lora_slots <= 0 || options_.lora_r_max >= 1,
                "ModelOptions: lora_r_max must be >= 1 with LoRA slots, found {}",
                options_.lora_r_max);
  const HfModelConfig& c = config_;
  const int64_t H = c.hidden_size, D = c.head_dim, V = c.vocab_size;
  const int64_t nq = int64_t(c.num_attention_heads) * D, nkv = int64_t(c.num_key_value_heads) * D;
  const int slots = std::max(options_.lora_slots, 0);
  WeightLoader wl(dir, options.load_progress);
  embed_ = wl.bf16("model.embed_tokens.weight", {V, H});
  final_norm_ = wl.bf16("model.norm.weight", {H});
  if (c.tie_word_embeddings) {
    lm_head_ = embed_;
    if (wl.has("lm_head.weight")) wl.bf16("lm_head.weight", {V, H});  // tied: same values
  } else {
    lm_head_ = wl.bf16("lm_head.weight", {V, H});
  }
  const MoeShape shape = c.moe_shape();
  const int64_t E = shape.num_experts, I = shape.inter;
  bool any_moe = false;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    DecoderLayer L;
    L.input_norm = wl.bf16(p + "input_layernorm.weight", {H});
    L.post_norm = wl.bf16(p + "post_attention_layernorm.weight", {H});
    // q, k, v fused into one [nq + 2 nkv, H] GEMM (the 3-slice LoRA applies to its output).
    L.qkv = Tensor::empty({nq + 2 * nkv, H}, DType::bf16);
    wl.copy_into(p + "self_attn.q_proj.weight", {nq, H}, L.qkv, 0);
    wl.copy_into(p + "self_attn.k_proj.weight", {nkv, H}, L.qkv, nq * H);
    wl.copy_into(p + "self_attn.v_proj.weight", {nkv, H}, L.qkv, (nq + nkv) * H);
    L.o_proj = wl.bf16(p + "self_attn.o_proj.weight", {H, nq});
    if (family_.qk_norm) {
      L.q_norm = wl.bf16(p + "self_attn.q_norm.weight", {D});
      L.k_norm = wl.bf16(p + "self_attn.k_norm.weight", {D});
    }
    if (slots > 0) {
      L.qkv_lora = std::make_unique<DenseLoraPool>(p + "self_attn.qkv", H,
                                                   DenseLoraSlices::from_sizes({nq, nkv, nkv}),
                                                   slots, options_.lora_r_max, Device::cpu());
      L.o_lora = std::make_unique<DenseLoraPool>(p + "self_attn.o_proj", nq,
                                                 DenseLoraSlices::from_sizes({H}), slots,
                                                 options_.lora_r_max, Device::cpu());
    }
    L.moe = c.is_moe_layer(l);
    if (L.moe) {
      any_moe = true;
      const std::string mp = p + family_.moe_module + ".";
      L.router = wl.bf16(mp + family_.router + ".weight", {E, H});
      L.experts.format = WeightFormat::bf16;
      Tensor w13, w2;
      // transformers 5's in-memory layout saved as is: gate_up [E, 2I, H], down [E, H, I].
      std::string fused = mp + "experts.gate_up_proj";
      if (!wl.has(fused)) fused = p + "mlp.experts.gate_up_proj";
      if (wl.has(fused)) {
        w13 = wl.bf16(fused, {E, 2 * I, H});
        w2 = wl.bf16(fused.substr(0, fused.size() - 12) + "down_proj", {E, H, I});
      } else {
        // Hub checkpoints (and save_pretrained of transformers 5): one Linear per expert.
        w13 = Tensor::empty({E, 2 * I, H}, DType::bf16);
        w2 = Tensor::empty({E, H, I}, DType::bf16);
        const auto& n = family_.expert_proj;
        for (int64_t e = 0; e < E; ++e) {
          const std::string ep = fmt::format("{}experts.{}.", mp, e);
          wl.copy_into(ep + n[0] + ".weight", {I, H}, w13, e * 2 * I * H);
          wl.copy_into(ep + n[1] + ".weight", {I, H}, w13, (e * 2 + 1) * I * H);
          wl.copy_into(ep + n[2] + ".weight", {H, I}, w2, e * H * I);
        }
      }
      L.experts.w13 = ExpertMatrices(w13);
      L.experts.w2 = ExpertMatrices(w2);
      L.experts.validate(shape);
      if (slots > 0) {
        L.lora_pool =
            std::make_unique<MoeLoraPool>(shape, slots, options_.lora_r_max, Device::cpu());
        L.lora_hooks = MoeLoraHooks::create(*L.lora_pool, options_.max_step_tokens);
      }
    } else {
      const int64_t Id = c.intermediate_size;
      MOELORA_CHECK(Id > 0,
                    "{}/config.json: layer {} is a dense MLP layer but "
                    "intermediate_size is {}",
                    dir, l, Id);
      L.mlp_gate_up = Tensor::empty({2 * Id, H}, DType::bf16);
      wl.copy_into(p + "mlp.gate_proj.weight", {Id, H}, L.mlp_gate_up, 0);
      wl.copy_into(p + "mlp.up_proj.weight", {Id, H}, L.mlp_gate_up, Id * H);
      L.mlp_down = wl.bf16(p + "mlp.down_proj.weight", {H, Id});
      if (slots > 0) {
        L.gate_up_lora = std::make_unique<DenseLoraPool>(p + "mlp.gate_up", H,
                                                         DenseLoraSlices::from_sizes({Id, Id}),
                                                         slots, options_.lora_r_max, Device::cpu());
        L.down_lora = std::make_unique<DenseLoraPool>(p + "mlp.down_proj", Id,
                                                      DenseLoraSlices::from_sizes({H}), slots,
                                                      options_.lora_r_max, Device::cpu());
      }
    }
    layers_.push_back(std::move(L));
  }
  wl.check_all_used();
  if (any_moe) {
    MoeRunnerConfig rc;
    rc.shape = shape;
    rc.router = c.router();
    rc.device = Device::cpu();
    rc.max_tokens = options_.max_step_tokens;
    rc.format = WeightFormat::bf16;
    rc.backend = options_.moe_backend;
    runner_ = std::make_unique<MoeRunner>(rc);
  }
  adapter_loaded_.assign(size_t(slots), false);
}

KvCacheConfig MoeDecoder::kv_cache_config(int64_t num_pages, int page_size, DType dtype) const {
  KvCacheConfig k;
  k.num_layers = config_.num_hidden_layers;
  k.num_kv_heads = config_.num_key_value_heads;
  k.head_dim = config_.head_dim;
  k.page_size = page_size;
  k.num_pages = num_pages;
  k.max_seq_len = config_.max_position_embeddings;
  k.dtype = dtype;
  k.device = Device::cpu();
  return k;
}

void MoeDecoder::check_slot(int slot) const {
  MOELORA_CHECK(slot >= 0 && slot < int(adapter_loaded_.size()),
                "adapter slot {} is outside the model's {} LoRA slot(s) (ModelOptions::"
                "lora_slots)",
                slot, adapter_loaded_.size());
}

namespace {

Tensor to_bf16(const Tensor& x) {
  Tensor out = Tensor::empty(x.shape(), DType::bf16);
  const float* s = x.data<float>();
  bf16_t* d = out.data<bf16_t>();
  for (int64_t i = 0; i < x.numel(); ++i) d[i] = float_to_bf16(s[i]);
  return out;
}

// y += the LoRA delta of each token's slot; a no-op without a pool or adapter tokens.
void add_lora(const DenseLoraPool* pool, const Tensor& xb, const LoraBatchState& b, Tensor& y,
              const Stream& stream) {
  if (pool == nullptr || !b.any) return;
  Tensor u = Tensor::empty({xb.size(0), int64_t(pool->slices().count) * pool->r_max()}, DType::f32);
  apply_dense_lora(*pool, xb, b.token_slot, u, y, stream);
}

}  // namespace

void MoeDecoder::attention(DecoderLayer& L, int layer, const Tensor& xn, const Tensor& xb,
                           const StepTables& t, const LoraBatchState& lb, PagedKvCache& cache,
                           Tensor& out) {
  const HfModelConfig& c = config_;
  const int64_t M = xn.size(0), D = c.head_dim;
  const int64_t nq = int64_t(c.num_attention_heads) * D, nkv = int64_t(c.num_key_value_heads) * D;
  const int64_t N = nq + 2 * nkv;
  Tensor qkv = Tensor::empty({M, N}, DType::f32);
  ops::linear(xn, L.qkv, qkv, stream_);
  add_lora(L.qkv_lora.get(), xb, lb, qkv, stream_);
  Tensor q = Tensor::empty({M, nq}, DType::f32), k = Tensor::empty({M, nkv}, DType::f32);
  Tensor v = Tensor::empty({M, nkv}, DType::f32), a = Tensor::empty({M, nq}, DType::f32);
  for (int64_t m = 0; m < M; ++m) {
    const float* row = qkv.data<float>() + m * N;
    std::copy_n(row, nq, q.data<float>() + m * nq);
    std::copy_n(row + nq, nkv, k.data<float>() + m * nkv);
    std::copy_n(row + nq + nkv, nkv, v.data<float>() + m * nkv);
  }
  if (family_.qk_norm) {
    const float eps = float(c.rms_norm_eps);
    ops::rms_norm(q, L.q_norm, eps, q, stream_);  // per head: weight [D]
    ops::rms_norm(k, L.k_norm, eps, k, stream_);
  }
  ops::rope(q, int(D), t.positions, c.rope_theta, stream_);
  ops::rope(k, int(D), t.positions, c.rope_theta, stream_);
  ops::kv_cache_write(k, v, t.slots, cache.k(layer), cache.v(layer), stream_);
  const float scale = 1.0f / std::sqrt(float(D));
  ops::paged_attention(q, cache.k(layer), cache.v(layer), t.block_table, t.token_seq, t.positions,
                       scale, a, stream_);
  ops::linear(a, L.o_proj, out, stream_);
  if (L.o_lora && lb.any) add_lora(L.o_lora.get(), to_bf16(a), lb, out, stream_);
}

void MoeDecoder::mlp(DecoderLayer& L, const Tensor& xn, const Tensor& xb, const LoraBatchState& lb,
                     Tensor& out, Tensor& router_margin, int margin_col) {
  const int64_t M = xn.size(0), H = config_.hidden_size;
  if (!L.moe) {
    const int64_t Id = L.mlp_down.size(1);
    Tensor gu = Tensor::empty({M, 2 * Id}, DType::f32), act = Tensor::empty({M, Id}, DType::f32);
    ops::linear(xn, L.mlp_gate_up, gu, stream_);
    add_lora(L.gate_up_lora.get(), xb, lb, gu, stream_);
    ops::silu_mul(gu, act, stream_);
    ops::linear(act, L.mlp_down, out, stream_);
    if (L.down_lora && lb.any) add_lora(L.down_lora.get(), to_bf16(act), lb, out, stream_);
    return;
  }
  // The router reads the f32 normed activations (as transformers' f32 forward does); the
  // experts read the bf16 copy the MoE runner's contract asks for.
  const int64_t E = L.router.size(0);
  Tensor logits = Tensor::empty({M, E}, DType::f32);
  Tensor y = Tensor::empty({M, H}, DType::bf16);
  ops::linear(xn, L.router, logits, stream_);
  // How close each token's expert choice is to a tie (k-th vs (k+1)-th logit): bf16-level
  // differences can flip a choice that close, which conformance checks need to know.
  const int k = config_.num_experts_per_tok;
  if (k < E) {
    std::vector<float> r(static_cast<size_t>(E));
    float* margin = router_margin.data<float>();
    const int64_t cols = router_margin.size(1);
    for (int64_t t = 0; t < M; ++t) {
      std::copy_n(logits.data<float>() + t * E, E, r.begin());
      std::nth_element(r.begin(), r.begin() + k, r.end(), std::greater<float>());
      const float kth = *std::min_element(r.begin(), r.begin() + k);
      margin[t * cols + margin_col] = kth - r[size_t(k)];
    }
  }
  MoeLoraHooks* hooks = nullptr;
  if (lb.any) {
    MOELORA_CHECK(L.lora_hooks != nullptr,
                  "{}: LoRA requested but the model was loaded "
                  "without LoRA slots",
                  family_.model_type);
    hooks = L.lora_hooks.get();
  }
  run_moe_chunked(*runner_, L.experts, hooks, lb.token_slot, xb, logits, options_.max_step_tokens,
                  y, out, stream_);
}

StepResult MoeDecoder::forward(const std::vector<SeqInput>& batch, PagedKvCache& cache,
                               bool all_logits) {
  const HfModelConfig& c = config_;
  StepTables t;
  LoraBatchState lb;
  std::vector<int64_t> last_row;
  prepare_step(batch, cache, t, lb, last_row);
  const int64_t M = t.positions.size(0), S = int64_t(batch.size());
  const int64_t H = c.hidden_size, V = c.vocab_size;
  const float eps = float(c.rms_norm_eps);
  Tensor h = Tensor::empty({M, H}, DType::f32), xn = Tensor::empty({M, H}, DType::f32);
  Tensor delta = Tensor::empty({M, H}, DType::f32);
  ops::embedding(t.ids, embed_, h, stream_);
  StepResult r;
  int num_moe = 0;
  for (const DecoderLayer& L : layers_) num_moe += L.moe ? 1 : 0;
  r.router_margin = Tensor::empty({M, num_moe}, DType::f32);
  std::fill_n(r.router_margin.data<float>(), M * num_moe, INFINITY);
  int moe_index = 0;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    DecoderLayer& L = layers_[size_t(l)];
    ops::rms_norm(h, L.input_norm, eps, xn, stream_);
    attention(L, l, xn, lb.any ? to_bf16(xn) : Tensor(), t, lb, cache, delta);
    ops::residual_add(h, delta, stream_);
    ops::rms_norm(h, L.post_norm, eps, xn, stream_);
    const Tensor xb = (L.moe || lb.any) ? to_bf16(xn) : Tensor();
    mlp(L, xn, xb, lb, delta, r.router_margin, L.moe ? moe_index++ : -1);
    ops::residual_add(h, delta, stream_);
  }
  for (const SeqInput& s : batch) cache.advance(s.seq, int64_t(s.tokens.size()));

  r.last_logits = Tensor::empty({S, V}, DType::f32);
  if (all_logits) {
    ops::rms_norm(h, final_norm_, eps, xn, stream_);
    r.all_logits = Tensor::empty({M, V}, DType::f32);
    ops::linear(xn, lm_head_, r.all_logits, stream_);
    for (int64_t b = 0; b < S; ++b)
      std::copy_n(r.all_logits.data<float>() + last_row[size_t(b)] * V, V,
                  r.last_logits.data<float>() + b * V);
  } else {
    Tensor hl = Tensor::empty({S, H}, DType::f32), nl = Tensor::empty({S, H}, DType::f32);
    for (int64_t b = 0; b < S; ++b)
      std::copy_n(h.data<float>() + last_row[size_t(b)] * H, H, hl.data<float>() + b * H);
    ops::rms_norm(hl, final_norm_, eps, nl, stream_);
    ops::linear(nl, lm_head_, r.last_logits, stream_);
  }
  return r;
}

std::unique_ptr<Model> make_moe_decoder(const std::string& dir, const HfModelConfig& config,
                                        const ModelOptions& options,
                                        const MoeDecoderFamily& family) {
  return std::make_unique<MoeDecoder>(dir, config, options, family);
}

}  // namespace moelora
