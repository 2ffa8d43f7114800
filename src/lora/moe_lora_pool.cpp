#include <cmath>
#include <vector>

#include "moelora/lora/moe_lora.h"

namespace moelora {
namespace {

// Checks a host LoRA tensor [E, d1, d2] where one of d1/d2 is the rank (returned).
int check_lora_tensor(const Tensor& t, const char* what, int64_t E, int64_t d1, int64_t d2,
                      int rank_dim, int r_max) {
  MOELORA_CHECK(t.device().is_cpu(), "MoE LoRA {}: expected a host tensor, found {}", what,
                t.describe());
  MOELORA_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::bf16 || t.dtype() == DType::f16,
                "MoE LoRA {}: expected f32, bf16 or f16, found {}", what, t.describe());
  check_contiguous(t, what);
  MOELORA_CHECK(t.dim() == 3, "MoE LoRA {}: expected 3 dims [E, ., .], found {}", what,
                t.describe());
  const int64_t r = t.size(rank_dim);
  Shape expected = {E, d1, d2};
  expected[rank_dim] = r;
  MOELORA_CHECK(t.shape() == expected, "MoE LoRA {}: expected shape {} (rank {}), found {}", what,
                shape_str(expected), r, t.describe());
  MOELORA_CHECK(r >= 1 && r <= r_max, "MoE LoRA {}: rank {} is outside the pool's 1..r_max={}",
                what, r, r_max);
  return int(r);
}

// dst[e, row0 + i, j] (row length dst_cols, rows per expert dst_rows) = scale * src[e, i, j]
void place(std::vector<bf16_t>& dst, int64_t dst_rows, int64_t dst_cols, int64_t row0,
           const Tensor& src, float scale) {
  const int64_t E = src.size(0), rows = src.size(1), cols = src.size(2);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j)
        dst[size_t((e * dst_rows + row0 + i) * dst_cols + j)] =
            float_to_bf16(scale * float_at(src, (e * rows + i) * cols + j));
}

void copy_slot(const Tensor& pool, int slot, const std::vector<bf16_t>& host, const Stream* s) {
  Tensor dst = pool.narrow(0, slot, 1);
  Tensor src = Tensor::wrap(const_cast<bf16_t*>(host.data()), dst.shape(), DType::bf16);
  dst.copy_from(src, s);
  if (s) s->synchronize();  // `host` dies with the caller's frame
}

}  // namespace

float lora_scaling(float alpha, int rank, bool use_rslora) {
  MOELORA_CHECK(rank > 0, "LoRA rank must be > 0, found {}", rank);
  return use_rslora ? alpha / std::sqrt(float(rank)) : alpha / float(rank);
}

MoeLoraPool::MoeLoraPool(const MoeShape& shape, int num_slots, int r_max, Device device)
    : shape_(shape), num_slots_(num_slots), r_max_(r_max), device_(device) {
  shape_.validate();
  MOELORA_CHECK(num_slots >= 1, "MoE LoRA pool: num_slots must be >= 1, found {}", num_slots);
  MOELORA_CHECK(r_max >= 1 && r_max <= 256, "MoE LoRA pool: r_max must be in 1..256, found {}",
                r_max);
  const int64_t S = num_slots, E = shape.num_experts, H = shape.hidden, I = shape.inter;
  a13_ = Tensor::zeros({S, E, 2 * int64_t(r_max), H}, DType::bf16, device);
  b13_ = Tensor::zeros({S, E, 2 * I, r_max}, DType::bf16, device);
  a2_ = Tensor::zeros({S, E, r_max, I}, DType::bf16, device);
  b2_ = Tensor::zeros({S, E, H, r_max}, DType::bf16, device);
  meta_dev_ = Tensor::zeros({S, 6}, DType::i32, device);
  meta_.assign(size_t(S), MoeLoraSlotMeta{});
  loaded_.assign(size_t(S), false);
}

const MoeLoraSlotMeta& MoeLoraPool::meta(int slot) const {
  MOELORA_CHECK(slot >= 0 && slot < num_slots_, "MoE LoRA pool: slot {} out of range 0..{}", slot,
                num_slots_ - 1);
  return meta_[size_t(slot)];
}

bool MoeLoraPool::loaded(int slot) const {
  meta(slot);
  return loaded_[size_t(slot)];
}

