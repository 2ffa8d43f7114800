// DeepSeek-V2 / V3 / Kimi-K2 (model_type deepseek_v2, deepseek_v3, kimi_k2), as transformers'
// DeepseekV2ForCausalLM / DeepseekV3ForCausalLM:
//   per layer: h += o_proj(MLA(input_layernorm(h))); h += mlp(post_attention_layernorm(h))
//   mlp: dense SiLU MLP for layers < first_k_dense_replace, else routed experts (V2 softmax
//        greedy / group-limited, V3 grouped sigmoid with e_score_correction_bias) + shared
//        experts (MoeRunner's shared expert, n_shared_experts x moe_intermediate_size).
// MLA: q = q_proj(x) or q_b_proj(q_a_layernorm(q_a_proj(x))); kv_a_proj_with_mqa(x) splits into
// the compressed kv (kv_a_layernorm-ed) and k_pe; RoPE on q_pe / k_pe. The KV cache holds the
// latent row [kv_lora_rank + rope] per token. Decode tokens take the absorbed path
// (kernels/mla_ops.inc): kv_b_proj folded into the query (k side) and the output (v side), so
// attention runs in the latent space; prefill chunks expand per-head K/V from the cached latent
// rows through kv_b_proj (MlaPath picks; both match transformers). LoRA: expert LoRA per
// request (MoeLoraPool) and attention LoRA (DenseLoraPool) on q_proj / q_a_proj / q_b_proj /
// kv_a_proj_with_mqa / o_proj; kv_b_proj's LoRA is the ordinary LoRA on the expanded path and
// the side correction of REFERENCE.md on the absorbed path (mla_lora_absorb_q/v).
// Backends: every weight, LoRA pool, the latent cache and every activation of a step live on
// ModelOptions::device (CPU or CUDA); the ops dispatch on where their tensors are
// (model/ops.h, model/mla_dispatch.h), so this file and deepseek_step.cpp never name one.
#include "model/deepseek.h"

#include <cmath>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "model/expert_loader.h"
#include "model/mla_dispatch.h"
#include "model/moe_block.h"
#include "model/rope.h"
#include "model/weight_loader.h"

namespace moelora {
namespace {

void check_unsupported_settings(const std::string& dir, const HfModelConfig& c, bool& interleave) {
  const std::string path = dir + "/config.json";
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, false);
  auto flag = [&](const char* key, bool dflt) {
    auto it = j.find(key);
    return it != j.end() && it->is_boolean() ? it->get<bool>() : dflt;
  };
  MOELORA_CHECK(!flag("attention_bias", false),
                "{}: attention_bias=true is not supported by the {} model yet", path,
                c.model_type);
  MOELORA_CHECK(!flag("mlp_bias", false), "{}: mlp_bias=true is not supported by the {} model",
                path, c.model_type);
  auto act = j.find("hidden_act");
  MOELORA_CHECK(act == j.end() || act->is_null() || *act == "silu",
                "{}: hidden_act {} is not supported (expected \"silu\")", path,
                act == j.end() ? "" : act->dump());
  // YaRN (DeepSeek-V2/V3 and Kimi-K2 checkpoints) changes the frequencies, cos / sin and the
  // softmax scale (model/rope.h); the other scaled RoPE types are refused.
  MOELORA_CHECK(c.rope_type == "default" || c.rope_type == "yarn",
                "{}: rope_scaling / rope_parameters.rope_type '{}' is not supported by the {} "
                "model (\"default\" and \"yarn\" are)",
                path, c.rope_type, c.model_type);
  MOELORA_CHECK(c.max_position_embeddings > 0, "{}: max_position_embeddings must be > 0", path);
  MOELORA_CHECK(c.num_key_value_heads == c.num_attention_heads,
                "{}: MLA needs num_key_value_heads == num_attention_heads (every head has its own "
                "k_nope / v from kv_b_proj), found {} and {}",
                path, c.num_key_value_heads, c.num_attention_heads);
  MOELORA_CHECK(c.n_shared_experts > 0 || c.first_k_dense_replace >= c.num_hidden_layers,
                "{}: n_shared_experts must be > 0 (transformers' DeepSeek MoE always adds the "
                "shared experts), found {}",
                path, c.n_shared_experts);
  // V2 always rotates interleaved pairs; V3 does when rope_interleave (default true).
  interleave = c.model_type == "deepseek_v2" ? true : flag("rope_interleave", true);
}

}  // namespace

