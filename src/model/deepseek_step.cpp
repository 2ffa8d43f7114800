// DeepSeek model: the step's tables and buffers, the MLP / MoE block, the batched forward step
// and adapter loading. One code path for both backends: every tensor lives on
// ModelOptions::device and the ops dispatch on it (model/ops.h, model/mla_dispatch.h); on CUDA
// a step uploads its packed tables once and downloads the logits and router margins once.
#include <algorithm>
#include <cctype>
#include <cmath>

#include "model/deepseek.h"
#include "model/mla_dispatch.h"
#include "model/moe_block.h"
#include "model/models.h"
#include "moelora/lora/peft_adapter.h"

namespace moelora {

void DeepseekModel::reserve_workspace() {
  const HfModelConfig& c = config_;
  const int64_t T = options_.max_step_tokens, H = c.hidden_size, nh = c.num_attention_heads;
  const int64_t nope = c.qk_nope_head_dim, rope = c.qk_rope_head_dim, vd = c.v_head_dim;
  const int64_t L = c.kv_lora_rank;
  const Device d = device_;
  for (StepBuffer* b : {&ws_.h, &ws_.xn, &ws_.delta, &ws_.last_h, &ws_.last_n})
    b->get(T, H, DType::f32, d);
  ws_.xb.get(T, H, DType::bf16, d);
  ws_.q.get(T, nh * (nope + rope), DType::f32, d);
  if (c.q_lora_rank > 0) ws_.qa.get(T, c.q_lora_rank, DType::f32, d);
  ws_.kv.get(T, L + rope, DType::f32, d);
  ws_.attn.get(T, nh * vd, DType::f32, d);
  ws_.q_lat.get(T, nh * (L + rope), DType::f32, d);
  ws_.lat.get(T, nh * L, DType::f32, d);
  if (num_moe_layers_ > 0) {
    ws_.router_logits.get(T, c.moe_shape().num_experts, DType::f32, d);
    ws_.moe_y.get(T, H, DType::bf16, d);
  }
  if (num_moe_layers_ < c.num_hidden_layers) {
    ws_.gate_up.get(T, 2 * c.intermediate_size, DType::f32, d);
    ws_.act.get(T, c.intermediate_size, DType::f32, d);
  }
  if (options_.lora_slots > 0) {
    // The widest LoRA input of a decode step: x (H), q_a's output or the attention output.
    const int64_t K = std::max({H, int64_t(c.q_lora_rank), nh * vd});
    const int64_t r = options_.lora_r_max;
    ws_.lora_x.get(T, K, DType::bf16, d);
    ws_.lora_u.get(T, r, DType::f32, d);
    if (d.is_cuda()) {  // the fast path's side stream (set_decode_options may enable it)
      ws_.side_x.get(T, K, DType::bf16, d);
      for (StepBuffer* b : {&ws_.side_u, &ws_.side_u_kv}) b->get(T, r, DType::f32, d);
    }
  }
  // The expanded path's buffers grow with the context of the prefill chunks seen (they count
  // apart: decode graphs never read them).
}

void DeepseekModel::validate_step(const std::vector<SeqInput>& batch, PagedKvCache& cache,
                                  StepCtx& s) {
  const HfModelConfig& c = config_;
  MOELORA_CHECK(!batch.empty(), "forward: empty batch");
  const KvCacheConfig& kc = cache.config();
  const int row = c.kv_lora_rank + c.qk_rope_head_dim;
  MOELORA_CHECK(kc.num_layers == c.num_hidden_layers && kc.num_kv_heads == 1 &&
                    kc.head_dim == row,
                "forward: KV cache has {} layers x {} heads x {} dims, the MLA model needs {} x 1 "
                "x {} (kv_lora_rank + qk_rope_head_dim; use the model's kv_cache_config)",
                kc.num_layers, kc.num_kv_heads, kc.head_dim, c.num_hidden_layers, row);
  MOELORA_CHECK(kc.device == device_,
                "forward: KV cache on {}, the model on {} (build the cache from "
                "Model::kv_cache_config)",
                kc.device.str(), device_.str());
  // Validate everything before the cache changes.
  int64_t M = 0;
  std::vector<int> seen;
  for (size_t b = 0; b < batch.size(); ++b) {
    const SeqInput& in = batch[b];
    MOELORA_CHECK(!in.tokens.empty(), "forward: sequence {} (batch entry {}) has no tokens",
                  in.seq, b);
    for (int32_t t : in.tokens)
      MOELORA_CHECK(t >= 0 && t < c.vocab_size,
                    "forward: sequence {}: token id {} is outside the vocabulary [0, {})", in.seq,
                    t, c.vocab_size);
    MOELORA_CHECK(std::find(seen.begin(), seen.end(), in.seq) == seen.end(),
                  "forward: sequence {} appears twice in one step", in.seq);
    seen.push_back(in.seq);
    const int64_t new_len = cache.length(in.seq) + int64_t(in.tokens.size());
    if (!cache.can_reserve(in.seq, new_len)) cache.reserve(in.seq, new_len);  // throws why
    if (in.adapter_slot >= 0) {
      check_slot(in.adapter_slot);
      MOELORA_CHECK(adapter_loaded(in.adapter_slot),
                    "forward: sequence {} asks for adapter slot {}, which holds no adapter",
                    in.seq, in.adapter_slot);
      s.lora = true;
    } else {
      MOELORA_CHECK(in.adapter_slot == -1,
                    "forward: sequence {}: adapter slot {} (expected -1 or a slot)", in.seq,
                    in.adapter_slot);
    }
    M += int64_t(in.tokens.size());
  }
  s.m = M;
  s.p = 1;  // pages per block-table row
  for (const SeqInput& in : batch) {
    const int64_t start = cache.length(in.seq), n = int64_t(in.tokens.size());
    cache.reserve(in.seq, start + n);
    s.p = std::max<int64_t>(s.p, int64_t(cache.pages(in.seq).size()));
    StepCtx::Segment g;
    g.row0 = s.segments.empty() ? 0 : s.segments.back().row0 + s.segments.back().n;
    g.n = n;
    g.start = start;
    g.adapter_slot = in.adapter_slot;
    g.expand = path_ == MlaPath::expanded || (path_ == MlaPath::automatic && n > 1);
    s.segments.push_back(g);
  }
}

void DeepseekModel::build_tables(const std::vector<SeqInput>& batch, PagedKvCache& cache,
                                 int64_t rows, int64_t pages, Tensor dst, StepCtx& s) {
  // One packed i32 table: ids, positions, token_seq, slots, token_slot [R each], last_row [Sr],
  // block_table [Sr, P], the expanded sequences' kv_b_proj slots; one upload on CUDA. Padded
  // rows (rows > M: decode steps only, one token per sequence) are their own sequences.
  const int64_t M = s.m, S = int64_t(batch.size()), R = rows, P = pages;
  const int64_t Sr = R > M ? R : S;
  int64_t kvb_rows = 0;  // expanded sequences with an adapter: a kv_b_proj slot per position
  for (const StepCtx::Segment& g : s.segments)
    if (g.expand && s.lora && g.adapter_slot >= 0) kvb_rows += g.start + g.n;
  const int64_t n_all = 5 * R + Sr + Sr * P + kvb_rows;
  MOELORA_CHECK(dst.numel() >= n_all, "DeepSeek step tables: {} i32 needed, the buffer has {}",
                n_all, dst.numel());
  if (!staging_.defined() || staging_.numel() < n_all)
    staging_ = Tensor::empty({std::max<int64_t>(n_all, 4096)}, DType::i32);
  int32_t* base = staging_.data<int32_t>();
  int32_t *ids = base, *pos = ids + R, *seq = pos + R, *slots = seq + R, *tslot = slots + R;
  int32_t *last = tslot + R, *bt = last + Sr, *kvb = bt + Sr * P;
  for (int64_t b = 0; b < S; ++b) {
    const SeqInput& in = batch[size_t(b)];
    const StepCtx::Segment& g = s.segments[size_t(b)];
    const std::vector<int32_t>& pg = cache.pages(in.seq);
    for (int64_t j = 0; j < P; ++j) bt[b * P + j] = j < int64_t(pg.size()) ? pg[size_t(j)] : -1;
    for (int64_t i = 0; i < g.n; ++i) {
      const int64_t m = g.row0 + i;
      ids[m] = in.tokens[size_t(i)];
      pos[m] = int32_t(g.start + i);
      seq[m] = int32_t(b);
      slots[m] = cache.slot(in.seq, g.start + i);
      tslot[m] = in.adapter_slot;
    }
    last[b] = int32_t(g.row0 + g.n - 1);
  }
  for (int64_t r = M; r < R; ++r) {
    ids[r] = 0, pos[r] = 0, seq[r] = int32_t(r), slots[r] = -1, tslot[r] = -1;
    last[r] = int32_t(r);
    bt[r * P] = 0;
    for (int64_t j = 1; j < P; ++j) bt[r * P + j] = -1;
    StepCtx::Segment g;
    g.row0 = r;
    g.n = 1;
    s.segments.push_back(g);  // absorbed, base model
  }
  int32_t* k = kvb;
  for (const StepCtx::Segment& g : s.segments)
    if (g.expand && s.lora && g.adapter_slot >= 0)
      k = std::fill_n(k, g.start + g.n, g.adapter_slot);
  // The layers read a copy of the staging on either backend (the upload on CUDA; pageable
  // staging is reusable once the call returns), so the CPU tests also catch a table written
  // after this point.
  Tensor packed = dst.narrow(0, 0, n_all);
  packed.copy_from(staging_.narrow(0, 0, n_all), device_.is_cuda() ? &stream_ : nullptr);
  s.ids = packed.narrow(0, 0, R);
  s.positions = packed.narrow(0, R, R);
  s.token_seq = packed.narrow(0, 2 * R, R);
  s.slots = packed.narrow(0, 3 * R, R);
  s.token_slot = packed.narrow(0, 4 * R, R);
  s.last_row = packed.narrow(0, 5 * R, Sr);
  s.block_table = packed.narrow(0, 5 * R + Sr, Sr * P).view({Sr, P});
  int64_t off = 5 * R + Sr + Sr * P;
  for (StepCtx::Segment& g : s.segments) {
    if (!(g.expand && s.lora && g.adapter_slot >= 0)) continue;
    g.kv_b_slot = packed.narrow(0, off, g.start + g.n);
    off += g.start + g.n;
  }
}

void DeepseekModel::mlp(MlaLayer& Ly, const Tensor& xn, const StepCtx& s, Tensor& out,
                        Tensor& router_margin, int margin_col) {
  const int64_t M = xn.size(0), H = config_.hidden_size;
  if (!Ly.moe) {
    const int64_t Id = Ly.mlp_down.size(1);
    Tensor gu = ws_.gate_up.get(M, 2 * Id, DType::f32, device_);
    Tensor act = ws_.act.get(M, Id, DType::f32, device_);
    ops::linear(xn, Ly.mlp_gate_up, gu, stream_);
    ops::silu_mul(gu, act, stream_);
    ops::linear(act, Ly.mlp_down, out, stream_);
    return;
  }
  // The router reads the f32 normed activations (transformers' gate runs in f32); the experts
  // read the bf16 copy MoeRunner's contract asks for.
  const int64_t E = Ly.router.size(0);
  Tensor logits = ws_.router_logits.get(M, E, DType::f32, device_);
  Tensor xb = ws_.xb.get(M, H, DType::bf16, device_), y = ws_.moe_y.get(M, H, DType::bf16, device_);
  ops::linear(xn, Ly.router, logits, stream_);
  // How close each token's routing is to a tie, in the router's selection scores (V2: the
  // router logits, whose order softmax keeps; V3: sigmoid + correction bias): bf16-level
  // differences can flip a choice that close, which conformance checks need to know.
  ops::grouped_router_margin(logits, Ly.experts.correction_bias, config_.router(), router_margin,
                             margin_col, stream_);
  ops::cast(xn, xb, stream_);
  MoeLoraHooks* hooks = nullptr;
  if (s.lora) {
    MOELORA_CHECK(Ly.lora_hooks != nullptr,
                  "{}: LoRA requested but the model was loaded without LoRA slots",
                  config_.model_type);
    hooks = Ly.lora_hooks.get();
  }
  run_moe_chunked(*runner_, Ly.experts, hooks, s.token_slot, xb, logits, options_.max_step_tokens,
                  y, out, stream_);
}

void DeepseekModel::run_step(const StepCtx& s, PagedKvCache& cache, StepOutput& result) {
  const HfModelConfig& c = config_;
  const int64_t M = s.ids.size(0), H = c.hidden_size;
  const float eps = float(c.rms_norm_eps);
  Tensor h = ws_.h.get(M, H, DType::f32, device_), xn = ws_.xn.get(M, H, DType::f32, device_);
  Tensor delta = ws_.delta.get(M, H, DType::f32, device_);
  // The fast path overlaps the attention LoRA on decode steps (deepseek_fast.cpp).
  const bool overlap = overlap_lora() && s.lora && s.all_absorbed();
  ops::embedding(s.ids, embed_, h, stream_);
  int moe_index = 0;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    MlaLayer& Ly = layers_[size_t(l)];
    ops::rms_norm(h, Ly.input_norm, eps, xn, stream_);
    if (overlap)
      attention_overlapped(Ly, l, xn, s, cache, delta);
    else
      attention(Ly, l, xn, s, cache, delta);
    ops::residual_add(h, delta, stream_);
    ops::rms_norm(h, Ly.post_norm, eps, xn, stream_);
    mlp(Ly, xn, s, delta, result.margin(), Ly.moe ? moe_index++ : -1);
    ops::residual_add(h, delta, stream_);
  }
  result.compute_logits(h, s.last_row, final_norm_, lm_head_, eps, xn, ws_.last_h, ws_.last_n,
                        stream_);
}

