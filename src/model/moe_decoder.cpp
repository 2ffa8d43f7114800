#include "model/moe_decoder.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "model/expert_loader.h"
#include "model/moe_block.h"
#include "model/moe_decoder_impl.h"
#include "model/ops.h"
#include "model/rope.h"
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
    : config_(config),
      options_(options),
      family_(family),
      device_(options.device),
      stream_(Stream::create(options.device)) {
  MOELORA_CHECK(options_.max_step_tokens > 0, "ModelOptions: max_step_tokens must be > 0");
  MOELORA_CHECK(options_.lora_slots <= 0 || options_.lora_r_max >= 1,
                "ModelOptions: lora_r_max must be >= 1 with LoRA slots, found {}",
                options_.lora_r_max);
  const HfModelConfig& c = config_;
  const int64_t H = c.hidden_size, D = c.head_dim, V = c.vocab_size;
  const int64_t nq = int64_t(c.num_attention_heads) * D, nkv = int64_t(c.num_key_value_heads) * D;
  const int slots = std::max(options_.lora_slots, 0);
  rope_ = rope_table(c, int(D), device_);
  WeightLoader wl(dir, options.load_progress);
  embed_ = place(wl.bf16("model.embed_tokens.weight", {V, H}));
  final_norm_ = place(wl.bf16("model.norm.weight", {H}));
  if (c.tie_word_embeddings) {
    lm_head_ = embed_;
    if (wl.has("lm_head.weight")) wl.bf16("lm_head.weight", {V, H});  // tied: same values
  } else {
    lm_head_ = place(wl.bf16("lm_head.weight", {V, H}));
  }
  const MoeShape shape = c.moe_shape();
  const int64_t E = shape.num_experts;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    DecoderLayer L;
    L.input_norm = place(wl.bf16(p + "input_layernorm.weight", {H}));
    L.post_norm = place(wl.bf16(p + "post_attention_layernorm.weight", {H}));
    // q, k, v fused into one [nq + 2 nkv, H] GEMM (the 3-slice LoRA applies to its output).
    Tensor qkv = Tensor::empty({nq + 2 * nkv, H}, DType::bf16);
    wl.copy_into(p + "self_attn.q_proj.weight", {nq, H}, qkv, 0);
    wl.copy_into(p + "self_attn.k_proj.weight", {nkv, H}, qkv, nq * H);
    wl.copy_into(p + "self_attn.v_proj.weight", {nkv, H}, qkv, (nq + nkv) * H);
    L.qkv = place(qkv);
    L.o_proj = place(wl.bf16(p + "self_attn.o_proj.weight", {H, nq}));
    if (family_.qk_norm) {
      L.q_norm = place(wl.bf16(p + "self_attn.q_norm.weight", {D}));
      L.k_norm = place(wl.bf16(p + "self_attn.k_norm.weight", {D}));
    }
    if (slots > 0) {
      L.qkv_lora = std::make_unique<DenseLoraPool>(p + "self_attn.qkv", H,
                                                   DenseLoraSlices::from_sizes({nq, nkv, nkv}),
                                                   slots, options_.lora_r_max, device_);
      L.o_lora = std::make_unique<DenseLoraPool>(p + "self_attn.o_proj", nq,
                                                 DenseLoraSlices::from_sizes({H}), slots,
                                                 options_.lora_r_max, device_);
    }
    L.moe = c.is_moe_layer(l);
    if (L.moe) {
      ++num_moe_layers_;
      L.router = place(wl.bf16(p + family_.moe_module + "." + family_.router + ".weight", {E, H}));
      L.experts = load_experts(wl, l);
      L.experts.validate(shape);
      if (slots > 0) {
        L.lora_pool = std::make_unique<MoeLoraPool>(shape, slots, options_.lora_r_max, device_);
        L.lora_hooks = MoeLoraHooks::create(*L.lora_pool, options_.max_step_tokens);
      }
    } else {
      const int64_t Id = c.intermediate_size;
      MOELORA_CHECK(Id > 0,
                    "{}/config.json: layer {} is a dense MLP layer but "
                    "intermediate_size is {}",
                    dir, l, Id);
      Tensor gate_up = Tensor::empty({2 * Id, H}, DType::bf16);
      wl.copy_into(p + "mlp.gate_proj.weight", {Id, H}, gate_up, 0);
      wl.copy_into(p + "mlp.up_proj.weight", {Id, H}, gate_up, Id * H);
      L.mlp_gate_up = place(gate_up);
      L.mlp_down = place(wl.bf16(p + "mlp.down_proj.weight", {H, Id}));
      if (slots > 0) {
        L.gate_up_lora = std::make_unique<DenseLoraPool>(p + "mlp.gate_up", H,
                                                         DenseLoraSlices::from_sizes({Id, Id}),
                                                         slots, options_.lora_r_max, device_);
        L.down_lora = std::make_unique<DenseLoraPool>(p + "mlp.down_proj", Id,
                                                      DenseLoraSlices::from_sizes({H}), slots,
                                                      options_.lora_r_max, device_);
      }
    }
    layers_.push_back(std::move(L));
  }
  wl.check_all_used();
  if (num_moe_layers_ > 0) {
    WeightFormat format = WeightFormat::bf16;
    for (const DecoderLayer& L : layers_)
      if (L.moe) format = L.experts.format;
    runner_ = make_model_runner(c, options_, device_, format);
  }
  adapter_loaded_.assign(size_t(slots), false);
  reserve_workspace();
}