void MoeLoraPool::load(int slot, const MoeLoraWeights& w, const Stream* stream) {
  meta(slot);  // range check
  const int64_t E = shape_.num_experts, H = shape_.hidden, I = shape_.inter, R = r_max_;
  MoeLoraSlotMeta m;

  // Validate everything before touching the slot.
  const bool separate = w.gate_a.defined() || w.gate_b.defined() || w.up_a.defined() ||
                        w.up_b.defined();
  MOELORA_CHECK(!(separate && w.has_gate_up_fused()),
                "MoE LoRA: both separate gate/up and fused gate_up LoRA weights given for slot {}",
                slot);
  MOELORA_CHECK(w.gate_a.defined() == w.gate_b.defined() && w.up_a.defined() == w.up_b.defined() &&
                    w.gate_up_a.defined() == w.gate_up_b.defined() &&
                    w.down_a.defined() == w.down_b.defined(),
                "MoE LoRA: every A needs its B (and every B its A) for slot {}", slot);
  if (w.has_gate_up_fused()) {
    const int r = check_lora_tensor(w.gate_up_a, "gate_up lora_A", E, R, H, 1, r_max_);
    const int rb = check_lora_tensor(w.gate_up_b, "gate_up lora_B", E, 2 * I, R, 2, r_max_);
    MOELORA_CHECK(r == rb, "MoE LoRA gate_up: lora_A rank {} != lora_B rank {}", r, rb);
    m.shrink_rank = r;
    m.gate_rank = m.up_rank = r;
    m.gate_col = m.up_col = 0;
  } else {
    if (w.gate_a.defined()) {
      const int r = check_lora_tensor(w.gate_a, "gate lora_A", E, R, H, 1, r_max_);
      const int rb = check_lora_tensor(w.gate_b, "gate lora_B", E, I, R, 2, r_max_);
      MOELORA_CHECK(r == rb, "MoE LoRA gate: lora_A rank {} != lora_B rank {}", r, rb);
      m.gate_rank = r;
      m.gate_col = 0;
    }
    if (w.up_a.defined()) {
      const int r = check_lora_tensor(w.up_a, "up lora_A", E, R, H, 1, r_max_);
      const int rb = check_lora_tensor(w.up_b, "up lora_B", E, I, R, 2, r_max_);
      MOELORA_CHECK(r == rb, "MoE LoRA up: lora_A rank {} != lora_B rank {}", r, rb);
      m.up_rank = r;
      m.up_col = m.gate_rank;
    }
    m.shrink_rank = m.gate_rank + m.up_rank;
  }
  if (w.down_a.defined()) {
    const int r = check_lora_tensor(w.down_a, "down lora_A", E, R, I, 1, r_max_);
    const int rb = check_lora_tensor(w.down_b, "down lora_B", E, H, R, 2, r_max_);
    MOELORA_CHECK(r == rb, "MoE LoRA down: lora_A rank {} != lora_B rank {}", r, rb);
    m.down_rank = r;
  }
  for (float sc : {w.gate_scale, w.up_scale, w.gate_up_scale, w.down_scale})
    MOELORA_CHECK(std::isfinite(sc), "MoE LoRA: scaling must be finite, found {}", sc);

  std::vector<bf16_t> a13(size_t(E * 2 * R * H), bf16_t{0}), b13(size_t(E * 2 * I * R), bf16_t{0});
  std::vector<bf16_t> a2(size_t(E * R * I), bf16_t{0}), b2(size_t(E * H * R), bf16_t{0});
  if (w.has_gate_up_fused()) {
    place(a13, 2 * R, H, 0, w.gate_up_a, 1.0f);
    place(b13, 2 * I, R, 0, w.gate_up_b, w.gate_up_scale);
  } else {
    if (m.gate_rank) {
      place(a13, 2 * R, H, m.gate_col, w.gate_a, 1.0f);
      place(b13, 2 * I, R, 0, w.gate_b, w.gate_scale);
    }
    if (m.up_rank) {
      place(a13, 2 * R, H, m.up_col, w.up_a, 1.0f);
      place(b13, 2 * I, R, I, w.up_b, w.up_scale);
    }
  }
  if (m.down_rank) {
    place(a2, R, I, 0, w.down_a, 1.0f);
    place(b2, H, R, 0, w.down_b, w.down_scale);
  }
  copy_slot(a13_, slot, a13, stream);
  copy_slot(b13_, slot, b13, stream);
  copy_slot(a2_, slot, a2, stream);
  copy_slot(b2_, slot, b2, stream);
  const int32_t host_meta[6] = {m.shrink_rank, m.gate_rank, m.gate_col,
                                m.up_rank,     m.up_col,    m.down_rank};
  Tensor dst = meta_dev_.narrow(0, slot, 1);
  dst.copy_from(Tensor::wrap(const_cast<int32_t*>(host_meta), {1, 6}, DType::i32), stream);
  if (stream) stream->synchronize();
  meta_[size_t(slot)] = m;
  loaded_[size_t(slot)] = true;
}

void MoeLoraPool::unload(int slot) {
  meta(slot);
  const int32_t zeros[6] = {0, 0, 0, 0, 0, 0};
  Tensor dst = meta_dev_.narrow(0, slot, 1);
  dst.copy_from(Tensor::wrap(const_cast<int32_t*>(zeros), {1, 6}, DType::i32));
  meta_[size_t(slot)] = MoeLoraSlotMeta{};
  loaded_[size_t(slot)] = false;
}

}  // namespace moelora
