#include "tools/bench_decode.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>

#include <unistd.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "model/random_adapter.h"
#include "model/weight_loader.h"
#include "moelora/core/graph.h"
#include "moelora/core/random.h"
#include "moelora/io/hf_config.h"
#include "moelora/io/safetensors.h"
#include "moelora/lora/peft_adapter.h"
#include "moelora/model/model.h"

namespace moelora::tools {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// "none" or "r<rank>x<adapters>": the rank of every LoRA and how many distinct adapter slots
// the batch's sequences cycle through.
struct LoraSetting {
  std::string name;
  int rank = 0;
  int adapters = 0;
};

LoraSetting parse_lora_setting(const std::string& s) {
  if (s == "none") return {s, 0, 0};
  int rank = 0, adapters = 0;
  char tail = 0;
  const bool ok = std::sscanf(s.c_str(), "r%dx%d%c", &rank, &adapters, &tail) == 2;
  MOELORA_CHECK(ok && rank >= 1 && rank <= 256 && adapters >= 1 && adapters <= 64,
                "--lora: expected 'none' or r<rank>x<adapters> (rank 1..256, adapters 1..64), "
                "found '{}'",
                s);
  return {s, rank, adapters};
}

// config.json of a built-in shape (the published configs' architecture fields).
json shape_config(const std::string& shape) {
  json c;
  c["hidden_act"] = "silu";
  c["rope_parameters"] = {{"rope_theta", 1000000.0}, {"rope_type", "default"}};
  c["tie_word_embeddings"] = false;
  c["attention_dropout"] = 0.0;
  if (shape == "qwen3-30b-a3b" || shape == "tiny") {
    const bool tiny = shape == "tiny";
    c["model_type"] = "qwen3_moe";
    c["hidden_size"] = tiny ? 64 : 2048;
    c["num_hidden_layers"] = tiny ? 3 : 48;
    c["num_attention_heads"] = tiny ? 4 : 32;
    c["num_key_value_heads"] = tiny ? 2 : 4;
    c["head_dim"] = tiny ? 16 : 128;
    c["num_experts"] = tiny ? 8 : 128;
    c["num_experts_per_tok"] = tiny ? 2 : 8;
    c["moe_intermediate_size"] = tiny ? 32 : 768;
    c["intermediate_size"] = tiny ? 96 : 6144;
    c["vocab_size"] = tiny ? 384 : 151936;
    c["max_position_embeddings"] = tiny ? 4096 : 40960;
    c["mlp_only_layers"] = tiny ? json::array({1}) : json::array();
    c["decoder_sparse_step"] = 1;
    c["norm_topk_prob"] = true;
    c["rms_norm_eps"] = 1e-6;
    c["attention_bias"] = false;
    c["use_sliding_window"] = false;
    return c;
  }
  if (shape == "mixtral-8x7b") {
    c["model_type"] = "mixtral";
    c["hidden_size"] = 4096;
    c["num_hidden_layers"] = 32;
    c["num_attention_heads"] = 32;
    c["num_key_value_heads"] = 8;
    c["head_dim"] = 128;
    c["num_local_experts"] = 8;
    c["num_experts_per_tok"] = 2;
    c["intermediate_size"] = 14336;
    c["vocab_size"] = 32000;
    c["max_position_embeddings"] = 32768;
    c["rms_norm_eps"] = 1e-5;
    c["sliding_window"] = nullptr;
    return c;
  }
  if (shape == "deepseek-v2-lite") {
    // DeepSeek-V2-Lite's architecture (MLA without q_lora_rank, 2 shared + 64 routed experts,
    // greedy top-6, the first layer dense). Its YaRN rope_scaling is left out: the models refuse
    // YaRN so far, and a benchmark on random weights does not need it.
    c["model_type"] = "deepseek_v2";
    c["hidden_size"] = 2048;
    c["num_hidden_layers"] = 27;
    c["num_attention_heads"] = 16;
    c["num_key_value_heads"] = 16;
    c["q_lora_rank"] = nullptr;
    c["kv_lora_rank"] = 512;
    c["qk_nope_head_dim"] = 128;
    c["qk_rope_head_dim"] = 64;
    c["v_head_dim"] = 128;
    c["n_routed_experts"] = 64;
    c["n_shared_experts"] = 2;
    c["num_experts_per_tok"] = 6;
    c["moe_intermediate_size"] = 1408;
    c["intermediate_size"] = 10944;
    c["first_k_dense_replace"] = 1;
    c["moe_layer_freq"] = 1;
    c["topk_method"] = "greedy";
    c["n_group"] = 1;
    c["topk_group"] = 1;
    c["norm_topk_prob"] = false;
    c["routed_scaling_factor"] = 1.0;
    c["scoring_func"] = "softmax";
    c["vocab_size"] = 102400;
    c["max_position_embeddings"] = 163840;
    c["rms_norm_eps"] = 1e-6;
    c["attention_bias"] = false;
    c["rope_parameters"] = {{"rope_theta", 10000.0}, {"rope_type", "default"}};
    return c;
  }
  MOELORA_THROW(
      "--shape: expected qwen3-30b-a3b, mixtral-8x7b, deepseek-v2-lite or tiny, "
      "found '{}'",
      shape);
}

std::string now_iso() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// Removes the scratch directory (random-weight model description, adapters) on exit.
struct ScratchDir {
  std::string path;
  ScratchDir() {
    path = (fs::temp_directory_path() / fmt::format("moelora_bench_decode_{}", getpid())).string();
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

struct Row {
  int batch = 0;
  std::string path;
  std::string lora;
  double ms = 0, min_ms = 0, max_ms = 0, tok_s = 0;
  double ratio = NAN;       // tok/s over LoRA none's (the mean of its two measurements)
  double over_hooks = NAN;  // fast path: tok/s over the hooks path's at the same batch and LoRA
  bool repeat = false;      // the second measurement of `none` at this batch (drift check)
};

struct StepTimes {
  double median = 0, min = 0, max = 0;  // ms
};

// Wall times of `steps` decode steps of `batch` sequences that each start at `context` tokens
// of (random) K/V; sequence i runs adapter slot i % adapters (-1 without).
StepTimes time_decode(Model& model, PagedKvCache& cache, int batch, int adapters, int64_t context,
                      int warmup, int steps, uint64_t seed) {
  std::vector<SeqInput> in(static_cast<size_t>(batch));
  for (int i = 0; i < batch; ++i) {
    SeqInput& s = in[size_t(i)];
    s.seq = cache.add_sequence();
    cache.reserve(s.seq, context + warmup + steps);
    cache.advance(s.seq, context);  // the pages hold random K/V already
    s.adapter_slot = adapters > 0 ? i % adapters : -1;
    s.tokens = {0};
  }
  const int64_t V = model.config().vocab_size;
  std::vector<double> ms;
  for (int step = 0; step < warmup + steps; ++step) {
    for (int i = 0; i < batch; ++i)
      in[size_t(i)].tokens[0] =
          int32_t(uniform_at(seed, uint64_t(step * batch + i), 0.0f, 1.0f) * float(V - 1));
    const auto t0 = std::chrono::steady_clock::now();
    const StepResult r = model.forward(in, cache);
    const auto t1 = std::chrono::steady_clock::now();
    MOELORA_CHECK(r.last_logits.size(0) == batch, "bench decode: expected {} logit rows, found {}",
                  batch, r.last_logits.size(0));
    if (step >= warmup) ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  for (const SeqInput& s : in) cache.free_sequence(s.seq);
  StepTimes t;
  t.median = median(ms);
  t.min = *std::min_element(ms.begin(), ms.end());
  t.max = *std::max_element(ms.begin(), ms.end());
  return t;
}

// Median ms of copying a fresh f32 [batch, vocab] device tensor to a new host tensor: what the
// step's logits download costs by itself (host allocation and first touch included).
double logits_download_ms(Device device, int batch, int64_t vocab) {
  if (device.is_cpu()) return 0.0;
  Tensor d = Tensor::zeros({batch, vocab}, DType::f32, device);
  std::vector<double> ms;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    const Tensor h = d.to(Device::cpu());
    ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return median(ms);
}

}  // namespace

CLI::App* add_bench_decode_command(CLI::App& bench, BenchDecodeOptions& o) {
  CLI::App* d = bench.add_subcommand(
      "decode",
      "time whole-model decode steps (random weights of a real shape) per batch size and LoRA "
      "setting");
  d->add_option("--shape", o.shape,
                "model shape: qwen3-30b-a3b, mixtral-8x7b, deepseek-v2-lite, tiny")
      ->capture_default_str();
  d->add_option("--dtype", o.dtype, "expert weights: bf16, int4, int8, fp8, nvfp4")
      ->capture_default_str();
  d->add_option("--group-size", o.group_size,
                "quantization group along K (0: 128; nvfp4 16; fp8 = square block)");
  d->add_option("--batches", o.batches, "batch sizes (default 1,4,16,64,128,256; CPU 1,4,16)")
      ->delimiter(',');
  d->add_option("--lora", o.lora, "LoRA settings: none, r<rank>x<adapters>")
      ->delimiter(',')
      ->capture_default_str();
  d->add_option("--path", o.path,
                "decode paths: hooks (eager steps), fast (CUDA-graph steps, overlapped LoRA "
                "shrinks); both: hooks,fast")
      ->delimiter(',')
      ->capture_default_str();
  d->add_option("--lora-targets", o.lora_targets,
                "modules the random adapters cover: all, attention (projections only) or "
                "experts (routed experts only)")
      ->capture_default_str();
  d->add_option("--moe-lora", o.moe_lora,
                "fast path's MoE LoRA variant: best (per weight format), staged, overlap, direct, "
                "inline")
      ->capture_default_str();
  d->add_option("--side-priority", o.side_priority,
                "fast path: priority of the LoRA side streams, normal or high")
      ->check(CLI::IsMember({"normal", "high"}))
      ->capture_default_str();
  d->add_option("--context", o.context, "KV length of every sequence before timing")
      ->capture_default_str();
  d->add_option("--steps", o.steps, "timed decode steps per point (default 20 on CUDA, 3 on CPU)");
  d->add_option("--warmup", o.warmup, "untimed steps first (default 3 on CUDA, 1 on CPU)");
  d->add_option("--device", o.device, "auto, cpu or cuda")->capture_default_str();
  d->add_option("--backend", o.backend, "MoE backend by name (default: the model's pick)");
  d->add_option("--json", o.json, "write results as JSON to this file");
  d->add_option("--seed", o.seed, "random seed")->capture_default_str();
  return d;
}

int run_bench_decode(const BenchDecodeOptions& o) {
  const WeightFormat format = parse_weight_format(o.dtype);
  Device device = Device::cpu();
  if (o.device == "cuda" || (o.device == "auto" && cuda_available())) {
    MOELORA_CHECK(cuda_available(), "--device cuda: no usable CUDA device");
    device = Device::cuda();
  } else {
    MOELORA_CHECK(o.device == "auto" || o.device == "cpu",
                  "--device: expected auto, cpu or cuda, found '{}'", o.device);
  }
  const bool gpu = device.is_cuda();
  std::vector<int> batches = o.batches;
  if (batches.empty())
    batches = gpu ? std::vector<int>{1, 4, 16, 64, 128, 256} : std::vector<int>{1, 4, 16};
  for (int b : batches) MOELORA_CHECK(b >= 1, "--batches: sizes must be >= 1, found {}", b);
  MOELORA_CHECK(o.context >= 1, "--context: must be >= 1, found {}", o.context);
  const int steps = o.steps > 0 ? o.steps : (gpu ? 20 : 3);
  const int warmup = o.warmup > 0 ? o.warmup : (gpu ? 3 : 1);
  std::vector<LoraSetting> settings;
  int max_rank = 0, max_adapters = 0;
  for (const std::string& l : o.lora) {
    settings.push_back(parse_lora_setting(l));
    max_rank = std::max(max_rank, settings.back().rank);
    max_adapters = std::max(max_adapters, settings.back().adapters);
  }
  const int max_batch = *std::max_element(batches.begin(), batches.end());
  std::vector<DecodePath> paths;
  for (const std::string& p : o.path) paths.push_back(parse_decode_path(p));
  MOELORA_CHECK(!paths.empty(), "--path: give hooks, fast or both");

  // The random-weight model: config.json + random_weights.json, weights made on the device.
  ScratchDir scratch;
  const std::string model_dir = scratch.path + "/model";
  fs::create_directories(model_dir);
  const json cfg = shape_config(o.shape);
  std::ofstream(model_dir + "/config.json") << cfg.dump(2) << "\n";
  RandomWeights rw;
  rw.seed = o.seed;
  rw.experts_format = format;
  rw.group_size = o.group_size;
  rw.device = device;
  write_random_weights(model_dir, rw);
  const HfModelConfig config = HfModelConfig::load(model_dir);
  MOELORA_CHECK(o.context + warmup + steps <= config.max_position_embeddings,
                "--context {} + {} steps exceeds the shape's {} positions", o.context,
                warmup + steps, config.max_position_embeddings);

  ModelOptions mo;
  mo.device = device;
  mo.max_step_tokens = max_batch;
  if (!o.backend.empty()) mo.moe_backend = o.backend;
  mo.lora_slots = max_adapters;
  mo.lora_r_max = std::max(max_rank, 1);
  const DeviceInfo info = device_info(device);
  std::printf(
      "moelora bench decode: %s, %s experts, device %s, context %lld, %d steps (+%d "
      "warm-up) per point\n",
      o.shape.c_str(), format_name(format), info.name.c_str(), static_cast<long long>(o.context),
      steps, warmup);
  auto t0 = std::chrono::steady_clock::now();
  std::unique_ptr<Model> model = Model::load(model_dir, mo);
  std::printf("random weights made in %.1f s\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());

  // One cache for the largest batch; its pages hold random K/V (bf16) from the start.
  constexpr int kPageSize = 16;
  const int64_t pages_per_seq = (o.context + warmup + steps + kPageSize - 1) / kPageSize;
  KvCacheConfig kc = model->kv_cache_config(pages_per_seq * max_batch, kPageSize, DType::bf16);
  kc.max_seqs = std::max(kc.max_seqs, max_batch);
  PagedKvCache cache(kc);
  {
    Stream s = gpu ? Stream::create(device) : Stream();
    for (int l = 0; l < kc.num_layers; ++l) {
      fill_uniform(cache.k(l), o.seed + 100 + uint64_t(l), -1.0f, 1.0f, s);
      if (!kc.key_only) fill_uniform(cache.v(l), o.seed + 1000 + uint64_t(l), -1.0f, 1.0f, s);
    }
    s.synchronize();
  }

  // One adapter rank per run, loaded once into every slot before any timing. Batches are the
  // outer loop and `none` is measured again after the LoRA settings of each batch, so drift
  // (clocks, allocator state) shows up instead of landing in the ratios.
  for (const LoraSetting& ls : settings)
    MOELORA_CHECK(ls.rank == 0 || ls.rank == max_rank,
                  "--lora: one rank per run (found r{} and r{})", ls.rank, max_rank);
  if (max_rank > 0) {
    t0 = std::chrono::steady_clock::now();
    const std::string adir = fmt::format("{}/adapter_r{}", scratch.path, max_rank);
    write_random_adapter(adir, config, max_rank, o.seed + 7, o.lora_targets);
    const PeftAdapter adapter = PeftAdapter::load(adir);
    for (int s = 0; s < max_adapters; ++s) model->load_adapter(s, adapter);
    std::printf("random rank-%d adapter written and loaded into %d slot(s) in %.1f s\n", max_rank,
                max_adapters,
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::vector<Row> rows;
  std::map<int, double> download_ms;
  const bool repeat_none = settings.size() > 1 && settings.front().rank == 0;
  for (int b : batches) {
    download_ms[b] = logits_download_ms(device, b, config.vocab_size);
    std::vector<LoraSetting> order = settings;
    if (repeat_none) order.push_back(settings.front());
    const size_t batch_first = rows.size();
    for (DecodePath path : paths) {
      DecodeOptions dopt = model->decode_options();
      dopt.path = path;
      dopt.moe_lora = parse_moe_lora_variant(o.moe_lora);
      dopt.side_stream_priority =
          o.side_priority == "high" ? StreamPriority::high : StreamPriority::normal;
      dopt.max_batch = std::max<int64_t>(dopt.max_batch, max_batch);
      model->set_decode_options(dopt);
      const size_t first = rows.size();
      for (size_t i = 0; i < order.size(); ++i) {
        const LoraSetting& ls = order[i];
        const StepTimes t = time_decode(*model, cache, b, ls.adapters, o.context, warmup, steps,
                                        o.seed + uint64_t(b));
        Row r;
        r.batch = b;
        r.path = decode_path_name(path);
        r.lora = ls.name;
        r.ms = t.median, r.min_ms = t.min, r.max_ms = t.max;
        r.tok_s = double(b) / (r.ms * 1e-3);
        r.repeat = i == settings.size();
        rows.push_back(r);
      }
      double none_ms = 0;
      int n_none = 0;
      for (size_t i = first; i < rows.size(); ++i)
        if (rows[i].lora == "none") none_ms += rows[i].ms, ++n_none;
      for (size_t i = first; i < rows.size(); ++i) {
        Row& r = rows[i];
        // Throughput with LoRA over without (as bench moe reports it): 1 = free.
        if (r.lora != "none" && n_none > 0) r.ratio = (none_ms / n_none) / r.ms;
        if (path == DecodePath::fast)
          for (size_t j = batch_first; j < first; ++j)
            if (rows[j].path == "hooks" && rows[j].lora == r.lora && rows[j].repeat == r.repeat)
              r.over_hooks = rows[j].ms / r.ms;
        std::printf(
            "  batch %4d  %-5s lora %-7s%s %9.3f ms/step (min %.3f max %.3f) %9.1f tok/s%s%s\n", b,
            r.path.c_str(), r.lora.c_str(), r.repeat ? " again" : "      ", r.ms, r.min_ms,
            r.max_ms, r.tok_s,
            std::isnan(r.ratio) ? "" : fmt::format("  {:.3f} of none", r.ratio).c_str(),
            std::isnan(r.over_hooks) ? "" : fmt::format("  {:.2f}x hooks", r.over_hooks).c_str());
      }
    }
    if (gpu)
      std::printf(
          "  batch %4d  logits download alone (f32 [%d, %d] to a new host tensor): "
          "%.3f ms\n",
          b, b, config.vocab_size, download_ms[b]);
    std::fflush(stdout);
  }

  if (!o.json.empty()) {
    json j;
    j["tool"] = "moelora bench decode";
    j["date"] = now_iso();
    j["device"] = info.name;
    j["shape"] = o.shape;
    j["config"] = cfg;
    j["experts_dtype"] = format_name(format);
    j["group_size"] = o.group_size;
    j["dense_dtype"] = "bf16";
    j["kv_dtype"] = "bf16";
    j["context"] = o.context;
    j["moe_lora_variant"] = o.moe_lora;
    j["side_priority"] = o.side_priority;
    j["lora_targets"] = o.lora_targets;
    j["steps"] = steps;
    j["warmup"] = warmup;
    j["lora_targets"] = config.model_type.rfind("deepseek", 0) == 0
                            ? "MLA q_proj, kv_a_proj_with_mqa, kv_b_proj (absorbed-path "
                              "correction), o_proj, every routed expert's gate/up/down"
                            : "attention q/k/v/o, dense MLP, every expert's gate/up/down";
    j["timing"] =
        "median host wall time of one Model::forward (host tables + uploads + GPU work + "
        "logits download), one new token per sequence";
    for (const Row& r : rows)
      j["results"].push_back(
          {{"batch", r.batch},
           {"path", r.path},
           {"lora", r.lora},
           {"repeat", r.repeat},
           {"ms_per_step", r.ms},
           {"min_ms", r.min_ms},
           {"max_ms", r.max_ms},
           {"tok_per_s", r.tok_s},
           {"tok_s_lora_over_none", std::isnan(r.ratio) ? json() : json(r.ratio)},
           {"tok_s_fast_over_hooks", std::isnan(r.over_hooks) ? json() : json(r.over_hooks)},
           {"logits_download_ms", download_ms[r.batch]}});
    std::ofstream out(o.json);
    MOELORA_CHECK(out.good(), "--json: cannot write {}", o.json);
    out << j.dump(2) << "\n";
    std::printf("wrote %s\n", o.json.c_str());
  }
  return 0;
}

}  // namespace moelora::tools