Tensor MoeDecoder::place(const Tensor& host) const {
  return device_.is_cpu() ? host : host.to(device_);
}

MoeWeights MoeDecoder::load_experts(WeightLoader& wl, int layer) const {
  // bf16 or the checkpoint's quantized format, per-expert or fused 3-D keys, made on the
  // model's device (model/expert_loader.h).
  const std::string p = fmt::format("model.layers.{}.", layer);
  ExpertNames names;
  names.proj = family_.expert_proj;
  names.fused_prefixes = {p + "mlp.experts"};  // transformers 5 saves Mixtral's fused experts here
  return load_routed_experts(wl, p + family_.moe_module + ".experts", names, config_.moe_shape(),
                             device_);
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
  k.device = device_;
  return k;
}

void MoeDecoder::check_slot(int slot) const {
  MOELORA_CHECK(slot >= 0 && slot < int(adapter_loaded_.size()),
                "adapter slot {} is outside the model's {} LoRA slot(s) (ModelOptions::"
                "lora_slots)",
                slot, adapter_loaded_.size());
}

Tensor MoeDecoder::lora_u(const DenseLoraPool& pool, int64_t rows) {
  return ws_.lora_u.get(rows, int64_t(pool.slices().count) * pool.r_max(), DType::f32, device_);
}

void MoeDecoder::add_lora(const DenseLoraPool* pool, const Tensor& xb, const LoraBatchState& lb,
                          Tensor& y) {
  if (pool == nullptr || !lb.any) return;
  Tensor u = lora_u(*pool, xb.size(0));
  apply_dense_lora(*pool, xb, lb.token_slot, u, y, stream_);
}