StepResult DeepseekModel::forward(const std::vector<SeqInput>& batch, PagedKvCache& cache,
                                  bool all_logits) {
  const HfModelConfig& c = config_;
  StepCtx s;
  validate_step(batch, cache, s);
  const int64_t S = int64_t(batch.size());
  // The fast path replays a graph for decode steps (one absorbed token per sequence) that fit
  // a bucket.
  if (graphs_.enabled() && !all_logits && s.m == S && s.all_absorbed())
    if (const int64_t bucket = graphs_.bucket(S); bucket > 0)
      return forward_graph(batch, cache, s, bucket);

  int64_t n = 5 * s.m + S + S * s.p;
  for (const StepCtx::Segment& g : s.segments)
    if (g.expand && s.lora && g.adapter_slot >= 0) n += g.start + g.n;
  build_tables(batch, cache, s.m, s.p, ws_.tables.get(1, n, DType::i32, device_).view({n}), s);
  StepOutput result(ws_.out, device_, s.m, S, c.vocab_size, num_moe_layers_, all_logits);
  run_step(s, cache, result);
  ++decode_stats_.eager;
  for (const SeqInput& in : batch) cache.advance(in.seq, int64_t(in.tokens.size()));
  return result.finish(download_, stream_);
}

namespace {

// Layer index and the rest of `module` after "model.layers.<L>.", or -1.
int layer_of(const std::string& module, std::string& rest) {
  const std::string head = "model.layers.";
  if (module.rfind(head, 0) != 0) return -1;
  size_t j = head.size();
  while (j < module.size() && std::isdigit(static_cast<unsigned char>(module[j]))) ++j;
  if (j == head.size() || j - head.size() > 6 || j >= module.size() || module[j] != '.') return -1;
  rest = module.substr(j + 1);
  return std::stoi(module.substr(head.size(), j - head.size()));
}

}  // namespace

