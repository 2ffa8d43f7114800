// The decode path switch (model.h DecodePath / EngineConfig::decode_path) on the CPU backend:
// parsing, `fast` running as `hooks` (no graphs on the CPU: the same tokens and logits), and
// the KV write skipping padding rows (slot -1), which the CUDA graphs rely on.
#include <cstring>

#include "kernels/cpu/dense_ops.h"
#include "moelora/engine/engine.h"
#include "moelora/lora/peft_adapter.h"
#include "moelora/model/model.h"
#include "test_util.h"

namespace moelora {
namespace {

TEST(DecodePath, ParsesTheTwoNamesAndRefusesOthers) {
  EXPECT_EQ(parse_decode_path("hooks"), DecodePath::hooks);
  EXPECT_EQ(parse_decode_path("fast"), DecodePath::fast);
  EXPECT_STREQ(decode_path_name(DecodePath::fast), "fast");
  try {
    parse_decode_path("graphs");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'graphs': expected 'hooks' or 'fast'"), std::string::npos)
        << e.what();
  }
}

TEST(DecodePath, FastOnTheCpuGivesTheHooksResults) {
  std::vector<GenerationRequest> reqs;
  for (int i = 0; i < 3; ++i) {
    GenerationRequest r;
    r.prompt = {3 + i, 17, 40 + i};
    r.max_new_tokens = 5;
    r.adapter_slot = i - 1;
    reqs.push_back(r);
  }
  std::vector<GenerationResult> res[2];
  for (int p = 0; p < 2; ++p) {
    ModelOptions o;
    o.lora_slots = 2;
    o.lora_r_max = 8;
    auto m = Model::load(test::fixture_path("qwen3_moe_tiny/model"), o);
    m->load_adapter(0, PeftAdapter::load(test::fixture_path("qwen3_moe_tiny/adapter_a")));
    m->load_adapter(1, PeftAdapter::load(test::fixture_path("qwen3_moe_tiny/adapter_b")));
    EngineConfig ec;
    ec.record_logits = true;
    ec.decode_path = p == 0 ? DecodePath::hooks : DecodePath::fast;
    Engine engine(*m, ec);
    EXPECT_EQ(m->decode_options().path, ec.decode_path);
    res[p] = engine.generate(reqs);
    EXPECT_EQ(m->decode_stats().replayed, 0);  // no graphs on the CPU
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_TRUE(res[0][i].ok && res[1][i].ok);
    EXPECT_EQ(res[0][i].tokens, res[1][i].tokens);
    EXPECT_EQ(test::to_floats(res[0][i].step_logits), test::to_floats(res[1][i].step_logits));
  }
}

TEST(DecodePath, KvWriteSkipsPaddingRows) {
  const int64_t row = 4;
  Tensor kc = Tensor::zeros({2, 2, 1, row}, DType::f32),
         vc = Tensor::zeros({2, 2, 1, row}, DType::f32);
  Tensor k = test::from_floats({1, 2, 3, 4, 5, 6, 7, 8}, {2, row}, DType::f32);
  Tensor v = test::from_floats({9, 9, 9, 9, 8, 8, 8, 8}, {2, row}, DType::f32);
  cpu::kv_cache_write(k, v, test::from_ints({-1, 2}, {2}), kc, vc, Stream());
  const std::vector<float> kf = test::to_floats(kc), vf = test::to_floats(vc);
  for (int64_t i = 0; i < 4 * row; ++i) {
    const bool written = i >= 2 * row && i < 3 * row;
    EXPECT_EQ(kf[size_t(i)], written ? float(5 + i - 2 * row) : 0.f) << i;
    EXPECT_EQ(vf[size_t(i)], written ? 8.f : 0.f) << i;
  }
  // Any other negative slot is still an error.
  EXPECT_THROW(cpu::kv_cache_write(k, v, test::from_ints({-2, 2}, {2}), kc, vc, Stream()), Error);
}

}  // namespace
}  // namespace moelora