void MoeDecoder::attention(DecoderLayer& L, int layer, const Tensor& xn, const Tensor& xb,
                           const StepTables& t, const LoraBatchState& lb, PagedKvCache& cache,
                           Tensor& out, Tensor& h) {
  const HfModelConfig& c = config_;
  const int64_t M = xn.size(0), D = c.head_dim;
  const int64_t nq = int64_t(c.num_attention_heads) * D, nkv = int64_t(c.num_key_value_heads) * D;
  Tensor qkv = ws_.qkv.get(M, nq + 2 * nkv, DType::f32, device_);
  Tensor q = ws_.q.get(M, nq, DType::f32, device_), k = ws_.k.get(M, nkv, DType::f32, device_);
  Tensor v = ws_.v.get(M, nkv, DType::f32, device_);
  Tensor a = ws_.attn.get(M, nq, DType::f32, device_);
  // The fast path splits q/k/v in one kernel, the LoRA expand folded into it (its shrink ran on
  // the side stream beside the base GEMM; both read xn / xb, written before the fork).
  const bool fold = overlap_lora();
  const bool qkv_lora = L.qkv_lora && lb.any;
  if (fold) {
    Tensor u;
    if (qkv_lora) {
      u = lora_u(*L.qkv_lora, M);
      fork_.record(stream_);
      side_.wait(fork_);
      Tensor xbw = xb;  // the buffer run_step left for the side stream to fill
      ops::cast(xn, xbw, side_);
      dense_lora_shrink(*L.qkv_lora, xb, lb.token_slot, u, side_);
      join_.record(side_);
    }
    ops::linear(xn, L.qkv, qkv, stream_);
    if (qkv_lora) stream_.wait(join_);
    dense_lora_expand_split(qkv_lora ? L.qkv_lora.get() : nullptr, u, lb.token_slot, qkv,
                            DenseLoraSlices::from_sizes({nq, nkv, nkv}), {&q, &k, &v}, stream_);
  } else {
    ops::linear(xn, L.qkv, qkv, stream_);
    add_lora(L.qkv_lora.get(), xb, lb, qkv);
    ops::copy_columns(qkv, 0, q, stream_);
    ops::copy_columns(qkv, nq, k, stream_);
    ops::copy_columns(qkv, nq + nkv, v, stream_);
  }
  // Per-head q / k norms (Qwen3), rope, and k / v into the cache: one kernel on CUDA.
  ops::attention_prologue(q, k, v, family_.qk_norm ? L.q_norm : Tensor(),
                          family_.qk_norm ? L.k_norm : Tensor(), float(c.rms_norm_eps), int(D),
                          t.positions, c.rope_theta, t.slots, cache.k(layer), cache.v(layer),
                          stream_, rope_.inv_freq, rope_.cos_sin_scale);
  const float scale = 1.0f / std::sqrt(float(D));
  ops::paged_attention(q, cache.k(layer), cache.v(layer), t.block_table, t.token_seq, t.positions,
                       scale, a, stream_);
  if (fold) {
    // o_proj's expand folded into the residual add (its shrink beside the base GEMM).
    const bool o_lora = L.o_lora && lb.any;
    Tensor u;
    if (o_lora) {
      Tensor ab = ws_.attn_b.get(M, nq, DType::bf16, device_);
      u = lora_u(*L.o_lora, M);
      fork_.record(stream_);
      side_.wait(fork_);
      ops::cast(a, ab, side_);
      dense_lora_shrink(*L.o_lora, ab, lb.token_slot, u, side_);
      join_.record(side_);
    }
    ops::linear(a, L.o_proj, out, stream_);
    if (o_lora) stream_.wait(join_);
    dense_lora_expand_residual(o_lora ? L.o_lora.get() : nullptr, u, lb.token_slot, out, h,
                               stream_);
    return;
  }
  ops::linear(a, L.o_proj, out, stream_);
  if (L.o_lora && lb.any) {
    Tensor ab = ws_.attn_b.get(M, nq, DType::bf16, device_);
    ops::cast(a, ab, stream_);
    add_lora(L.o_lora.get(), ab, lb, out);
  }
  ops::residual_add(h, out, stream_);
}

void MoeDecoder::mlp(DecoderLayer& L, const Tensor& xn, const Tensor& xb, const LoraBatchState& lb,
                     Tensor& out, Tensor& router_margin, int margin_col) {
  const int64_t M = xn.size(0), H = config_.hidden_size;
  if (!L.moe) {
    const int64_t Id = L.mlp_down.size(1);
    Tensor gu = ws_.gate_up.get(M, 2 * Id, DType::f32, device_);
    Tensor act = ws_.act.get(M, Id, DType::f32, device_);
    ops::linear(xn, L.mlp_gate_up, gu, stream_);
    add_lora(L.gate_up_lora.get(), xb, lb, gu);
    ops::silu_mul(gu, act, stream_);
    ops::linear(act, L.mlp_down, out, stream_);
    if (L.down_lora && lb.any) {
      Tensor ab = ws_.act_b.get(M, Id, DType::bf16, device_);
      ops::cast(act, ab, stream_);
      add_lora(L.down_lora.get(), ab, lb, out);
    }
    return;
  }
  // The router reads the f32 normed activations (as transformers' f32 forward does); the
  // experts read the bf16 copy the MoE runner's contract asks for.
  const int64_t E = L.router.size(0);
  Tensor logits = ws_.router_logits.get(M, E, DType::f32, device_);
  Tensor y = ws_.moe_y.get(M, H, DType::bf16, device_);
  ops::linear(xn, L.router, logits, stream_);
  ops::router_margin(logits, config_.num_experts_per_tok, router_margin, margin_col, stream_);
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

void MoeDecoder::run_step(const StepTables& t, const LoraBatchState& lb, PagedKvCache& cache,
                          StepOutput& result) {
  const HfModelConfig& c = config_;
  const int64_t M = t.positions.size(0), H = c.hidden_size;
  const float eps = float(c.rms_norm_eps);
  // The residual stream stays f32 on both backends (the closest agreement with the CPU path).
  Tensor h = ws_.h.get(M, H, DType::f32, device_), xn = ws_.xn.get(M, H, DType::f32, device_);
  Tensor delta = ws_.delta.get(M, H, DType::f32, device_);
  Tensor xb = ws_.xb.get(M, H, DType::bf16, device_);
  ops::embedding(t.ids, embed_, h, stream_);
  int moe_index = 0;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    DecoderLayer& L = layers_[size_t(l)];
    ops::rms_norm(h, L.input_norm, eps, xn, stream_);
    // xb here feeds only the q/k/v LoRA shrink: on the fast path the side stream casts it.
    if (lb.any && !overlap_lora()) ops::cast(xn, xb, stream_);
    attention(L, l, xn, xb, t, lb, cache, delta, h);
    ops::rms_norm(h, L.post_norm, eps, xn, stream_);
    if (L.moe || lb.any) ops::cast(xn, xb, stream_);
    mlp(L, xn, xb, lb, delta, result.margin(), L.moe ? moe_index++ : -1);
    ops::residual_add(h, delta, stream_);
  }
  result.compute_logits(h, t.last_row, final_norm_, lm_head_, eps, xn, ws_.last_h, ws_.last_n,
                        stream_);
}

