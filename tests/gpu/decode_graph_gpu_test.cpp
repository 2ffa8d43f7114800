// The fast decode path (DecodePath::fast: CUDA-graph decode steps per batch bucket, dense LoRA
// shrinks on a side stream, for fp8 experts the MoE LoRA deltas beside the GEMMs) on a
// random-weight Qwen3-MoE model (head_dim 32: the grouped-query attention kernel; one dense
// MLP layer), bf16 and fp8 experts, a mixed batch of base requests and four adapters of ranks
// 8/16/32/64: graph replay against the same path run eagerly (DecodeOptions::graphs = false:
// bit for bit), and against the hooks path (within bf16 tolerance; bit for bit where the
// fast path runs the hooks' MoE LoRA kernels). The models get the same tokens every step
// (teacher forcing from the reference model's greedy choice).
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
#include "moelora/core/random.h"
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

struct Rig {
  std::string model_dir;
  std::vector<std::string> adapter_dirs;  // ranks 8, 16, 32, 64
  std::string swap_dir;                   // another rank-16 adapter (different values)
};

const Rig& rig(WeightFormat format) {
  static std::map<WeightFormat, Rig> rigs;
  Rig& r = rigs[format];
  if (!r.model_dir.empty()) return r;
  const std::string root = (fs::temp_directory_path() / fmt::format("moelora_decode_graph_{}_{}",
                                                                    getpid(), format_name(format)))
                               .string();
  fs::remove_all(root);
  r.model_dir = root + "/model";
  fs::create_directories(r.model_dir);
  nlohmann::json c;
  c["model_type"] = "qwen3_moe";
  c["hidden_size"] = 256;
  c["num_hidden_layers"] = 3;
  c["num_attention_heads"] = 8;
  c["num_key_value_heads"] = 2;
  c["head_dim"] = 32;
  c["num_experts"] = 16;
  c["num_experts_per_tok"] = 4;
  c["moe_intermediate_size"] = 128;
  c["intermediate_size"] = 384;
  c["vocab_size"] = 512;
  c["max_position_embeddings"] = 2048;
  c["mlp_only_layers"] = nlohmann::json::array({1});
  c["decoder_sparse_step"] = 1;
  c["norm_topk_prob"] = true;
  c["rms_norm_eps"] = 1e-6;
  c["rope_parameters"] = {{"rope_theta", 1000000.0}, {"rope_type", "default"}};
  std::ofstream(r.model_dir + "/config.json") << c.dump(2) << "\n";
  RandomWeights rw;
  rw.seed = 11;
  rw.experts_format = format;
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

std::unique_ptr<Model> load(WeightFormat format, DecodePath path, int64_t max_batch = 256,
                            bool graphs = true, MoeLoraVariant moe_lora = MoeLoraVariant::best) {
  return test::load_decode_model(rig(format).model_dir, rig(format).adapter_dirs, path, max_batch,
                                 graphs, moe_lora);
}

class DecodeGraphTest : public ::testing::TestWithParam<WeightFormat> {};

// The fast path's MoE LoRA for these experts is the hooks' kernels (bit for bit the hooks
// path) unless decode_hook_options picks another variant (fp8: the overlap deltas).
bool fast_is_hooks_bits(WeightFormat f) {
  return f != WeightFormat::fp8_block;
}

// A full bucket (8 sequences: no padding) for 500 steps: the graph replays (and the graphs
// captured as the block table widens from 8 to 64 pages) give the eager steps' bits; and
// match the hooks path.
TEST_P(DecodeGraphTest, GraphReplayMatchesEagerFor500Steps) {
  MOELORA_REQUIRE_GPU();
  const std::vector<int> slots = {-1, 0, 1, 2, 3, -1, 1, 3};
  {
    DecodeRunner hooks(load(GetParam(), DecodePath::hooks), slots);
    DecodeRunner fast(load(GetParam(), DecodePath::fast), slots);
    compare_paths(hooks, fast, 40, fast_is_hooks_bits(GetParam()), "fast vs hooks");
  }
  DecodeRunner eager(load(GetParam(), DecodePath::fast, 256, /*graphs=*/false), slots);
  DecodeRunner fast(load(GetParam(), DecodePath::fast), slots);
  compare_paths(eager, fast, 500, true, "bucket 8, graphs vs eager");
  const Model::DecodeStats st = fast.model->decode_stats();
  EXPECT_EQ(st.eager, 1);  // the prefill
  EXPECT_GE(st.captured, 3);
  EXPECT_LE(st.captured, 4);  // one per block-table width: 8, 16, 32 (+64) pages
  EXPECT_EQ(st.replayed, 500 - st.captured);
  EXPECT_EQ(eager.model->decode_stats().replayed, 0);
}

// 5 sequences pad to the bucket of 8: the padding rows change nothing of the real rows
// (row-independent kernels up to the GEMV / tile choices, hence a tolerance).
TEST_P(DecodeGraphTest, PaddedBucketMatchesEager) {
  MOELORA_REQUIRE_GPU();
  const std::vector<int> slots = {3, -1, 2, 0, 1};
  DecodeRunner hooks(load(GetParam(), DecodePath::hooks), slots);
  DecodeRunner fast(load(GetParam(), DecodePath::fast), slots);
  compare_paths(hooks, fast, 40, false, "5 in bucket 8");
  EXPECT_GT(fast.model->decode_stats().replayed, 30);
}

// A new adapter in a slot between two replays: the graph reads the slot's buffers, so the next
// replay follows the new adapter (matching the eager model given the same swap), and nothing
// is captured again.
TEST_P(DecodeGraphTest, AdapterSwappedIntoSlotBetweenReplays) {
  MOELORA_REQUIRE_GPU();
  const std::vector<int> slots = {2, -1, 0, 2, 1, 3, -1, 2};
  DecodeRunner eager(load(GetParam(), DecodePath::fast, 256, /*graphs=*/false), slots);  // eager
  DecodeRunner fast(load(GetParam(), DecodePath::fast), slots);
  compare_paths(eager, fast, 12, true, "before the swap");
  const int64_t captured = fast.model->decode_stats().captured;
  expect_same_after_swap(eager, fast, 2, PeftAdapter::load(rig(GetParam()).swap_dir), 12);
  EXPECT_EQ(fast.model->decode_stats().captured, captured);
}

// Base requests in a batch with adapters give the bits of the same batch with no adapter
// (that step replays the LoRA-off graph).
TEST_P(DecodeGraphTest, BaseRowsUnaffectedByAdapters) {
  MOELORA_REQUIRE_GPU();
  const std::vector<int> mixed = {-1, 0, -1, 3, 2, -1, 1, -1};
  const std::vector<int> base(mixed.size(), -1);
  DecodeRunner with(load(GetParam(), DecodePath::fast), mixed);
  DecodeRunner without(load(GetParam(), DecodePath::fast), base);
  expect_base_rows_match(with, without, mixed, 30);
  EXPECT_GT(with.model->decode_stats().replayed, 20);
  EXPECT_GT(without.model->decode_stats().replayed, 20);
}

// A batch over the largest bucket runs eagerly (the same bits as the hooks path), never wrong.
TEST_P(DecodeGraphTest, BatchOverTheLargestBucketRunsEagerly) {
  MOELORA_REQUIRE_GPU();
  const std::vector<int> slots = {0, 1, 2, 3, -1, 0};
  DecodeRunner eager(load(GetParam(), DecodePath::fast, 256, /*graphs=*/false), slots);  // eager
  DecodeRunner fast(load(GetParam(), DecodePath::fast, /*max_batch=*/4), slots);
  compare_paths(eager, fast, 6, true, "6 over bucket 4");
  EXPECT_EQ(fast.model->decode_stats().replayed, 0);
  EXPECT_EQ(fast.model->decode_stats().eager, 7);
}

// Long contexts (a ~1100-token prompt per sequence, 12 sequences, so the tensor-core decode
// attention on the bf16 cache): graph replay gives the eager steps' bits (the eager steps build
// the block table as wide as the graph's).
TEST_P(DecodeGraphTest, LongContextReplayMatchesEager) {
  MOELORA_REQUIRE_GPU();
  const std::vector<int> slots = {-1, 0, 1, 2, 3, -1, 1, 3, 0, -1, 2, 1};
  DecodeRunner eager(load(GetParam(), DecodePath::fast, 256, /*graphs=*/false), slots, 1100);
  DecodeRunner fast(load(GetParam(), DecodePath::fast), slots, 1100);
  compare_paths(eager, fast, 20, true, "context ~1100, graphs vs eager");
  EXPECT_GE(fast.model->decode_stats().replayed, 19);
}

// A forced MoE LoRA variant on the fast path: graph replay gives the eager steps' bits for 200
// steps (across block-table captures), the hooks path within tolerance, and base rows the bits
// of an all-base batch.
void variant_matches_eager_hooks_and_base(WeightFormat f, MoeLoraVariant v) {
  const std::string name = moe_lora_variant_name(v);
  const std::vector<int> slots = {-1, 0, 1, 2, 3, -1, 1, 3};
  {
    DecodeRunner hooks(load(f, DecodePath::hooks), slots);
    DecodeRunner fast(load(f, DecodePath::fast, 256, true, v), slots);
    compare_paths(hooks, fast, 40, false, (name + " vs hooks").c_str());
  }
  {
    DecodeRunner eager(load(f, DecodePath::fast, 256, false, v), slots);
    DecodeRunner fast(load(f, DecodePath::fast, 256, true, v), slots);
    compare_paths(eager, fast, 200, true, (name + ", graphs vs eager").c_str());
    EXPECT_GE(fast.model->decode_stats().replayed, 190);
  }
  const std::vector<int> base(slots.size(), -1);
  DecodeRunner with(load(f, DecodePath::fast, 256, true, v), slots);
  DecodeRunner without(load(f, DecodePath::fast, 256, true, v), base);
  expect_base_rows_match(with, without, slots, 20);
}

// The inline MoE LoRA (deltas in extra CTAs of the fp8 expert GEMM grids).
TEST(DecodeGraphInline, Fp8ReplayMatchesEagerHooksAndBase) {
  MOELORA_REQUIRE_GPU();
  variant_matches_eager_hooks_and_base(WeightFormat::fp8_block, MoeLoraVariant::inline_ctas);
}

// The direct MoE LoRA (each seam's delta one kernel straight from the routing), on the fp8 and
// bf16 experts.
TEST(DecodeGraphDirect, Fp8ReplayMatchesEagerHooksAndBase) {
  MOELORA_REQUIRE_GPU();
  variant_matches_eager_hooks_and_base(WeightFormat::fp8_block, MoeLoraVariant::direct);
}

TEST(DecodeGraphDirect, Bf16ReplayMatchesEagerHooksAndBase) {
  MOELORA_REQUIRE_GPU();
  variant_matches_eager_hooks_and_base(WeightFormat::bf16, MoeLoraVariant::direct);
}

INSTANTIATE_TEST_SUITE_P(Formats, DecodeGraphTest,
                         ::testing::Values(WeightFormat::bf16, WeightFormat::fp8_block),
                         [](const auto& info) { return std::string(format_name(info.param)); });

// The Engine hands EngineConfig::decode_path to the model once; generation on the fast path
// gives the hooks path's tokens.
TEST(DecodeGraphEngine, FastPathGeneratesTheHooksTokens) {
  MOELORA_REQUIRE_GPU();
  std::vector<GenerationRequest> reqs;
  for (int i = 0; i < 8; ++i) {  // a full bucket: the same bits as eager
    GenerationRequest r;
    for (int t = 0; t < 4 + i; ++t) r.prompt.push_back((13 * i + 5 * t) % 500);
    r.max_new_tokens = 24;
    r.adapter_slot = i % 5 - 1;
    reqs.push_back(r);
  }
  std::vector<std::vector<int32_t>> tokens[2];
  for (int p = 0; p < 2; ++p) {
    auto model = load(WeightFormat::bf16, DecodePath::hooks);
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
