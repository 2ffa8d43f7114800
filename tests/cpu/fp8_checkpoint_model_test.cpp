// A whole quantized checkpoint written by the reference framework, not by us: a 1-layer
// Qwen3-MoE quantized by transformers 5.17's FineGrainedFP8Config and saved with
// save_pretrained (tests/fixtures/fp8_block/checkpoint; attention projections and per-expert
// Linears in e4m3 with 128 x 128 weight_scale_inv, 1-D for the experts), with transformers'
// f32 logits of the same model on its dequantized weights
// (scripts/golden/make_fp8_checkpoint_golden.py). Our model must detect the format from
// config.json, load every tensor, and match those logits within what our fp8 path changes:
// dense projections dequantized to bf16 and the experts' inputs quantized 1 x 128 to e4m3.
#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include <gtest/gtest.h>

#include "moelora/io/safetensors.h"
#include "moelora/model/model.h"
#include "test_util.h"

namespace moelora {
namespace {

void run_fp8_checkpoint(Device device) {
  const std::string dir = test::fixture_path("fp8_block/checkpoint");
  SafetensorsFile ref(test::fixture_path("fp8_block/checkpoint_reference.safetensors"));
  ModelOptions opt;
  opt.device = device;
  auto model = Model::load(dir, opt);
  const Tensor ids = ref.tensor("ids");
  std::vector<int32_t> prompt(ids.data<int32_t>(), ids.data<int32_t>() + ids.numel());
  PagedKvCache cache(model->kv_cache_config(8, 4, DType::f32));
  const int seq = cache.add_sequence();
  const StepResult r = model->forward({SeqInput{seq, prompt, -1}}, cache, /*all_logits=*/true);
  const std::vector<float> got = test::to_floats(r.all_logits);
  const std::vector<float> want = test::to_floats(ref.tensor("logits"));
  ASSERT_EQ(got.size(), want.size());
  const test::Diff d = test::diff(got, want);
  fmt::print("fp8 checkpoint on {}: rel_l2 {:.3g}, max |diff| {:.3g}\n", device.str(), d.rel_l2,
             d.max_abs);
  EXPECT_TRUE(test::allclose(got, want, 3e-2, 3e-2));
  // The greedy choice at each position agrees wherever transformers' top two logits are not
  // within the tolerance of each other.
  const int64_t V = r.all_logits.size(1);
  for (size_t p = 0; p < prompt.size(); ++p) {
    const float* g = got.data() + p * V;
    const float* w = want.data() + p * V;
    int64_t gi = 0, wi = 0;
    for (int64_t v = 1; v < V; ++v) {
      if (g[v] > g[gi]) gi = v;
      if (w[v] > w[wi]) wi = v;
    }
    float second = -INFINITY;
    for (int64_t v = 0; v < V; ++v)
      if (v != wi) second = std::max(second, w[v]);
    if (w[wi] - second > 0.05f) EXPECT_EQ(gi, wi) << "position " << p;
  }
}

TEST(Fp8CheckpointModel, TransformersFineGrainedFp8OnCpu) { run_fp8_checkpoint(Device::cpu()); }

}  // namespace
}  // namespace moelora