StepResult MoeDecoder::forward(const std::vector<SeqInput>& batch, PagedKvCache& cache,
                               bool all_logits) {
  const HfModelConfig& c = config_;
  LoraBatchState lb;
  const StepDims d = validate_step(batch, cache, lb);
  // The fast path replays a graph for decode steps (one token per sequence) that fit a bucket.
  if (graphs_.enabled() && !all_logits && d.m == d.s)
    if (const int64_t bucket = graphs_.bucket(d.s); bucket > 0)
      return forward_graph(batch, cache, d, bucket, lb);

  StepTables t;
  // On CUDA the block table is as wide as a decode graph's would be (a power-of-two number of
  // pages), so eager steps and graph replays hand the kernels the same tables (nothing may
  // choose differently by the table's width and break replay's eager bits).
  const int64_t P = device_.is_cuda() ? DecodeGraphs::page_bucket(d.p) : d.p;
  const int64_t n = 5 * d.m + d.s + d.s * P;
  Tensor dst = device_.is_cuda() ? ws_.tables.get(1, n, DType::i32, device_).view({n}) : Tensor();
  build_tables(batch, cache, d, d.m, P, dst, t, lb);
  StepOutput result(ws_.out, device_, d.m, d.s, c.vocab_size, num_moe_layers_, all_logits);
  run_step(t, lb, cache, result);
  ++decode_stats_.eager;
  for (const SeqInput& s : batch) cache.advance(s.seq, int64_t(s.tokens.size()));
  StepResult r = result.finish(download_, stream_);
  upload_pending_ = false;  // finish synchronized the stream: the staged tables are free
  return r;
}

StepResult MoeDecoder::forward_graph(const std::vector<SeqInput>& batch, PagedKvCache& cache,
                                     const StepDims& d, int64_t bucket, LoraBatchState& lb) {
  const HfModelConfig& c = config_;
  const int64_t R = bucket, P = DecodeGraphs::page_bucket(d.p);
  const DecodeGraphs::Key key{R, P, lb.any, cache.id()};
  DecodeGraphs::Entry& e = graphs_.entry(key, 6 * R + R * P, device_);
  StepTables t;
  build_tables(batch, cache, d, R, P, e.tables, t, lb);
  StepOutput result(ws_.out, device_, R, R, c.vocab_size, num_moe_layers_, false);
  DecodeGraphs::run(
      e, ws_.moves, stream_, [&] { run_step(t, lb, cache, result); }, decode_stats_);
  for (const SeqInput& s : batch) cache.advance(s.seq, int64_t(s.tokens.size()));
  StepResult r = result.finish(download_, stream_);
  upload_pending_ = false;
  // The padding rows' logits and margins are dropped (views of the one pinned buffer).
  r.last_logits = r.last_logits.first_rows(d.s);
  r.router_margin = r.router_margin.first_rows(d.m);
  return r;
}

void MoeDecoder::set_decode_options(const DecodeOptions& options) {
  const bool fast = apply_decode_options(options, layers_, options_, device_, graphs_);
  const bool new_side =
      !side_.handle() || options.side_stream_priority != decode_options_.side_stream_priority;
  decode_options_ = options;
  decode_stats_ = {};
  if (fast && new_side) {
    side_ = Stream::create(device_, options.side_stream_priority);
    fork_ = Event::create(device_, false);
    join_ = Event::create(device_, false);
  }
}

std::unique_ptr<Model> make_moe_decoder(const std::string& dir, const HfModelConfig& config,
                                        const ModelOptions& options,
                                        const MoeDecoderFamily& family) {
  return std::make_unique<MoeDecoder>(dir, config, options, family);
}

}  // namespace moelora