DeepseekModel::DeepseekModel(const std::string& dir, const HfModelConfig& config,
                             const ModelOptions& options)
    : config_(config),
      options_(options),
      device_(options.device),
      stream_(Stream::create(options.device)) {
  check_unsupported_settings(dir, config_, rope_interleave_);
  MOELORA_CHECK(options_.max_step_tokens > 0, "ModelOptions: max_step_tokens must be > 0");
  const HfModelConfig& c = config_;
  const int64_t H = c.hidden_size, V = c.vocab_size, nh = c.num_attention_heads;
  const int64_t nope = c.qk_nope_head_dim, rope = c.qk_rope_head_dim, vd = c.v_head_dim;
  const int64_t L = c.kv_lora_rank, qk = nope + rope;
  // RoPE frequencies and the softmax scale, as transformers' DeepseekV2 / V3 attention sets them.
  rope_ = rope_table(c, int(rope), device_);
  attn_scale_ = 1.0f / std::sqrt(float(qk));
  if (const double m2 = deepseek_softmax_mscale2(c); m2 != 1.0)
    attn_scale_ = float(std::pow(double(qk), -0.5) * m2);
  WeightLoader wl(dir, options.load_progress);
  embed_ = place(wl.bf16("model.embed_tokens.weight", {V, H}));
  final_norm_ = place(wl.bf16("model.norm.weight", {H}));
  if (c.tie_word_embeddings) {
    lm_head_ = embed_;
    if (wl.has("lm_head.weight")) wl.bf16("lm_head.weight", {V, H});
  } else {
    lm_head_ = place(wl.bf16("lm_head.weight", {V, H}));
  }
  const MoeShape shape = c.moe_shape();
  const int64_t E = shape.num_experts, Is = shape.shared_inter;
  const bool lora = options_.lora_slots > 0;
  auto pool = [&](const std::string& name, int64_t in, int64_t out) {
    return std::make_unique<DenseLoraPool>(name, in, DenseLoraSlices::from_sizes({out}),
                                           options_.lora_slots, options_.lora_r_max, device_);
  };
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    const std::string a = p + "self_attn.";
    MlaLayer Ly;
    Ly.input_norm = place(wl.bf16(p + "input_layernorm.weight", {H}));
    Ly.post_norm = place(wl.bf16(p + "post_attention_layernorm.weight", {H}));
    if (c.q_lora_rank > 0) {
      Ly.q_a_proj = place(wl.bf16(a + "q_a_proj.weight", {c.q_lora_rank, H}));
      Ly.q_a_norm = place(wl.bf16(a + "q_a_layernorm.weight", {c.q_lora_rank}));
      Ly.q_b_proj = place(wl.bf16(a + "q_b_proj.weight", {nh * qk, c.q_lora_rank}));
    } else {
      Ly.q_proj = place(wl.bf16(a + "q_proj.weight", {nh * qk, H}));
    }
    Ly.kv_a_proj = place(wl.bf16(a + "kv_a_proj_with_mqa.weight", {L + rope, H}));
    Ly.kv_a_norm = place(wl.bf16(a + "kv_a_layernorm.weight", {L}));
    Ly.kv_b_proj = place(wl.bf16(a + "kv_b_proj.weight", {nh * (nope + vd), L}));
    Ly.o_proj = place(wl.bf16(a + "o_proj.weight", {H, nh * vd}));
    if (lora) {
      if (c.q_lora_rank > 0) {
        Ly.attn_lora["q_a_proj"] = pool(a + "q_a_proj", H, c.q_lora_rank);
        Ly.attn_lora["q_b_proj"] = pool(a + "q_b_proj", c.q_lora_rank, nh * qk);
      } else {
        Ly.attn_lora["q_proj"] = pool(a + "q_proj", H, nh * qk);
      }
      Ly.attn_lora["kv_a_proj_with_mqa"] = pool(a + "kv_a_proj_with_mqa", H, L + rope);
      Ly.attn_lora["kv_b_proj"] = pool(a + "kv_b_proj", L, nh * (nope + vd));
      Ly.attn_lora["o_proj"] = pool(a + "o_proj", nh * vd, H);
    }
    Ly.moe = c.is_moe_layer(l);
    if (Ly.moe) {
      ++num_moe_layers_;
      Ly.router = place(wl.bf16(p + "mlp.gate.weight", {E, H}));
      // bf16 or the checkpoint's quantized format, on the model's device; the shared expert in
      // the same format (MoeWeights holds one) (model/expert_loader.h).
      Ly.experts = load_routed_experts(wl, p + "mlp.experts", {}, shape, device_);
      if (Is > 0)
        load_shared_experts(wl, p + "mlp.shared_experts", {}, shape, device_, Ly.experts);
      if (c.topk_method == TopkMethod::noaux_tc) {
        // On the host whatever the loader made it on (random weights live on their device).
        const Tensor b = wl.bf16(p + "mlp.gate.e_score_correction_bias", {E}).to(Device::cpu());
        Tensor bias = Tensor::empty({E}, DType::f32);
        for (int64_t e = 0; e < E; ++e)
          bias.data<float>()[e] = bf16_to_float(b.data<bf16_t>()[e]);
        Ly.experts.correction_bias = place(bias);
      }
      Ly.experts.validate(shape);
      if (lora) {
        Ly.lora_pool = std::make_unique<MoeLoraPool>(shape, options_.lora_slots,
                                                     options_.lora_r_max, device_);
        Ly.lora_hooks = MoeLoraHooks::create(*Ly.lora_pool, options_.max_step_tokens);
      }
    } else {
      const int64_t Id = c.intermediate_size;
      MOELORA_CHECK(Id > 0, "{}/config.json: layer {} is a dense MLP layer but intermediate_size "
                    "is {}", dir, l, Id);
      Tensor gate_up = Tensor::empty({2 * Id, H}, DType::bf16);
      wl.copy_into(p + "mlp.gate_proj.weight", {Id, H}, gate_up, 0);
      wl.copy_into(p + "mlp.up_proj.weight", {Id, H}, gate_up, Id * H);
      Ly.mlp_gate_up = place(gate_up);
      Ly.mlp_down = place(wl.bf16(p + "mlp.down_proj.weight", {H, Id}));
    }
    layers_.push_back(std::move(Ly));
  }
  // DeepSeek-V3's multi-token-prediction layers (model.layers.<num_hidden_layers + i>.*) serve
  // speculative decoding, which moelora does not run; transformers skips them on load too.
  for (int i = 0; i < c.num_nextn_predict_layers; ++i)
    wl.skip_prefix(fmt::format("model.layers.{}.", c.num_hidden_layers + i),
                   "a multi-token-prediction layer (num_nextn_predict_layers), not run");
  wl.check_all_used();
  if (num_moe_layers_ > 0) {
    WeightFormat format = WeightFormat::bf16;
    for (const MlaLayer& Ly : layers_)
      if (Ly.moe) format = Ly.experts.format;
    runner_ = make_model_runner(c, options_, device_, format);
  }
  adapter_loaded_.assign(size_t(std::max(options_.lora_slots, 0)), false);
  reserve_workspace();
}