void DeepseekModel::load_adapter(int slot, const PeftAdapter& adapter) {
  check_slot(slot);
  const HfModelConfig& c = config_;
  MOELORA_CHECK(!layers_.empty() && (!layers_[0].attn_lora.empty()),
                "{}: adapters need LoRA slots (ModelOptions::lora_slots)", c.model_type);
  // Sort every module into expert LoRA (handled per layer below) or attention LoRA; anything
  // else would be silently ignored, so it is an error.
  std::vector<std::map<std::string, DenseLoraSlice>> attn(layers_.size());
  for (const auto& [name, mod] : adapter.modules()) {
    std::string rest;
    const int l = layer_of(name, rest);
    const bool in_range = l >= 0 && l < int(layers_.size());
    if (in_range && layers_[size_t(l)].moe &&
        (rest == "mlp.experts" || rest.rfind("mlp.experts.", 0) == 0))
      continue;
    const std::string proj = rest.rfind("self_attn.", 0) == 0 ? rest.substr(10) : "";
    MOELORA_CHECK(in_range && !proj.empty() && layers_[size_t(l)].attn_lora.count(proj),
                  "adapter {}: module '{}' is not supported by the {} model: LoRA applies to "
                  "routed experts (model.layers.L.mlp.experts) and the attention projections "
                  "(self_attn.{}); dense MLP layers and shared experts are a TODO. Refusing to "
                  "drop it.",
                  adapter.dir(), name, c.model_type,
                  c.q_lora_rank > 0 ? "q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj"
                                    : "q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj");
    DenseLoraSlice sl;
    sl.a = mod.a;
    sl.b = mod.b;
    sl.scale = mod.scaling;
    attn[size_t(l)][proj] = sl;
  }
  MOELORA_CHECK(adapter.unsupported_keys().empty(),
                "adapter {}: {} key(s) cannot be applied (e.g. '{}'); refusing to drop them",
                adapter.dir(), adapter.unsupported_keys().size(),
                adapter.unsupported_keys().empty() ? "" : adapter.unsupported_keys()[0]);
  const MoeShape shape = c.moe_shape();
  // Build every layer's expert LoRA first so a bad layer leaves the slot untouched.
  std::vector<MoeLoraWeights> experts(layers_.size());
  for (size_t l = 0; l < layers_.size(); ++l)
    if (layers_[l].moe)
      experts[l] = moe_lora_from_peft(adapter, fmt::format("model.layers.{}.mlp.experts", l),
                                      shape.num_experts, shape.hidden, shape.inter);
  try {
    for (size_t l = 0; l < layers_.size(); ++l) {
      MlaLayer& Ly = layers_[l];
      for (auto& [proj, pool] : Ly.attn_lora) {
        auto it = attn[l].find(proj);
        pool->load(slot, {it == attn[l].end() ? DenseLoraSlice{} : it->second});
      }
      if (Ly.moe) Ly.lora_pool->load(slot, experts[l]);
    }
  } catch (...) {
    unload_adapter(slot);  // a shape error half way: leave the slot empty, not mixed
    throw;
  }
  adapter_loaded_[size_t(slot)] = true;
}

std::unique_ptr<Model> make_deepseek(const std::string& dir, const HfModelConfig& config,
                                     const ModelOptions& options) {
  return std::make_unique<DeepseekModel>(dir, config, options);
}

}  // namespace moelora
