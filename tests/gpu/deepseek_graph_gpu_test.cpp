// The fast decode path (DecodePath::fast: CUDA-graph decode steps per batch bucket, attention
// LoRA shrinks and kv_b_proj's q-side correction on a side stream) of the DeepSeek model
// family against the hooks path (eager), on random-weight configs: V2-style (q_lora_rank
// null, group-limited greedy routing, 2 shared experts) and V3-style (q_lora_rank set,
// noaux_tc sigmoid routing, 1 shared expert), both with a dense first layer
// (first_k_dense_replace = 1); a mixed batch of base requests and four adapters of ranks
// 8/16/32/64 written by write_random_adapter (every MLA projection incl. kv_b_proj, every
// routed expert). Both models get the same tokens every step (teacher forcing from the hooks
// model's greedy choice), so any difference is the path's.
#include <array>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>

#include <unistd.h>
#include <nlohmann/json.hpp>

#include "decode_graph_util.h"
#include "model/random_adapter.h"
#include "model/weight_loader.h"
#include "moelora/engine/engine.h"
#include "moelora/lora/peft_adapter.h"
#include "moelora/model/model.h"
#include "test_util.h"

namespace moelora {
namespace {

using test::compare_paths;
using test::DecodeRunner;
using test::expect_base_rows_match;
using test::expect_same_after_swap;
using test::greedy;
using test::same_bits;

namespace fs = std::filesystem;
constexpr std::array<int, 4> kRanks = {8, 16, 32, 64};

enum class Style { v2, v3 };
const char* style_name(Style s) {
  return s == Style::v2 ? "V2" : "V3";
}

struct Rig {
  std::string model_dir;
  std::vector<std::string> adapter_dirs;  // ranks 8, 16, 32, 64
  std::string swap_dir;                   // another rank-16 adapter (different values)
};

const Rig& rig(Style style) {
  static std::map<Style, Rig> rigs;
  Rig& r = rigs[style];
  if (!r.model_dir.empty()) return r;
  const std::string root = (fs::temp_directory_path() / fmt::format("moelora_deepseek_graph_{}_{}",
                                                                    getpid(), style_name(style)))
                               .string();
  fs::remove_all(root);
  r.model_dir = root + "/model";
  fs::create_directories(r.model_dir);
  const bool v3 = style == Style::v3;
  nlohmann::json c;
  c["model_type"] = v3 ? "deepseek_v3" : "deepseek_v2";
  c["hidden_size"] = 256;
  c["num_hidden_layers"] = 3;
  c["num_attention_heads"] = 8;
  c["num_key_value_heads"] = 8;
  c["q_lora_rank"] = v3 ? nlohmann::json(96) : nlohmann::json(nullptr);
  c["kv_lora_rank"] = 128;
  c["qk_nope_head_dim"] = 32;
  c["qk_rope_head_dim"] = 16;
  c["v_head_dim"] = 32;
  c["n_routed_experts"] = 16;
  c["n_shared_experts"] = v3 ? 1 : 2;
  c["num_experts_per_tok"] = 4;
  c["moe_intermediate_size"] = 128;
  c["intermediate_size"] = 384;
  c["first_k_dense_replace"] = 1;
  c["moe_layer_freq"] = 1;
  c["n_group"] = 4;
  c["topk_group"] = 2;
  c["topk_method"] = v3 ? "noaux_tc" : "group_limited_greedy";
  c["scoring_func"] = v3 ? "sigmoid" : "softmax";
  c["norm_topk_prob"] = v3;
  c["routed_scaling_factor"] = v3 ? 2.5 : 1.5;
  c["vocab_size"] = 512;
  c["max_position_embeddings"] = 2048;
  c["rms_norm_eps"] = 1e-6;
  c["hidden_act"] = "silu";
  c["attention_bias"] = false;
  c["tie_word_embeddings"] = false;
  if (v3) c["rope_interleave"] = true;
  c["rope_parameters"] = {{"rope_theta", 10000.0}, {"rope_type", "default"}};
  std::ofstream(r.model_dir + "/config.json") << c.dump(2) << "\n";
  RandomWeights rw;
  rw.seed = v3 ? 23 : 13;
  rw.device = Device::cuda();
  write_random_weights(r.model_dir, rw);
  const HfModelConfig config = HfModelConfig::load(r.model_dir);
  for (size_t i = 0; i < kRanks.size(); ++i) {
    r.adapter_dirs.push_back(fmt::format("{}/adapter_r{}", root, kRanks[i]));
    write_random_adapter(r.adapter_dirs.back(), config, kRanks[i], 100 + i);
  }
  r.swap_dir = root + "/adapter_swap";
  write_random_adapter(r.swap_dir, config, 16, 999);
  return r;
}

std::unique_ptr<Model> load(Style style, DecodePath path, int64_t max_batch = 256) {
  return test::load_decode_model(rig(style).model_dir, rig(style).adapter_dirs, path, max_batch);
}

class DeepSeekDecodeGraphTest : public ::testing::TestWithParam<Style> {};

// A full bucket (8 sequences: no padding) for 500 steps: the graph replays (and the graphs
// captured as the block table widens from 8 to 64 pages) give the eager steps' bits.
TEST_P(DeepSeekDecodeGraphTest, GraphReplayMatchesEagerFor500Steps) {
  MOELORA_REQUIRE_GPU();
  const std::vector<int> slots = {-1, 0, 1, 2, 3, -1, 1, 3};
  DecodeRunner hooks(load(GetParam(), DecodePath::hooks), slots);
  DecodeRunner fast(load(GetParam(), DecodePath::fast), slots);
  compare_paths(hooks, fast, 500, true, "bucket 8");
  const Model::DecodeStats st = fast.model->decode_stats();
  EXPECT_EQ(st.eager, 1);  // the prefill
  EXPECT_GE(st.captured, 3);
  EXPECT_LE(st.captured, 4);  // one per block-table width: 8, 16, 32 (+64) pages
  EXPECT_EQ(st.replayed, 500 - st.captured);
  EXPECT_EQ(hooks.model->decode_stats().replayed, 0);
  EXPECT_EQ(hooks.model->decode_stats().eager, 501);
}

// 5 sequences pad to the bucket of 8: the padding rows (position 0 reading page 0, writing no
// latent row) change nothing of the real rows beyond kernel tile choices, hence a tolerance.
TEST_P(DeepSeekDecodeGraphTest, PaddedBucketMatchesEager) {
  MOELORA_REQUIRE_GPU();
  const std::vector<int> slots = {3, -1, 2, 0, 1};
  DecodeRunner hooks(load(GetParam(), DecodePath::hooks), slots);
  DecodeRunner fast(load(GetParam(), DecodePath::fast), slots);
  compare_paths(hooks, fast, 40, false, "5 in bucket 8", /*max_excused=*/3);
  EXPECT_GT(fast.model->decode_stats().replayed, 30);
}

// A new adapter in a slot between two replays: the graph reads the slot's buffers, so the next
// replay follows the new adapter (matching the eager model given the same swap), and nothing
// is captured again.
TEST_P(DeepSeekDecodeGraphTest, AdapterSwappedIntoSlotBetweenReplays) {
  MOELORA_REQUIRE_GPU();
  const std::vector<int> slots = {2, -1, 0, 2, 1, 3, -1, 2};
  DecodeRunner hooks(load(GetParam(), DecodePath::hooks), slots);
  DecodeRunner fast(load(GetParam(), DecodePath::fast), slots);
  compare_paths(hooks, fast, 12, true, "before the swap");
  const int64_t captured = fast.model->decode_stats().captured;
  expect_same_after_swap(hooks, fast, 2, PeftAdapter::load(rig(GetParam()).swap_dir), 12);
  EXPECT_EQ(fast.model->decode_stats().captured, captured);
  EXPECT_GT(fast.model->decode_stats().replayed, 12);
}

// Base requests in a batch with adapters give the bits of the same batch with no adapter
// (that step replays the LoRA-off graph).
TEST_P(DeepSeekDecodeGraphTest, BaseRowsUnaffectedByAdapters) {
  MOELORA_REQUIRE_GPU();
  const std::vector<int> mixed = {-1, 0, -1, 3, 2, -1, 1, -1};
  const std::vector<int> base(mixed.size(), -1);
  DecodeRunner with(load(GetParam(), DecodePath::fast), mixed);
  DecodeRunner without(load(GetParam(), DecodePath::fast), base);
  const bool adapters_differ = expect_base_rows_match(with, without, mixed, 30);
  EXPECT_TRUE(adapters_differ);  // the adapters do change their rows
  EXPECT_GT(with.model->decode_stats().replayed, 20);
  EXPECT_GT(without.model->decode_stats().replayed, 20);
}

// A batch over the largest bucket runs eagerly (the overlapped attention outside a graph: the
// same bits as the hooks path), never wrong.
TEST_P(DeepSeekDecodeGraphTest, BatchOverTheLargestBucketRunsEagerly) {
  MOELORA_REQUIRE_GPU();
  const std::vector<int> slots = {0, 1, 2, 3, -1, 0};
  DecodeRunner hooks(load(GetParam(), DecodePath::hooks), slots);
  DecodeRunner fast(load(GetParam(), DecodePath::fast, /*max_batch=*/4), slots);
  compare_paths(hooks, fast, 6, true, "6 over bucket 4");
  EXPECT_EQ(fast.model->decode_stats().replayed, 0);
  EXPECT_EQ(fast.model->decode_stats().captured, 0);
  EXPECT_EQ(fast.model->decode_stats().eager, 7);
}

INSTANTIATE_TEST_SUITE_P(Styles, DeepSeekDecodeGraphTest, ::testing::Values(Style::v2, Style::v3),
                         [](const auto& info) { return std::string(style_name(info.param)); });

// The Engine hands EngineConfig::decode_path to the model once; generation on the fast path
// gives the hooks path's tokens (a full bucket: the same bits as eager).
TEST(DeepSeekDecodeGraphEngine, FastPathGeneratesTheHooksTokens) {
  MOELORA_REQUIRE_GPU();
  std::vector<GenerationRequest> reqs;
  for (int i = 0; i < 8; ++i) {
    GenerationRequest r;
    for (int t = 0; t < 4 + i; ++t) r.prompt.push_back((13 * i + 5 * t) % 500);
    r.max_new_tokens = 24;
    r.adapter_slot = i % 5 - 1;
    reqs.push_back(r);
  }
  std::vector<std::vector<int32_t>> tokens[2];
  for (int p = 0; p < 2; ++p) {
    auto model = load(Style::v3, DecodePath::hooks);
    EngineConfig ec;
    ec.num_pages = 512;
    ec.decode_path = p == 0 ? DecodePath::hooks : DecodePath::fast;
    Engine engine(*model, ec);
    EXPECT_EQ(model->decode_options().path, ec.decode_path);
    for (const GenerationResult& g : engine.generate(reqs)) {
      ASSERT_TRUE(g.ok) << g.error;
      tokens[p].push_back(g.tokens);
    }
    if (p == 1) EXPECT_GT(model->decode_stats().replayed, 0);
  }
  EXPECT_EQ(tokens[0], tokens[1]);
}

}  // namespace
}  // namespace moelora
