// DeepSeek-V2 and DeepSeek-V3 (MLA) on the CUDA backend (ModelOptions::device = cuda: weights,
// LoRA pools, the latent KV cache and every activation on the GPU; MLA through the CUDA MLA
// ops, experts through MoeRunner's CUDA backend) against the transformers 5.17 + peft 0.21
// references the CPU golden tests use (tests/cpu/deepseek_model_test.cpp, same tolerances and
// router near-tie handling): a mixed batch of base and two adapters, prefill + 8 greedy steps,
// on the automatic, absorbed-only and expanded-only attention paths, f32 and bf16 caches. Plus
// a chunked prefill equal to the one-shot prefill, and the CPU and CUDA backends agreeing.
#include <cmath>
#include <map>
#include <memory>

#include "model/deepseek.h"
#include "model/models.h"
#include "moelora/engine/engine.h"
#include "moelora/io/safetensors.h"
#include "moelora/lora/peft_adapter.h"
#include "moelora/io/hf_config.h"
#include "test_util.h"

namespace moelora {
namespace {

constexpr double kRelTol = 2e-2;
constexpr double kRelTolBf16Kv = 3e-2;
constexpr int64_t kVocab = 128;

struct Fixture {
  std::string name;
  float router_tie;  // as the CPU test: selection-score units (V2 logits, V3 sigmoid + bias)
  std::string dir() const { return test::fixture_path(name); }
  const SafetensorsFile& ref() const {
    static std::map<std::string, std::unique_ptr<SafetensorsFile>> files;
    auto& f = files[name];
    if (!f) f = std::make_unique<SafetensorsFile>(dir() + "/reference.safetensors");
    return *f;
  }
  std::vector<int32_t> ints(const std::string& k) const { return test::to_ints(ref().tensor(k)); }
  std::vector<float> floats(const std::string& k) const {
    return test::to_floats(ref().tensor(k));
  }
};
const Fixture kV2{"deepseek_v2_tiny", 1e-2f};
const Fixture kV3{"deepseek_v3_tiny", 3e-3f};
// Before the first MoE layer nothing is rounded to bf16 for a base request with an f32 cache.
constexpr float kRouterTieFirstLayerF32 = 1e-4f;

// Built through make_deepseek: the model registry (model.cpp) may not list DeepSeek as
// CUDA-capable yet.
std::unique_ptr<Model> load(const Fixture& fx, Device device) {
  ModelOptions o;
  o.device = device;
  o.lora_slots = 2;
  o.lora_r_max = 8;
  const std::string dir = fx.dir() + "/model";
  auto m = make_deepseek(dir, HfModelConfig::load(dir), o);
  m->load_adapter(0, PeftAdapter::load(fx.dir() + "/adapter_a"));
  m->load_adapter(1, PeftAdapter::load(fx.dir() + "/adapter_b"));
  return m;
}

struct Case {
  int prompt;
  std::string tag;
  int slot() const { return tag == "base" ? -1 : tag == "a" ? 0 : 1; }
};
const std::vector<Case> kMixedBatch = {{0, "base"}, {1, "a"}, {2, "b"}, {2, "base"}, {0, "b"},
                                       {1, "base"}, {2, "a"}, {0, "a"}, {1, "b"}};

std::vector<GenerationRequest> requests(const Fixture& fx) {
  std::vector<GenerationRequest> out;
  for (const Case& c : kMixedBatch) {
    GenerationRequest r;
    r.prompt = fx.ints(fmt::format("p{}.prompt", c.prompt));
    r.max_new_tokens = 8;
    r.adapter_slot = c.slot();
    out.push_back(r);
  }
  return out;
}

struct Ties {
  std::vector<bool> own;
  int64_t first_early = INT64_MAX;
  bool affects(int64_t pos) const {
    return pos >= first_early || (pos < int64_t(own.size()) && own[size_t(pos)]);
  }
};

// A tie in the last MoE layer reaches only its own row; in an earlier one every later position.
Ties find_ties(const std::vector<std::vector<float>>& margin, float tie, float first_layer_tie) {
  Ties t;
  t.own.assign(margin.size(), false);
  for (size_t p = 0; p < margin.size(); ++p)
    for (size_t l = 0; l < margin[p].size(); ++l)
      if (margin[p][l] < (l == 0 ? first_layer_tie : tie)) {
        if (l + 1 == margin[p].size())
          t.own[p] = true;
        else
          t.first_early = std::min(t.first_early, int64_t(p));
      }
  return t;
}

struct RowStats {
  int checked = 0, near_tie = 0, diverged = 0;
  double worst = 0;
};

void compare_rows(const std::vector<float>& a, const std::vector<float>& e, int64_t first_pos,
                  const Ties& ties, double tol, const std::string& what, RowStats& st) {
  ASSERT_EQ(a.size(), e.size()) << what;
  for (int64_t r = 0; r < int64_t(a.size()) / kVocab; ++r) {
    const std::vector<float> ar(a.begin() + r * kVocab, a.begin() + (r + 1) * kVocab);
    const std::vector<float> er(e.begin() + r * kVocab, e.begin() + (r + 1) * kVocab);
    if (ties.affects(first_pos + r)) {
      ++st.near_tie;
      for (float v : ar) ASSERT_TRUE(std::isfinite(v)) << what << " row " << r;
      continue;
    }
    ++st.checked;
    double err = 0, ref = 0;
    for (size_t i = 0; i < ar.size(); ++i) {
      err = std::max(err, double(std::abs(ar[i] - er[i])));
      ref = std::max(ref, double(std::abs(er[i])));
    }
    st.worst = std::max(st.worst, err / ref);
    EXPECT_TRUE(test::allclose(ar, er, tol)) << what << " row " << r;
  }
}

void check(const Fixture& fx, const Case& c, const GenerationResult& r, DType kv, RowStats& st) {
  const double tol = kv == DType::bf16 ? kRelTolBf16Kv : kRelTol;
  const std::string key = fmt::format("p{}.{}", c.prompt, c.tag);
  SCOPED_TRACE(fx.name + " " + key + " on CUDA");
  ASSERT_TRUE(r.ok) << r.error;
  const int64_t n = r.prompt_logits.size(0);
  ASSERT_EQ(r.router_margin.size(), size_t(n + 7));
  for (const auto& m : r.router_margin) ASSERT_EQ(m.size(), 2u);  // MoE layers 1 and 2
  const Ties ties = find_ties(r.router_margin, fx.router_tie,
                              kv == DType::f32 && c.tag == "base" ? kRouterTieFirstLayerF32
                                                                   : fx.router_tie);
  const std::vector<int32_t> ref_tokens = fx.ints(key + ".tokens");
  ASSERT_EQ(r.tokens.size(), ref_tokens.size());
  int64_t same = 0;
  while (same < int64_t(ref_tokens.size()) && r.tokens[size_t(same)] == ref_tokens[size_t(same)])
    ++same;
  int64_t rows = int64_t(ref_tokens.size());
  if (same < rows) {
    EXPECT_TRUE(ties.affects(n - 1 + same))
        << "greedy token " << same << " differs without a routing near-tie: "
        << fmt::format("{} vs reference {}", fmt::join(r.tokens, ","), fmt::join(ref_tokens, ","));
    ++st.diverged;
    rows = same + 1;
  }
  compare_rows(test::to_floats(r.prompt_logits), fx.floats(key + ".prefill"), 0, ties, tol,
               key + ".prefill", st);
  std::vector<float> steps = test::to_floats(r.step_logits), ref = fx.floats(key + ".step_logits");
  steps.resize(size_t(rows * kVocab));
  ref.resize(size_t(rows * kVocab));
  compare_rows(steps, ref, n - 1, ties, tol, key + ".step", st);
}

// min_strict: rows held to the tolerance (of 141), a little under the CPU test's counts (the
// exempt rows follow this run's own router margins).
void run_golden(const Fixture& fx, DType kv, int page_size, MlaPath path, int min_strict,
                int max_diverged) {
  MOELORA_REQUIRE_GPU();
  auto model = load(fx, Device::cuda());
  dynamic_cast<DeepseekModel&>(*model).set_attention_path(path);
  EngineConfig ec;
  ec.page_size = page_size;
  ec.num_pages = 64;
  ec.kv_dtype = kv;
  ec.record_logits = true;
  Engine engine(*model, ec);
  ASSERT_TRUE(engine.cache().k(0).device().is_cuda());
  const auto res = engine.generate(requests(fx));
  ASSERT_EQ(res.size(), kMixedBatch.size());
  RowStats st;
  for (size_t i = 0; i < res.size(); ++i) check(fx, kMixedBatch[i], res[i], kv, st);
  fmt::print("{} on CUDA (path {}, {} cache): {} logit rows within tolerance (worst {:.2e}), {} "
             "after a routing near-tie; {} request(s) part after a near-tie\n",
             fx.name, int(path), dtype_name(kv), st.checked, st.worst, st.near_tie,
             st.diverged);
  EXPECT_GE(st.checked, min_strict);
  EXPECT_LE(st.diverged, max_diverged);
  EXPECT_EQ(engine.cache().free_pages(), ec.num_pages) << "pages leaked";
}

TEST(DeepseekGpu, V2GoldenMixedBatch) {
  run_golden(kV2, DType::f32, 4, MlaPath::automatic, 95, 1);
  run_golden(kV2, DType::bf16, 16, MlaPath::automatic, 90, 1);
}
TEST(DeepseekGpu, V3GoldenMixedBatch) {
  run_golden(kV3, DType::f32, 4, MlaPath::automatic, 110, 2);
  run_golden(kV3, DType::bf16, 16, MlaPath::automatic, 100, 2);
}
TEST(DeepseekGpu, AbsorbedAndExpandedPathsMatchReference) {
  for (MlaPath path : {MlaPath::absorbed, MlaPath::expanded}) {
    run_golden(kV2, DType::f32, 4, path, 95, 1);
    run_golden(kV3, DType::f32, 4, path, 110, 2);
  }
}

// The model's forward without the engine: a prefill in two chunks (the second reads the first
// one's latent rows from the cache) equals the one-shot prefill at bf16 level (steps of other
// sizes take other dense-linear kernels), and the CUDA and CPU backends give the same logits at
// bf16 level.
TEST(DeepseekGpu, ChunkedPrefillAndCpuAgreement) {
  MOELORA_REQUIRE_GPU();
  for (const Fixture* fx : {&kV2, &kV3}) {
    SCOPED_TRACE(fx->name);
    auto model = load(*fx, Device::cuda());
    auto cpu_model = load(*fx, Device::cpu());
    const std::vector<int32_t> prompt = fx->ints("p1.prompt");
    for (MlaPath path : {MlaPath::automatic, MlaPath::absorbed}) {
      dynamic_cast<DeepseekModel&>(*model).set_attention_path(path);
      for (int slot : {-1, 0}) {
        SCOPED_TRACE(fmt::format("slot {} path {}", slot, int(path)));
        PagedKvCache cache(model->kv_cache_config(16, 4, DType::f32));
        const int seq = cache.add_sequence(), whole = cache.add_sequence();
        const std::vector<int32_t> first(prompt.begin(), prompt.begin() + 5);
        const std::vector<int32_t> rest(prompt.begin() + 5, prompt.end());
        StepResult a = model->forward({SeqInput{seq, first, slot}}, cache, true);
        StepResult b = model->forward({SeqInput{seq, rest, slot}}, cache, true);
        ASSERT_TRUE(a.all_logits.device().is_cpu());  // results come back to the host
        std::vector<float> all = test::to_floats(a.all_logits),
                           tail = test::to_floats(b.all_logits);
        all.insert(all.end(), tail.begin(), tail.end());
        const StepResult one = model->forward({SeqInput{whole, prompt, slot}}, cache, true);
        EXPECT_TRUE(test::allclose(all, test::to_floats(one.all_logits), kRelTol));
        EXPECT_EQ(test::to_floats(b.last_logits),
                  std::vector<float>(tail.end() - kVocab, tail.end()));

        PagedKvCache cpu_cache(cpu_model->kv_cache_config(16, 4, DType::f32));
        const int cseq = cpu_cache.add_sequence();
        const StepResult c = cpu_model->forward({SeqInput{cseq, prompt, slot}}, cpu_cache, true);
        // Rows a routing near-tie reaches (in the CPU run's margins) are left out.
        const std::vector<float> cm = test::to_floats(c.router_margin);
        std::vector<std::vector<float>> margins;
        for (size_t p = 0; p < prompt.size(); ++p) margins.push_back({cm[2 * p], cm[2 * p + 1]});
        RowStats st;
        compare_rows(test::to_floats(one.all_logits), test::to_floats(c.all_logits), 0,
                     find_ties(margins, fx->router_tie, fx->router_tie), kRelTol, "CPU vs CUDA",
                     st);
        EXPECT_GE(st.checked, 2);
      }
    }
  }
}

}  // namespace
}  // namespace moelora
