// Whole-model Qwen3-MoE on the CPU backend against transformers 5.17 (+ peft 0.21): the
// golden fixture tests/fixtures/qwen3_moe_tiny (scripts/golden/make_qwen3_moe_model_golden.py,
// reference in f32 on the checkpoint's bf16 weights). Batched prefill + 8 greedy decode steps,
// base and two expert-LoRA adapters mixed in one batch; batch invariance; bad input.
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "moelora/engine/engine.h"
#include "moelora/io/safetensors.h"
#include "moelora/lora/peft_adapter.h"
#include "moelora/model/model.h"
#include "test_util.h"

namespace moelora {
namespace {

namespace fs = std::filesystem;

// bf16-level tolerance: the engine rounds the MoE input / output and the expert activation to
// bf16 where the reference stays in f32; a bf16 KV cache rounds K and V too.
constexpr double kRelTol = 2e-2;
constexpr double kRelTolBf16Kv = 3e-2;

std::string model_dir() {
  return test::fixture_path("qwen3_moe_tiny/model");
}

const SafetensorsFile& reference() {
  static SafetensorsFile f(test::fixture_path("qwen3_moe_tiny/reference.safetensors"));
  return f;
}

std::vector<int32_t> ref_ints(const std::string& key) {
  return test::to_ints(reference().tensor(key));
}
std::vector<float> ref_floats(const std::string& key) {
  return test::to_floats(reference().tensor(key));
}

ModelOptions lora_options() {
  ModelOptions o;
  o.lora_slots = 2;
  o.lora_r_max = 8;
  return o;
}

// Model with adapter a in slot 0 and adapter b in slot 1.
std::unique_ptr<Model> load_with_adapters() {
  auto m = Model::load(model_dir(), lora_options());
  m->load_adapter(0, PeftAdapter::load(test::fixture_path("qwen3_moe_tiny/adapter_a")));
  m->load_adapter(1, PeftAdapter::load(test::fixture_path("qwen3_moe_tiny/adapter_b")));
  return m;
}

struct Case {
  int prompt;       // p0..p2
  std::string tag;  // base, a, b
  int slot() const { return tag == "base" ? -1 : tag == "a" ? 0 : 1; }
};

GenerationRequest request_for(const Case& c) {
  GenerationRequest r;
  r.prompt = ref_ints(fmt::format("p{}.prompt", c.prompt));
  r.max_new_tokens = 8;
  r.adapter_slot = c.slot();
  return r;
}

// A token whose k-th and (k+1)-th router logits are closer than this may route differently
// under bf16-level differences (the engine rounds the MoE input to bf16, the reference does
// not); logit rows that depend on such a token are not held to the bf16 tolerance.
constexpr float kRouterTie = 0.01f;
// With an f32 KV cache nothing is rounded to bf16 before the first MoE layer's router, which
// then sees the reference's input up to f32 summation order: only much closer ties count.
constexpr float kRouterTieFirstLayerF32 = 1e-4f;

struct RowStats {
  int checked = 0, near_tie = 0, near_tie_off = 0;
};

// Which logit rows a near-tie can reach: a token routed near a tie in the last MoE layer
// changes only its own logits; in an earlier MoE layer, also every later position (through
// the K/V of the layers after it).
struct Ties {
  std::vector<bool> own;            // per position: a near-tie in the last MoE layer
  int64_t first_early = INT64_MAX;  // first position with a near-tie in an earlier MoE layer
  bool affects(int64_t pos) const {
    return pos >= first_early || (pos < int64_t(own.size()) && own[size_t(pos)]);
  }
};

Ties find_ties(const std::vector<std::vector<float>>& margin, float first_layer_tie) {
  Ties t;
  t.own.assign(margin.size(), false);
  for (size_t p = 0; p < margin.size(); ++p)
    for (size_t l = 0; l < margin[p].size(); ++l)
      if (margin[p][l] < (l == 0 ? first_layer_tie : kRouterTie)) {
        if (l + 1 == margin[p].size())
          t.own[p] = true;
        else
          t.first_early = std::min(t.first_early, int64_t(p));
      }
  return t;
}

// Compares logit rows; row r comes from the token at position first_pos + r. Rows a near-tie
// can reach are counted apart (expected to be off sometimes).
void compare_rows(const std::vector<float>& actual, const std::vector<float>& expected,
                  int64_t first_pos, const Ties& ties, double tol, const std::string& what,
                  RowStats& st) {
  constexpr int64_t V = 128;
  ASSERT_EQ(actual.size(), expected.size()) << what;
  for (int64_t r = 0; r < int64_t(actual.size()) / V; ++r) {
    const std::vector<float> a(actual.begin() + r * V, actual.begin() + (r + 1) * V);
    const std::vector<float> e(expected.begin() + r * V, expected.begin() + (r + 1) * V);
    const auto ok = test::allclose(a, e, tol);
    if (!ties.affects(first_pos + r)) {
      ++st.checked;
      EXPECT_TRUE(ok) << what << " row " << r;
    } else {
      ++st.near_tie;
      if (!ok) ++st.near_tie_off;
      for (float v : a) ASSERT_TRUE(std::isfinite(v)) << what << " row " << r;
    }
  }
}

// Tokens must match exactly; logits within tolerance except rows a routing near-tie reaches.
void check_against_reference(const Case& c, const GenerationResult& r, RowStats& st,
                             DType kv_dtype = DType::f32) {
  const double tol = kv_dtype == DType::bf16 ? kRelTolBf16Kv : kRelTol;
  const std::string key = fmt::format("p{}.{}", c.prompt, c.tag);
  SCOPED_TRACE(key);
  ASSERT_TRUE(r.ok) << r.error;
  EXPECT_EQ(r.finish_reason, "length");
  EXPECT_EQ(r.tokens, ref_ints(key + ".tokens"));
  const int64_t n = r.prompt_logits.size(0);
  ASSERT_EQ(r.router_margin.size(), size_t(n + 7));  // the prompt, then 7 tokens fed back
  for (const auto& m : r.router_margin) ASSERT_EQ(m.size(), 2u);  // MoE layers 0 and 2
  const Ties ties =
      find_ties(r.router_margin, kv_dtype == DType::bf16 ? kRouterTie : kRouterTieFirstLayerF32);
  compare_rows(test::to_floats(r.prompt_logits), ref_floats(key + ".prefill"), 0, ties, tol,
               key + ".prefill", st);
  // Step row j comes from the token at position n - 1 + j.
  compare_rows(test::to_floats(r.step_logits), ref_floats(key + ".step_logits"), n - 1, ties, tol,
               key + ".step", st);
}

const std::vector<Case> kMixedBatch = {{0, "base"}, {1, "a"}, {2, "b"}, {2, "base"}, {0, "b"},
                                       {1, "base"}, {2, "a"}, {0, "a"}, {1, "b"}};

void run_mixed_batch(DType kv_dtype, int page_size, int min_strict_rows) {
  auto model = load_with_adapters();
  EngineConfig ec;
  ec.page_size = page_size;
  ec.num_pages = 64;
  ec.kv_dtype = kv_dtype;
  ec.record_logits = true;
  Engine engine(*model, ec);
  std::vector<GenerationRequest> reqs;
  for (const Case& c : kMixedBatch) reqs.push_back(request_for(c));
  const auto results = engine.generate(reqs);
  ASSERT_EQ(results.size(), kMixedBatch.size());
  RowStats st;
  for (size_t i = 0; i < results.size(); ++i)
    check_against_reference(kMixedBatch[i], results[i], st, kv_dtype);
  // The fixture has near-tie tokens (router gaps down to 5e-4). With an f32 KV cache 139 of
  // the 141 rows are held to tolerance (one of the two others, p0.a step 1, is off: its layer-2
  // gap is 5e-4); with a bf16 KV cache 85 (p1's layer-0 gaps at positions 3 (5.6e-3) and 11
  // (1.3e-3) reach every later position of its three variants; position 11 routes differently
  // with bf16 K/V).
  fmt::print(
      "logit rows: {} within bf16 tolerance, {} after a routing near-tie ({} of them "
      "off)\n",
      st.checked, st.near_tie, st.near_tie_off);
  EXPECT_GE(st.checked, min_strict_rows);
  EXPECT_EQ(engine.cache().free_pages(), ec.num_pages) << "pages leaked";
}

TEST(Qwen3MoeModel, GoldenMixedBatchF32KvCache) {
  run_mixed_batch(DType::f32, 4, 139);
}
TEST(Qwen3MoeModel, GoldenMixedBatchBf16KvCache) {
  run_mixed_batch(DType::bf16, 16, 85);
}

TEST(Qwen3MoeModel, BatchInvariance) {
  auto model = load_with_adapters();
  EngineConfig ec;
  ec.page_size = 8;
  ec.num_pages = 64;
  ec.kv_dtype = DType::f32;
  ec.record_logits = true;
  Engine engine(*model, ec);
  std::vector<GenerationRequest> reqs;
  for (const Case& c : kMixedBatch) reqs.push_back(request_for(c));
  const auto batched = engine.generate(reqs);
  for (size_t i = 0; i < reqs.size(); ++i) {
    SCOPED_TRACE(fmt::format("request {} alone", i));
    const auto alone = engine.generate({reqs[i]});
    ASSERT_TRUE(alone[0].ok) << alone[0].error;
    EXPECT_EQ(alone[0].tokens, batched[i].tokens);
    // Every row is computed on its own on the CPU: identical up to summation order (none).
    EXPECT_TRUE(test::allclose(test::to_floats(alone[0].step_logits),
                               test::to_floats(batched[i].step_logits), 1e-6));
    EXPECT_TRUE(test::allclose(test::to_floats(alone[0].prompt_logits),
                               test::to_floats(batched[i].prompt_logits), 1e-6));
  }
}

// The model's forward without the engine: all-position logits of a chunked prefill (prompt in
// two steps) equal the reference, and a step's last_logits are the rows of all_logits.
TEST(Qwen3MoeModel, ChunkedPrefillMatchesReference) {
  auto model = Model::load(model_dir());
  PagedKvCache cache(model->kv_cache_config(16, 4, DType::f32));
  const std::vector<int32_t> prompt = ref_ints("p1.prompt");
  const int seq = cache.add_sequence();
  const std::vector<int32_t> first(prompt.begin(), prompt.begin() + 5);
  const std::vector<int32_t> rest(prompt.begin() + 5, prompt.end());
  StepResult a = model->forward({SeqInput{seq, first, -1}}, cache, true);
  StepResult b = model->forward({SeqInput{seq, rest, -1}}, cache, true);
  std::vector<float> all = test::to_floats(a.all_logits), tail = test::to_floats(b.all_logits);
  all.insert(all.end(), tail.begin(), tail.end());
  EXPECT_TRUE(test::allclose(all, ref_floats("p1.base.prefill"), kRelTol));
  const int64_t V = model->config().vocab_size;
  const std::vector<float> last = test::to_floats(b.last_logits);
  EXPECT_EQ(last, std::vector<float>(tail.end() - V, tail.end()));
  EXPECT_EQ(cache.length(seq), int64_t(prompt.size()));
}

// --- Loading variants and bad input ---

struct ModelFiles {
  nlohmann::json config;
  std::map<std::string, Tensor> tensors;
};

ModelFiles read_model() {
  ModelFiles f;
  std::ifstream in(model_dir() + "/config.json");
  std::stringstream ss;
  ss << in.rdbuf();
  f.config = nlohmann::json::parse(ss.str());
  static SafetensorsFile st(model_dir() + "/model.safetensors");
  for (const std::string& n : st.names()) f.tensors[n] = st.tensor(n);
  return f;
}

std::string write_model(const std::string& name, const ModelFiles& f) {
  const fs::path dir =
      fs::temp_directory_path() / ("moelora_qwen3_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << f.config.dump(2);
  save_safetensors((dir / "model.safetensors").string(), f.tensors);
  return dir.string();
}

TEST(Qwen3MoeModel, FusedExpertKeysLoadTheSame) {
  ModelFiles f = read_model();
  const int64_t E = 8, I = 32, H = 64;
  for (int l : {0, 2}) {
    const std::string p = fmt::format("model.layers.{}.mlp.experts.", l);
    Tensor gu = Tensor::empty({E, 2 * I, H}, DType::bf16),
           dn = Tensor::empty({E, H, I}, DType::bf16);
    for (int64_t e = 0; e < E; ++e) {
      const std::string ep = p + std::to_string(e) + ".";
      std::memcpy(gu.data<bf16_t>() + e * 2 * I * H, f.tensors[ep + "gate_proj.weight"].data(),
                  size_t(I * H) * 2);
      std::memcpy(gu.data<bf16_t>() + (e * 2 + 1) * I * H, f.tensors[ep + "up_proj.weight"].data(),
                  size_t(I * H) * 2);
      std::memcpy(dn.data<bf16_t>() + e * H * I, f.tensors[ep + "down_proj.weight"].data(),
                  size_t(H * I) * 2);
      for (const char* proj : {"gate_proj.weight", "up_proj.weight", "down_proj.weight"})
        f.tensors.erase(ep + proj);
    }
    f.tensors[p + "gate_up_proj"] = gu;
    f.tensors[p + "down_proj"] = dn;
  }
  auto fused = Model::load(write_model("fused", f));
  auto per_expert = Model::load(model_dir());
  const std::vector<int32_t> prompt = ref_ints("p0.prompt");
  std::vector<std::vector<float>> out;
  for (Model* m : {fused.get(), per_expert.get()}) {
    PagedKvCache cache(m->kv_cache_config(8, 16, DType::f32));
    out.push_back(test::to_floats(
        m->forward({SeqInput{cache.add_sequence(), prompt, -1}}, cache, true).all_logits));
  }
  EXPECT_EQ(out[0], out[1]);
}

TEST(Qwen3MoeModel, TiedEmbeddingsUseTheEmbeddingTable) {
  ModelFiles f = read_model();
  f.config["tie_word_embeddings"] = true;
  f.tensors["lm_head.weight"] = f.tensors["model.embed_tokens.weight"];
  auto with_copy = Model::load(write_model("tied_copy", f));
  f.tensors.erase("lm_head.weight");
  auto tied = Model::load(write_model("tied", f));
  // Untied model whose lm_head is the embedding: the same logits.
  ModelFiles g = read_model();
  g.tensors["lm_head.weight"] = g.tensors["model.embed_tokens.weight"];
  auto untied = Model::load(write_model("untied_same", g));
  const std::vector<int32_t> prompt = ref_ints("p2.prompt");
  std::vector<std::vector<float>> out;
  for (Model* m : {tied.get(), with_copy.get(), untied.get()}) {
    PagedKvCache cache(m->kv_cache_config(8, 16, DType::f32));
    out.push_back(test::to_floats(
        m->forward({SeqInput{cache.add_sequence(), prompt, -1}}, cache).last_logits));
  }
  EXPECT_EQ(out[0], out[2]);
  EXPECT_EQ(out[1], out[2]);
}

TEST(Qwen3MoeModel, BadModelDirectories) {
  {
    ModelFiles f = read_model();
    f.config["model_type"] = "llama";
    test::expect_error([&] { Model::load(write_model("llama", f)); },
                       "model_type 'llama' has no model in moelora; supported:");
    test::expect_error([&] { Model::load(write_model("llama", f)); }, "qwen3_moe");
    test::expect_error([&] { Model::load(write_model("llama", f)); }, "mixtral");
    f.config["model_type"] = "qwen2_moe";  // the config parser knows it, no model does yet
    test::expect_error([&] { Model::load(write_model("qwen2_moe", f)); }, "supported:");
  }
  {
    ModelFiles f = read_model();
    f.tensors.erase("model.layers.2.self_attn.k_norm.weight");
    test::expect_error([&] { Model::load(write_model("missing", f)); },
                       "missing tensor 'model.layers.2.self_attn.k_norm.weight'");
  }
  {
    ModelFiles f = read_model();
    f.tensors.erase("model.layers.0.mlp.experts.5.up_proj.weight");
    test::expect_error([&] { Model::load(write_model("missing_expert", f)); },
                       "missing tensor 'model.layers.0.mlp.experts.5.up_proj.weight'");
  }
  {
    ModelFiles f = read_model();
    f.tensors["model.layers.1.mlp.down_proj.weight"] = Tensor::zeros({64, 95}, DType::bf16);
    test::expect_error([&] { Model::load(write_model("shape", f)); },
                       "tensor 'model.layers.1.mlp.down_proj.weight' has shape [64, 95], "
                       "expected [64, 96]");
  }
  {
    ModelFiles f = read_model();
    f.tensors["model.layers.0.self_attn.q_proj.bias"] = Tensor::zeros({64}, DType::bf16);
    test::expect_error([&] { Model::load(write_model("unused", f)); },
                       "not used by the model (unexpected keys: "
                       "'model.layers.0.self_attn.q_proj.bias')");
  }
  {
    ModelFiles f = read_model();
    f.config["rope_parameters"]["rope_type"] = "dynamic";
    test::expect_error([&] { Model::load(write_model("dynamic_rope", f)); },
                       "rope_type 'dynamic' is not supported");
  }
}

// YaRN rope_parameters (Qwen3's long-context setting) are read and applied: factor 1 reduces
// to plain RoPE (same logits up to the blend's rounding); factor 4 changes every later position
// (frequencies and the cos / sin factor 0.1 ln 4 + 1), while position 0 (no rotation; q and k
// scaled alike, a single key) keeps plain RoPE's logits. rope_test.cpp checks the frequencies.
TEST(Qwen3MoeModel, YarnRopeIsApplied) {
  const std::vector<int32_t> prompt = ref_ints("p2.prompt");
  auto logits = [&](Model& m) {
    PagedKvCache cache(m.kv_cache_config(8, 16, DType::f32));
    return test::to_floats(
        m.forward({SeqInput{cache.add_sequence(), prompt, -1}}, cache, true).all_logits);
  };
  auto plain = Model::load(model_dir());
  const int64_t V = plain->config().vocab_size;
  const std::vector<float> base = logits(*plain);
  auto yarn = [&](double factor, const char* name) {
    ModelFiles f = read_model();
    f.config["rope_parameters"] = {{"rope_type", "yarn"},
                                   {"rope_theta", 1000000.0},
                                   {"factor", factor},
                                   {"original_max_position_embeddings", 16}};
    auto m = Model::load(write_model(name, f));
    return logits(*m);
  };
  EXPECT_TRUE(test::allclose(yarn(1.0, "yarn_factor1"), base, 1e-5, 1e-5));
  const std::vector<float> scaled = yarn(4.0, "yarn_factor4");
  ASSERT_EQ(scaled.size(), base.size());
  ASSERT_GT(base.size(), size_t(V));
  for (int64_t v = 0; v < V; ++v) EXPECT_NEAR(scaled[size_t(v)], base[size_t(v)], 1e-5);
  EXPECT_FALSE(test::allclose(std::vector<float>(scaled.begin() + V, scaled.end()),
                              std::vector<float>(base.begin() + V, base.end()), 1e-3, 1e-3));
}

TEST(Qwen3MoeModel, ConfigFromTransformers5) {
  auto model = Model::load(model_dir());
  const HfModelConfig& c = model->config();
  EXPECT_EQ(c.num_experts, 8);         // written as num_local_experts
  EXPECT_EQ(c.rope_theta, 1000000.0);  // written under rope_parameters
  EXPECT_FALSE(c.is_moe_layer(1));
  EXPECT_TRUE(c.is_moe_layer(0) && c.is_moe_layer(2));
}

TEST(Qwen3MoeModel, BadRequestsFailAloneTheRestProceed) {
  auto model = load_with_adapters();
  model->unload_adapter(1);
  EngineConfig ec;
  ec.page_size = 4;
  ec.num_pages = 10;  // 40 tokens of KV for the whole batch
  ec.kv_dtype = DType::f32;
  ec.record_logits = true;
  Engine engine(*model, ec);
  GenerationRequest good = request_for({0, "base"});  // 7 + 8 - 1 = 14 tokens: 4 pages
  GenerationRequest too_long = good;
  too_long.prompt.assign(64, 5);  // the context is 64
  GenerationRequest unloaded = request_for({2, "b"});
  GenerationRequest bad_token = good;
  bad_token.prompt[1] = 128;
  GenerationRequest good2 = request_for({1, "a"});       // 13 + 8 - 1 = 20 tokens: 5 pages
  GenerationRequest no_room = request_for({2, "base"});  // 10 tokens: 3 pages, 1 left
  const auto r = engine.generate({good, too_long, unloaded, bad_token, good2, no_room});
  RowStats st;
  check_against_reference({0, "base"}, r[0], st);
  EXPECT_FALSE(r[1].ok);
  EXPECT_NE(r[1].error.find("max_position_embeddings"), std::string::npos) << r[1].error;
  EXPECT_FALSE(r[2].ok);
  EXPECT_NE(r[2].error.find("adapter slot 1 holds no adapter"), std::string::npos) << r[2].error;
  EXPECT_FALSE(r[3].ok);
  EXPECT_NE(r[3].error.find("token id 128"), std::string::npos) << r[3].error;
  check_against_reference({1, "a"}, r[4], st);
  EXPECT_FALSE(r[5].ok);
  EXPECT_NE(r[5].error.find("KV cache budget exhausted"), std::string::npos) << r[5].error;
  EXPECT_EQ(engine.cache().free_pages(), ec.num_pages);
}

TEST(Qwen3MoeModel, StopTokensAndContextEnd) {
  auto model = Model::load(model_dir());
  EngineConfig ec;
  ec.num_pages = 16;
  Engine engine(*model, ec);
  GenerationRequest r = request_for({1, "base"});
  const std::vector<int32_t> ref = ref_ints("p1.base.tokens");
  r.stop_token_ids = {ref[3]};
  GenerationRequest near_end = request_for({0, "base"});
  near_end.prompt.resize(62, 1);  // two positions left in the context of 64
  near_end.max_new_tokens = 10;
  const auto out = engine.generate({r, near_end});
  ASSERT_TRUE(out[0].ok) << out[0].error;
  EXPECT_EQ(out[0].finish_reason, "stop");
  EXPECT_EQ(out[0].tokens, std::vector<int32_t>(ref.begin(), ref.begin() + 4));
  ASSERT_TRUE(out[1].ok) << out[1].error;
  EXPECT_EQ(out[1].finish_reason, "context");
  EXPECT_EQ(out[1].tokens.size(), 3u);  // positions 62, 63 fed back: 1 + 2 tokens
}

// Adapter modules the model has no place for are errors; embedding / lm_head LoRA is warned
// about and not applied; ranks over the pool's r_max are refused at load.
TEST(Qwen3MoeModel, AdapterModuleChecks) {
  auto model = Model::load(model_dir(), lora_options());
  int n = 0;
  auto write = [&](const std::string& module, int r, const std::vector<std::string>& targets) {
    const fs::path dir = fs::temp_directory_path() /
                         fmt::format("moelora_qwen3_{}_adapter_{}", ::getpid(), n++);
    fs::remove_all(dir);
    fs::create_directories(dir);
    nlohmann::json cfg = {{"peft_type", "LORA"}, {"r", r}, {"lora_alpha", 8},
                          {"target_modules", targets}};
    std::ofstream(dir / "adapter_config.json") << cfg.dump();
    const std::string p = "base_model.model." + module + ".";
    const int64_t in = 64, out = module.find("k_proj") != std::string::npos ? 32 : 64;
    save_safetensors((dir / "adapter_model.safetensors").string(),
                     {{p + "lora_A.weight", Tensor::zeros({r, in}, DType::f32)},
                      {p + "lora_B.weight", Tensor::zeros({out, r}, DType::f32)},
                      {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                       Tensor::zeros({r, 64}, DType::f32)},
                      {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                       Tensor::zeros({64, r}, DType::f32)}});
    return PeftAdapter::load(dir.string());
  };
  // Attention LoRA loads.
  model->load_adapter(0, write("model.layers.2.self_attn.k_proj", 4, {"q_proj", "k_proj"}));
  EXPECT_TRUE(model->adapter_loaded(0));
  model->unload_adapter(0);
  // A module of no layer / no projection of the model.
  test::expect_error(
      [&] { model->load_adapter(0, write("model.layers.7.self_attn.k_proj", 4, {"k_proj", "q_proj"})); },
      "'model.layers.7.self_attn.k_proj' matches no module of the qwen3_moe model");
  test::expect_error(
      [&] { model->load_adapter(0, write("model.layers.0.mlp.gate_proj", 4, {"gate_proj", "q_proj"})); },
      "'model.layers.0.mlp.gate_proj' matches no module");
  EXPECT_FALSE(model->adapter_loaded(0));
  // Rank over r_max (8).
  test::expect_error(
      [&] { model->load_adapter(0, write("model.layers.2.self_attn.k_proj", 12, {"k_proj", "q_proj"})); },
      "over the engine's maximum LoRA rank 8");
  EXPECT_FALSE(model->adapter_loaded(0));
  // lm_head LoRA: warned about (stderr), the rest applies.
  model->load_adapter(1, write("lm_head", 4, {"lm_head", "q_proj"}));
  EXPECT_TRUE(model->adapter_loaded(1));
  const PeftAdapter ad = write("model.layers.2.self_attn.k_proj", 4, {"q_proj", "k_proj"});
  test::expect_error([&] { model->load_adapter(2, ad); }, "outside the model's 2 LoRA slot(s)");
}

// An adapter that touches one MoE layer only: the other layer's slot holds no LoRA.
TEST(Qwen3MoeModel, AdapterOnOneLayer) {
  const std::string src = test::fixture_path("qwen3_moe_tiny/adapter_a");
  SafetensorsFile st(src + "/adapter_model.safetensors");
  std::map<std::string, Tensor> keep;
  for (const std::string& n : st.names())
    if (n.find(".layers.0.") != std::string::npos) keep[n] = st.tensor(n);
  ASSERT_EQ(keep.size(), 4u);
  const fs::path dir = fs::temp_directory_path() /
                       ("moelora_qwen3_" + std::to_string(::getpid()) + "_layer0_adapter");
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::copy_file(src + "/adapter_config.json", dir / "adapter_config.json");
  save_safetensors((dir / "adapter_model.safetensors").string(), keep);

  auto model = load_with_adapters();
  model->unload_adapter(1);
  model->load_adapter(1, PeftAdapter::load(dir.string()));
  PagedKvCache cache(model->kv_cache_config(16, 16, DType::f32));
  const std::vector<int32_t> prompt = ref_ints("p1.prompt");
  std::vector<std::vector<float>> out;
  for (int slot : {-1, 0, 1})
    out.push_back(test::to_floats(
        model->forward({SeqInput{cache.add_sequence(), prompt, slot}}, cache, true).all_logits));
  // Layer 0 positions see adapter a's layer-0 LoRA: the rows differ from base and from the
  // full adapter (which changes layer 2 as well).
  EXPECT_NE(out[2], out[0]);
  EXPECT_NE(out[2], out[1]);
  EXPECT_TRUE(test::allclose(out[1], ref_floats("p1.a.prefill"), kRelTol));
}

TEST(Qwen3MoeModel, ForwardRejectsBadSteps) {
  auto model = Model::load(model_dir());
  PagedKvCache cache(model->kv_cache_config(2, 4, DType::f32));  // 8 tokens of KV
  const int seq = cache.add_sequence();
  test::expect_error([&] { model->forward({SeqInput{seq, {}, -1}}, cache); }, "has no tokens");
  test::expect_error(
      [&] {
        model->forward({SeqInput{seq, {1, 2, 3, 4, 5, 6, 7, 8, 9}, -1}}, cache);
      },
      "KV cache budget exhausted");
  test::expect_error(
      [&] {
        model->forward({SeqInput{seq, {1}, 0}}, cache);
      },
      "outside the model's 0 LoRA slot(s)");
  test::expect_error(
      [&] {
        model->forward({SeqInput{seq + 1, {1}, -1}}, cache);
      },
      "sequence 1 does not exist");
  EXPECT_EQ(cache.length(seq), 0);
  EXPECT_EQ(cache.free_pages(), 2);
}

TEST(PagedKvCache, BudgetAndContext) {
  KvCacheConfig c;
  c.num_layers = 1;
  c.num_kv_heads = 2;
  c.head_dim = 4;
  c.page_size = 4;
  c.num_pages = 3;
  c.max_seq_len = 10;
  c.max_seqs = 2;
  PagedKvCache cache(c);
  const int a = cache.add_sequence(), b = cache.add_sequence();
  test::expect_error([&] { cache.add_sequence(); }, "2 sequences are alive");
  cache.reserve(a, 5);  // 2 pages
  EXPECT_EQ(cache.pages(a), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(cache.slot(a, 5), 1 * 4 + 1);
  test::expect_error([&] { cache.reserve(b, 11); }, "exceeds the model's context of 10");
  test::expect_error([&] { cache.reserve(b, 6); },
                     "KV cache budget exhausted: 6 tokens need 2 more page(s) of 4 tokens, 1 of 3");
  EXPECT_TRUE(cache.pages(b).empty());  // nothing taken by the failed reservation
  cache.reserve(b, 4);
  test::expect_error([&] { cache.advance(b, 5); }, "past its reservation");
  cache.free_sequence(a);
  EXPECT_EQ(cache.free_pages(), 2);
  cache.reserve(b, 10);
  EXPECT_EQ(cache.free_pages(), 0);
}

}  // namespace
}  // namespace moelora