Tensor DeepseekModel::place(const Tensor& host) const {
  return device_.is_cpu() ? host : host.to(device_);
}

KvCacheConfig DeepseekModel::kv_cache_config(int64_t num_pages, int page_size,
                                             DType dtype) const {
  KvCacheConfig k;
  k.num_layers = config_.num_hidden_layers;
  k.num_kv_heads = 1;
  k.head_dim = config_.kv_lora_rank + config_.qk_rope_head_dim;
  k.page_size = page_size;
  k.num_pages = num_pages;
  k.max_seq_len = config_.max_position_embeddings;
  k.dtype = dtype;
  k.device = device_;
  k.key_only = true;
  return k;
}

void DeepseekModel::check_slot(int slot) const {
  MOELORA_CHECK(slot >= 0 && slot < int(adapter_loaded_.size()),
                "adapter slot {} is outside the model's {} LoRA slot(s) (ModelOptions::"
                "lora_slots)",
                slot, adapter_loaded_.size());
}

void DeepseekModel::unload_adapter(int slot) {
  check_slot(slot);
  for (MlaLayer& Ly : layers_) {
    if (Ly.lora_pool) Ly.lora_pool->unload(slot);
    for (auto& [name, p] : Ly.attn_lora) p->unload(slot);
  }
  adapter_loaded_[size_t(slot)] = false;
}

