#include "golden_moe.h"

#include <nlohmann/json.hpp>

#include "moelora/io/safetensors.h"
#include "moelora/lora/moe_lora.h"
#include "moelora/moe/runner.h"
#include "test_util.h"

namespace moelora::test {
namespace {

Tensor host_copy(const Tensor& t) { return t.to(Device::cpu()); }

MoeLoraWeights adapter_weights(const SafetensorsFile& f, const std::string& name) {
  MoeLoraWeights w;
  w.gate_up_a = host_copy(f.tensor(name + ".gate_up_a"));
  w.gate_up_b = host_copy(f.tensor(name + ".gate_up_b"));
  w.down_a = host_copy(f.tensor(name + ".down_a"));
  w.down_b = host_copy(f.tensor(name + ".down_b"));
  const float scale = f.tensor(name + ".scale").data<float>()[0];
  w.gate_up_scale = w.down_scale = scale;
  return w;
}

}  // namespace

void check_moe_block_golden(const std::string& kind, Device device) {
  const SafetensorsFile f(fixture_path("moe_block/" + kind + "_block.safetensors"));
  const auto meta = nlohmann::json::parse(f.metadata().at("meta"));
  MoeShape shape;
  shape.name = kind + "-golden";
  shape.hidden = meta["hidden"];
  shape.inter = meta["inter"];
  shape.num_experts = meta["num_experts"];
  shape.top_k = meta["top_k"];
  shape.shared_inter = meta["shared_inter"];
  RouterConfig router = RouterConfig::softmax_topk(shape.num_experts, shape.top_k,
                                                   meta["renormalize"].get<bool>());
  if (meta["scoring"] == "sigmoid") {
    router = RouterConfig::deepseek_v3(shape.num_experts, shape.top_k, meta["n_group"],
                                       meta["topk_group"], meta["routed_scaling_factor"],
                                       meta["renormalize"].get<bool>());
  }
  const int64_t M = meta["M"], H = shape.hidden, E = shape.num_experts;

  MoeWeights w;
  w.w13 = f.tensor("w13", DType::bf16, {E, 2 * shape.inter, H}).to(device);
  w.w2 = f.tensor("w2", DType::bf16, {E, H, shape.inter}).to(device);
  if (f.contains("correction_bias")) w.correction_bias = f.tensor("correction_bias").to(device);
  if (shape.shared_inter > 0) {
    w.shared_w13 = f.tensor("shared_w13").to(device);
    w.shared_w2 = f.tensor("shared_w2").to(device);
  }
  w.validate(shape);

  MoeRunnerConfig cfg{shape, router, device, M};
  MoeRunner runner(cfg);
  Stream stream = device.is_cpu() ? Stream() : Stream::create(device);
  MoeInputs in;
  in.x = f.tensor("x", DType::bf16, {M, H}).to(device);
  in.router_logits = f.tensor("router_logits", DType::f32, {M, E}).to(device);

  Tensor y_base = Tensor::empty({M, H}, DType::bf16, device);
  y_base.fill_bytes(0xFF);
  runner.run(in, w, nullptr, y_base, stream);
  stream.synchronize();
  const auto base = to_floats(y_base);
  EXPECT_TRUE(allclose(base, to_floats(f.tensor("y_base")), 1e-2)) << kind << " base";

  // The fixture is meaningful: the adapters move the output far beyond the tolerance.
  EXPECT_GT(diff(to_floats(f.tensor("y_a")), to_floats(f.tensor("y_base"))).rel_l2, 0.1);
  EXPECT_GT(diff(to_floats(f.tensor("y_b")), to_floats(f.tensor("y_base"))).rel_l2, 0.1);

  MoeLoraPool pool(shape, /*num_slots=*/2, /*r_max=*/8, device);
  pool.load(0, adapter_weights(f, "a"));
  pool.load(1, adapter_weights(f, "b"));
  auto hooks = MoeLoraHooks::create(pool, M);
  const Tensor token_slot_host = f.tensor("token_slot", DType::i32, {M});
  LoraBatch batch{token_slot_host.to(device)};
  hooks->bind(batch);
  Tensor y = Tensor::empty({M, H}, DType::bf16, device);
  y.fill_bytes(0xFF);
  runner.run(in, w, hooks.get(), y, stream);
  stream.synchronize();
  const auto mixed = to_floats(y);
  EXPECT_TRUE(allclose(mixed, to_floats(f.tensor("y_mixed")), 1e-2)) << kind << " mixed batch";

  // Base tokens of the mixed batch: bit-identical to the LoRA-off run.
  const int32_t* slots = token_slot_host.data<int32_t>();
  for (int64_t t = 0; t < M; ++t) {
    if (slots[t] >= 0) continue;
    for (int64_t c = 0; c < H; ++c)
      ASSERT_EQ(mixed[size_t(t * H + c)], base[size_t(t * H + c)]) << "token " << t << " col " << c;
  }

  // Whole batch on adapter a.
  std::vector<int32_t> all_a(size_t(M), 0);
  LoraBatch batch_a{from_ints(all_a, {M}).to(device)};
  hooks->bind(batch_a);
  runner.run(in, w, hooks.get(), y, stream);
  stream.synchronize();
  EXPECT_TRUE(allclose(to_floats(y), to_floats(f.tensor("y_a")), 1e-2)) << kind << " adapter a";
}

}  // namespace moelora::test
