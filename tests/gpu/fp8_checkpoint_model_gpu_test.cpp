// The transformers-written fp8 checkpoint (tests/cpu/fp8_checkpoint_model_test.cpp) on the CUDA
// backend: cuda_fp8_block experts, same reference logits and tolerance.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include "moelora/io/safetensors.h"
#include "moelora/model/model.h"
#include "test_util.h"

namespace moelora {
namespace {

TEST(Fp8CheckpointModelGpu, TransformersFineGrainedFp8OnCuda) {
  MOELORA_REQUIRE_GPU();
  SafetensorsFile ref(test::fixture_path("fp8_block/checkpoint_reference.safetensors"));
  ModelOptions opt;
  opt.device = Device::cuda();
  auto model = Model::load(test::fixture_path("fp8_block/checkpoint"), opt);
  const Tensor ids = ref.tensor("ids");
  std::vector<int32_t> prompt(ids.data<int32_t>(), ids.data<int32_t>() + ids.numel());
  PagedKvCache cache(model->kv_cache_config(8, 4, DType::f32));
  const int seq = cache.add_sequence();
  const StepResult r = model->forward({SeqInput{seq, prompt, -1}}, cache, /*all_logits=*/true);
  const std::vector<float> got = test::to_floats(r.all_logits);
  const std::vector<float> want = test::to_floats(ref.tensor("logits"));
  const test::Diff d = test::diff(got, want);
  fmt::print("fp8 checkpoint on CUDA: rel_l2 {:.3g}, max |diff| {:.3g}\n", d.rel_l2, d.max_abs);
  EXPECT_TRUE(test::allclose(got, want, 3e-2, 3e-2));
}

}  // namespace
}  // namespace moelora
