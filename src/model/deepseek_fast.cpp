// DeepSeek model: the fast decode path (DecodePath::fast, issue 5), as the Qwen3 / Mixtral
// decoder has it (moe_decoder.cpp):
//  - decode steps (every sequence one new token, all on the absorbed MLA path, last-token
//    logits, at most DecodeOptions::max_batch sequences) pad to a batch bucket and replay a
//    CUDA graph per (bucket, block-table width, LoRA on/off, cache) (model/decode_graphs.h);
//  - with adapters in the batch, the attention LoRA shrinks run on a side stream beside the
//    base projections, and so does the q side of kv_b_proj's absorbed-path correction, beside
//    the whole kv_a branch (its GEMM, LoRA, norm, RoPE and cache write).
// The overlapped attention enqueues the ops of DeepseekModel::attention with the same inputs,
// in an order that only moves independent work, so both paths give the same bits.
#include <cmath>

#include "model/deepseek.h"
#include "model/mla_dispatch.h"
#include "model/moe_block.h"

namespace moelora {
namespace {

// The hand-overs between the model's stream and the side stream in one layer's attention:
// fork = the side waits for the main stream, join = the main stream waits for the side.
enum EventIndex : size_t {
  kForkX,    // xn ready: cast to bf16, shrink q (or q_a) and kv_a
  kJoinQ,    // q / q_a shrink done
  kJoinKv,   // kv_a shrink done
  kForkQb,   // q_a normed: its bf16 copy and the q_b shrink
  kJoinQb,   // q_b shrink done
  kForkKvb,  // q roped and absorbed: kv_b_proj's q-side correction into q_latent
  kJoinKvb,  // that correction done
  kForkO,    // attention output ready: its bf16 copy and the o_proj shrink
  kJoinO,    // o_proj shrink done
  kEvents
};

}  // namespace

void DeepseekModel::set_decode_options(const DecodeOptions& options) {
  // Graphs and the side stream on CUDA only; on the CPU `fast` runs as `hooks`.
  const bool fast = apply_decode_options(options, layers_, options_, device_, graphs_);
  const bool new_side =
      !side_.handle() || options.side_stream_priority != decode_options_.side_stream_priority;
  decode_options_ = options;
  decode_stats_ = {};
  if (fast && new_side) {
    side_ = Stream::create(device_, options.side_stream_priority);
    events_.clear();
    for (size_t i = 0; i < kEvents; ++i) events_.push_back(Event::create(device_, false));
  }
}

StepResult DeepseekModel::forward_graph(const std::vector<SeqInput>& batch, PagedKvCache& cache,
                                        StepCtx& s, int64_t bucket) {
  const HfModelConfig& c = config_;
  const int64_t R = bucket, P = DecodeGraphs::page_bucket(s.p);
  const DecodeGraphs::Key key{R, P, s.lora, cache.id()};
  DecodeGraphs::Entry& e = graphs_.entry(key, 6 * R + R * P, device_);
  build_tables(batch, cache, R, P, e.tables, s);
  StepOutput result(ws_.out, device_, R, R, c.vocab_size, num_moe_layers_, false);
  DecodeGraphs::run(
      e, ws_.moves, stream_, [&] { run_step(s, cache, result); }, decode_stats_);
  for (const SeqInput& in : batch) cache.advance(in.seq, int64_t(in.tokens.size()));
  StepResult r = result.finish(download_, stream_);
  // The padding rows' logits and margins are dropped (views of the one pinned buffer).
  r.last_logits = r.last_logits.first_rows(s.m);
  r.router_margin = r.router_margin.first_rows(s.m);
  return r;
}

void DeepseekModel::attention_overlapped(MlaLayer& Ly, int layer, const Tensor& xn,
                                         const StepCtx& s, PagedKvCache& cache, Tensor& out) {
  const HfModelConfig& c = config_;
  const int64_t M = xn.size(0), H = c.hidden_size, nh = c.num_attention_heads;
  const int nope = c.qk_nope_head_dim, rope = c.qk_rope_head_dim, vd = c.v_head_dim;
  const int64_t L = c.kv_lora_rank, qk = nope + rope;
  const float eps = float(c.rms_norm_eps);
  const Tensor& ts = s.token_slot;
  auto pool = [&](const char* name) -> const DenseLoraPool& {
    auto it = Ly.attn_lora.find(name);
    MOELORA_CHECK(it != Ly.attn_lora.end(), "{}: no LoRA pool for {}", c.model_type, name);
    return *it->second;
  };
  auto shrink_out = [&](StepBuffer& b, const DenseLoraPool& p) {
    return b.get(M, int64_t(p.slices().count) * p.r_max(), DType::f32, device_);
  };
  auto fork = [&](EventIndex i) {
    events_[i].record(stream_);
    side_.wait(events_[i]);
  };
  auto join = [&](EventIndex i) { stream_.wait(events_[i]); };
  const bool q_lora = c.q_lora_rank > 0;
  const DenseLoraPool& p_q = pool(q_lora ? "q_a_proj" : "q_proj");
  const DenseLoraPool& p_kv = pool("kv_a_proj_with_mqa");
  const DenseLoraPool& p_kvb = pool("kv_b_proj");
  const DenseLoraPool& p_o = pool("o_proj");
  // The side stream's buffers: main reads only u / u_kv, each after the join that follows
  // its shrink, and the side writes them again only after a later fork.
  Tensor u = shrink_out(ws_.side_u, p_q), u_kv = shrink_out(ws_.side_u_kv, p_kv);

  // Side: xn's bf16 copy, the q (q_a) and kv_a shrinks; main: the base q (q_a) GEMM.
  Tensor xb = ws_.side_x.get(M, H, DType::bf16, device_);
  fork(kForkX);
  ops::cast(xn, xb, side_);
  dense_lora_shrink(p_q, xb, ts, u, side_);
  events_[kJoinQ].record(side_);
  dense_lora_shrink(p_kv, xb, ts, u_kv, side_);
  events_[kJoinKv].record(side_);
  Tensor q = ws_.q.get(M, nh * qk, DType::f32, device_);
  if (q_lora) {
    Tensor qa = ws_.qa.get(M, c.q_lora_rank, DType::f32, device_);
    ops::linear(xn, Ly.q_a_proj, qa, stream_);
    join(kJoinQ);
    dense_lora_expand(p_q, u, ts, qa, stream_);
    ops::rms_norm(qa, Ly.q_a_norm, eps, qa, stream_);
    // Side: the normed q_a's bf16 copy (after the kv_a shrink read xb) and the q_b shrink.
    const DenseLoraPool& p_qb = pool("q_b_proj");
    Tensor qab = ws_.side_x.get(M, c.q_lora_rank, DType::bf16, device_);
    fork(kForkQb);
    ops::cast(qa, qab, side_);
    dense_lora_shrink(p_qb, qab, ts, u, side_);
    events_[kJoinQb].record(side_);
    ops::linear(qa, Ly.q_b_proj, q, stream_);
    join(kJoinQb);
    dense_lora_expand(p_qb, u, ts, q, stream_);
  } else {
    ops::linear(xn, Ly.q_proj, q, stream_);
    join(kJoinQ);
    dense_lora_expand(p_q, u, ts, q, stream_);
  }
  ops::mla_rope(q, int(qk), nope, rope, s.positions, c.rope_theta, rope_interleave_, stream_,
                rope_.inv_freq, rope_.cos_sin_scale);
  Tensor q_lat = ws_.q_lat.get(M, nh * (L + rope), DType::f32, device_);
  ops::mla_absorb_q(q, Ly.kv_b_proj, int(nh), nope, rope, vd, q_lat, stream_);
  // Side: kv_b_proj's q-side correction (reads q's nope part, adds into q_latent), beside the
  // kv_a branch below, which touches neither.
  fork(kForkKvb);
  ops::mla_lora_absorb_q(q, ts, p_kvb.a(), p_kvb.b(), p_kvb.ranks(), int(nh), nope, rope, vd, q_lat,
                         side_);
  events_[kJoinKvb].record(side_);

  Tensor kv = ws_.kv.get(M, L + rope, DType::f32, device_);
  ops::linear(xn, Ly.kv_a_proj, kv, stream_);
  join(kJoinKv);
  dense_lora_expand(p_kv, u_kv, ts, kv, stream_);
  ops::mla_kv_norm(kv, Ly.kv_a_norm, eps, stream_);
  ops::mla_rope(kv, int(L + rope), int(L), rope, s.positions, c.rope_theta, rope_interleave_,
                stream_, rope_.inv_freq, rope_.cos_sin_scale);
  ops::mla_cache_write(kv, s.slots, cache.k(layer), stream_);
  join(kJoinKvb);

  Tensor lat = ws_.lat.get(M, nh * L, DType::f32, device_);
  const float scale = attn_scale_;
  ops::mla_paged_attention(q_lat, cache.k(layer), s.block_table, s.token_seq, s.positions, int(nh),
                           scale, lat, stream_);
  Tensor a = ws_.attn.get(M, nh * vd, DType::f32, device_);
  // The v side of the correction adds into what absorb_v writes: it stays behind it.
  ops::mla_absorb_v(lat, Ly.kv_b_proj, int(nh), nope, vd, a, stream_);
  ops::mla_lora_absorb_v(lat, ts, p_kvb.a(), p_kvb.b(), p_kvb.ranks(), int(nh), nope, vd, a,
                         stream_);

  // Side: the attention output's bf16 copy and the o_proj shrink; main: the base o_proj.
  Tensor ab = ws_.side_x.get(M, nh * vd, DType::bf16, device_);
  fork(kForkO);
  ops::cast(a, ab, side_);
  dense_lora_shrink(p_o, ab, ts, u, side_);
  events_[kJoinO].record(side_);
  ops::linear(a, Ly.o_proj, out, stream_);
  join(kJoinO);
  dense_lora_expand(p_o, u, ts, out, stream_);
}

}  // namespace moelora