// y (f32) += the LoRA of `name` for the tokens with an adapter (x f32 or bf16: apply_dense_lora
// reads a bf16 copy, made in x_buf; the shrink output goes to u_buf).
void DeepseekModel::add_lora(MlaLayer& Ly, const char* name, const Tensor& x,
                             const Tensor& token_slot, bool lora, Tensor& y, StepBuffer& x_buf,
                             StepBuffer& u_buf) {
  if (!lora) return;
  auto it = Ly.attn_lora.find(name);
  if (it == Ly.attn_lora.end()) return;
  const DenseLoraPool& pool = *it->second;
  const int64_t M = x.size(0), K = x.size(1);
  Tensor xb = x;
  if (x.dtype() != DType::bf16) {
    xb = x_buf.get(M, K, DType::bf16, device_);
    ops::cast(x, xb, stream_);
  }
  Tensor u = u_buf.get(M, int64_t(pool.slices().count) * pool.r_max(), DType::f32, device_);
  apply_dense_lora(pool, xb, token_slot, u, y, stream_);
}

void DeepseekModel::attention(MlaLayer& Ly, int layer, const Tensor& xn, const StepCtx& s,
                              PagedKvCache& cache, Tensor& out) {
  const HfModelConfig& c = config_;
  const int64_t M = xn.size(0), nh = c.num_attention_heads;
  const int nope = c.qk_nope_head_dim, rope = c.qk_rope_head_dim, vd = c.v_head_dim;
  const int64_t L = c.kv_lora_rank, qk = nope + rope;
  const float eps = float(c.rms_norm_eps);
  Tensor q = ws_.q.get(M, nh * qk, DType::f32, device_);
  if (c.q_lora_rank > 0) {
    Tensor qa = ws_.qa.get(M, c.q_lora_rank, DType::f32, device_);
    ops::linear(xn, Ly.q_a_proj, qa, stream_);
    add_lora(Ly, "q_a_proj", xn, s.token_slot, s.lora, qa, ws_.lora_x, ws_.lora_u);
    ops::rms_norm(qa, Ly.q_a_norm, eps, qa, stream_);
    ops::linear(qa, Ly.q_b_proj, q, stream_);
    add_lora(Ly, "q_b_proj", qa, s.token_slot, s.lora, q, ws_.lora_x, ws_.lora_u);
  } else {
    ops::linear(xn, Ly.q_proj, q, stream_);
    add_lora(Ly, "q_proj", xn, s.token_slot, s.lora, q, ws_.lora_x, ws_.lora_u);
  }
  Tensor kv = ws_.kv.get(M, L + rope, DType::f32, device_);
  ops::linear(xn, Ly.kv_a_proj, kv, stream_);
  add_lora(Ly, "kv_a_proj_with_mqa", xn, s.token_slot, s.lora, kv, ws_.lora_x, ws_.lora_u);
  ops::mla_kv_norm(kv, Ly.kv_a_norm, eps, stream_);  // kv_a_layernorm; k_pe stays as is
  ops::mla_rope(q, int(qk), nope, rope, s.positions, c.rope_theta, rope_interleave_, stream_,
                rope_.inv_freq, rope_.cos_sin_scale);
  ops::mla_rope(kv, int(L + rope), int(L), rope, s.positions, c.rope_theta, rope_interleave_,
                stream_, rope_.inv_freq, rope_.cos_sin_scale);
  ops::mla_cache_write(kv, s.slots, cache.k(layer), stream_);

  Tensor a = ws_.attn.get(M, nh * vd, DType::f32, device_);
  // Consecutive absorbed sequences run as one batch of rows; each expanded one on its own.
  for (size_t g = 0; g < s.segments.size();) {
    const auto& seg = s.segments[g];
    if (seg.expand) {
      Tensor as = a.narrow(0, seg.row0, seg.n);
      expanded_rows(Ly, layer, q.narrow(0, seg.row0, seg.n), s, g, cache, as);
      ++g;
      continue;
    }
    size_t e = g + 1;
    while (e < s.segments.size() && !s.segments[e].expand) ++e;
    const int64_t n = s.segments[e - 1].row0 + s.segments[e - 1].n - seg.row0;
    Tensor as = a.narrow(0, seg.row0, n);
    absorbed_rows(Ly, layer, q.narrow(0, seg.row0, n), s, seg.row0, cache, as);
    g = e;
  }
  ops::linear(a, Ly.o_proj, out, stream_);
  add_lora(Ly, "o_proj", a, s.token_slot, s.lora, out, ws_.lora_x, ws_.lora_u);
}

