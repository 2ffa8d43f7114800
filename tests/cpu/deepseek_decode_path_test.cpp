// The decode path switch on the DeepSeek model family, CPU backend: `fast` runs as `hooks`
// (no graphs or side streams on the CPU: the same tokens and logits, every step eager), the
// MLA cache write skipping padding rows (slot -1, which the CUDA decode graphs rely on), and
// write_random_adapter's DeepSeek module names (every module it writes loads, and changes the
// logits).
#include <unistd.h>

#include <filesystem>

#include "kernels/cpu/mla_ops.h"
#include "model/random_adapter.h"
#include "moelora/engine/engine.h"
#include "moelora/lora/peft_adapter.h"
#include "moelora/model/model.h"
#include "test_util.h"

namespace moelora {
namespace {

namespace fs = std::filesystem;

class DeepseekDecodePath : public ::testing::TestWithParam<std::string> {};

TEST_P(DeepseekDecodePath, FastOnTheCpuGivesTheHooksResults) {
  const std::string fx = GetParam();
  std::vector<GenerationRequest> reqs;
  for (int i = 0; i < 3; ++i) {
    GenerationRequest r;
    r.prompt = {3 + i, 17, 40 + i, 9};
    r.max_new_tokens = 5;
    r.adapter_slot = i - 1;
    reqs.push_back(r);
  }
  std::vector<GenerationResult> res[2];
  for (int p = 0; p < 2; ++p) {
    ModelOptions o;
    o.lora_slots = 2;
    o.lora_r_max = 8;
    auto m = Model::load(test::fixture_path(fx + "/model"), o);
    m->load_adapter(0, PeftAdapter::load(test::fixture_path(fx + "/adapter_a")));
    m->load_adapter(1, PeftAdapter::load(test::fixture_path(fx + "/adapter_b")));
    EngineConfig ec;
    ec.record_logits = true;
    ec.decode_path = p == 0 ? DecodePath::hooks : DecodePath::fast;
    Engine engine(*m, ec);
    EXPECT_EQ(m->decode_options().path, ec.decode_path);
    res[p] = engine.generate(reqs);
    const Model::DecodeStats st = m->decode_stats();
    EXPECT_EQ(st.replayed, 0);  // no graphs on the CPU
    EXPECT_EQ(st.captured, 0);
    EXPECT_GT(st.eager, 4);
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_TRUE(res[0][i].ok && res[1][i].ok) << res[0][i].error << res[1][i].error;
    EXPECT_EQ(res[0][i].tokens, res[1][i].tokens);
    EXPECT_EQ(test::to_floats(res[0][i].step_logits), test::to_floats(res[1][i].step_logits));
  }
}

// Every module write_random_adapter names for the model loads (an unmatched one would be an
// error) and the adapter changes the logits of its rows only.
TEST_P(DeepseekDecodePath, RandomAdapterLoadsIntoTheModel) {
  const std::string fx = GetParam();
  const std::string model_dir = test::fixture_path(fx + "/model");
  const std::string dir =
      (fs::temp_directory_path() / fmt::format("moelora_ds_random_adapter_{}_{}", getpid(), fx))
          .string();
  fs::remove_all(dir);
  write_random_adapter(dir, HfModelConfig::load(model_dir), 8, 5);
  ModelOptions o;
  o.lora_slots = 1;
  o.lora_r_max = 8;
  auto m = Model::load(model_dir, o);
  const PeftAdapter ad = PeftAdapter::load(dir);
  m->load_adapter(0, ad);
  bool kv_b = false, q = false, expert = false;
  for (const auto& [name, mod] : ad.modules()) {
    kv_b = kv_b || name.find("kv_b_proj") != std::string::npos;
    q = q || name.find("self_attn.q_") != std::string::npos;
    expert = expert || name.find("mlp.experts.") != std::string::npos;
  }
  EXPECT_TRUE(kv_b && q && expert);
  PagedKvCache cache(m->kv_cache_config(16, 16, DType::f32));
  const std::vector<int32_t> prompt = {5, 9, 33, 2, 70};
  const StepResult r = m->forward(
      {SeqInput{cache.add_sequence(), prompt, -1}, SeqInput{cache.add_sequence(), prompt, 0}},
      cache, false);
  const std::vector<float> lg = test::to_floats(r.last_logits);
  const size_t V = size_t(r.last_logits.size(1));
  EXPECT_NE(std::vector<float>(lg.begin(), lg.begin() + V),
            std::vector<float>(lg.begin() + V, lg.end()));
  fs::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, DeepseekDecodePath,
                         ::testing::Values("deepseek_v2_tiny", "deepseek_v3_tiny"));

TEST(DeepseekDecodePathOps, MlaCacheWriteSkipsPaddingRows) {
  const int64_t row = 4;
  Tensor cache = Tensor::zeros({2, 2, 1, row}, DType::f32);
  Tensor kv = test::from_floats({1, 2, 3, 4, 5, 6, 7, 8}, {2, row}, DType::f32);
  cpu::mla_cache_write(kv, test::from_ints({-1, 2}, {2}), cache, Stream());
  const std::vector<float> c = test::to_floats(cache);
  for (int64_t i = 0; i < 4 * row; ++i) {
    const bool written = i >= 2 * row && i < 3 * row;
    EXPECT_EQ(c[size_t(i)], written ? float(5 + i - 2 * row) : 0.f) << i;
  }
  // Any other slot outside the cache is still an error.
  EXPECT_THROW(cpu::mla_cache_write(kv, test::from_ints({-2, 2}, {2}), cache, Stream()), Error);
  EXPECT_THROW(cpu::mla_cache_write(kv, test::from_ints({4, 2}, {2}), cache, Stream()), Error);
}

}  // namespace
}  // namespace moelora