// Decode: kv_b_proj folded into the query and the output; attention over the latent rows.
void DeepseekModel::absorbed_rows(MlaLayer& Ly, int layer, const Tensor& q, const StepCtx& s,
                                  int64_t row0, PagedKvCache& cache, Tensor& out) {
  const HfModelConfig& c = config_;
  const int64_t n = q.size(0), nh = c.num_attention_heads, L = c.kv_lora_rank;
  const int nope = c.qk_nope_head_dim, rope = c.qk_rope_head_dim, vd = c.v_head_dim;
  const Tensor ts = s.token_slot.narrow(0, row0, n), tseq = s.token_seq.narrow(0, row0, n);
  const Tensor pos = s.positions.narrow(0, row0, n);
  Tensor q_lat = ws_.q_lat.get(n, nh * (L + rope), DType::f32, device_);
  ops::mla_absorb_q(q, Ly.kv_b_proj, int(nh), nope, rope, vd, q_lat, stream_);
  // kv_b_proj's LoRA cannot be merged into the absorbed weights per request: its correction
  // runs on the side (REFERENCE.md, "MLA and LoRA on kv_b_proj"), for the rows with a slot.
  const DenseLoraPool* kvb = nullptr;
  if (s.lora) {
    auto it = Ly.attn_lora.find("kv_b_proj");
    if (it != Ly.attn_lora.end()) kvb = it->second.get();
  }
  if (kvb)
    ops::mla_lora_absorb_q(q, ts, kvb->a(), kvb->b(), kvb->ranks(), int(nh), nope, rope, vd,
                           q_lat, stream_);
  Tensor lat = ws_.lat.get(n, nh * L, DType::f32, device_);
  const float scale = attn_scale_;  // transformers': qk_head_dim^-0.5 (x YaRN's mscale^2)
  ops::mla_paged_attention(q_lat, cache.k(layer), s.block_table, tseq, pos, int(nh), scale, lat,
                           stream_);
  ops::mla_absorb_v(lat, Ly.kv_b_proj, int(nh), nope, vd, out, stream_);
  if (kvb)
    ops::mla_lora_absorb_v(lat, ts, kvb->a(), kvb->b(), kvb->ranks(), int(nh), nope, vd, out,
                           stream_);
}

// Prefill: expand every cached position's k_nope / v through kv_b_proj (with its ordinary
// LoRA), then causal attention as transformers computes it.
void DeepseekModel::expanded_rows(MlaLayer& Ly, int layer, const Tensor& q, const StepCtx& s,
                                  size_t seg, PagedKvCache& cache, Tensor& out) {
  const HfModelConfig& c = config_;
  const auto& g = s.segments[seg];
  const int64_t n = q.size(0), nh = c.num_attention_heads, L = c.kv_lora_rank;
  const int nope = c.qk_nope_head_dim, rope = c.qk_rope_head_dim, vd = c.v_head_dim;
  const int64_t len = g.start + g.n;
  Tensor lat = ws_.e_lat.get(len, L + rope, DType::f32, device_);
  ops::mla_gather_latent(cache.k(layer), s.block_table, int(seg), len, lat, stream_);
  Tensor ckv = ws_.e_ckv.get(len, L, DType::f32, device_);
  ops::copy_columns(lat, 0, ckv, stream_);
  Tensor kvb = ws_.e_kvb.get(len, nh * (nope + vd), DType::f32, device_);
  ops::linear(ckv, Ly.kv_b_proj, kvb, stream_);
  if (g.kv_b_slot.defined())
    add_lora(Ly, "kv_b_proj", ckv, g.kv_b_slot, true, kvb, ws_.e_lora_x, ws_.e_lora_u);
  const float scale = attn_scale_;
  ops::mla_expanded_attention(q, kvb, lat, s.positions.narrow(0, g.row0, n), int(nh), nope, rope,
                              vd, scale, out, stream_);
}

}  // namespace moelora
