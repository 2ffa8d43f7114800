#include "tools/bench_moe.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <memory>
#include <regex>

#include <nlohmann/json.hpp>

#include "moelora/core/graph.h"
#include "moelora/core/random.h"
#include "moelora/lora/moe_lora.h"
#include "moelora/moe/runner.h"
#include "moelora/quant/experts.h"

namespace moelora::tools {
namespace {

struct LoraSetting {
  std::string name;
  int rank = 0;      // 0 = no LoRA
  int adapters = 0;  // distinct adapters in the batch
};

LoraSetting parse_lora(const std::string& s) {
  if (s == "none") return {s, 0, 0};
  std::smatch m;
  static const std::regex re(R"(r(\d+)x(\d+))");
  MOELORA_CHECK(std::regex_match(s, m, re),
                "--lora: expected 'none' or r<rank>x<adapters> (e.g. r16x4), found '{}'", s);
  LoraSetting l{s, std::stoi(m[1]), std::stoi(m[2])};
  MOELORA_CHECK(l.rank >= 1 && l.rank <= 256 && l.adapters >= 1 && l.adapters <= 64,
                "--lora {}: rank must be 1..256 and adapters 1..64", s);
  return l;
}

// Expected distinct experts touched by `tokens` tokens choosing k of E uniformly.
double distinct_experts(double E, double k, double tokens) {
  return E * (1.0 - std::pow(1.0 - k / E, tokens));
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

std::string now_iso() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

// Device copy bandwidth in bytes/s, counting bytes read plus bytes written.
double measure_copy_bandwidth(Device d, const Stream& stream) {
  const int64_t bytes = d.is_cuda() ? (int64_t(1) << 30) : (int64_t(1) << 28);
  Tensor a = Tensor::empty({bytes}, DType::u8, d), b = Tensor::empty({bytes}, DType::u8, d);
  a.fill_bytes(1, &stream);
  const int iters = d.is_cuda() ? 20 : 3;
  if (d.is_cuda()) {
    Event start = Event::create(d), stop = Event::create(d);
    b.copy_from(a, &stream);  // warm-up
    start.record(stream);
    for (int i = 0; i < iters; ++i) b.copy_from(a, &stream);
    stop.record(stream);
    stop.synchronize();
    return 2.0 * double(bytes) * iters / (Event::elapsed_ms(start, stop) * 1e-3);
  }
  b.copy_from(a);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) b.copy_from(a);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return 2.0 * double(bytes) * iters / s;
}

// One layer's weights, inputs and LoRA state.
struct Layer {
  MoeWeights weights;
  std::unique_ptr<MoeLoraPool> pool;
  std::unique_ptr<MoeLoraHooks> hooks;
  MoeInputs in;
  Tensor y, token_slot;
};

// Bytes a kernel streams for one matrix of the stack: codes, scales, zeros (what the roofline
// counts for each touched expert).
double bytes_per_matrix(const ExpertMatrices& m) {
  double b = 0;
  for (const Tensor* t : {&m.w, &m.scales, &m.zeros, &m.global_scale})
    if (t->defined()) b += double(t->nbytes());
  return b / double(m.groups);
}

MoeWeights random_weights(const MoeShape& s, WeightFormat format, int64_t group_size, Device d,
                          uint64_t seed, const Stream& st) {
  MoeWeights w;
  const int64_t E = s.num_experts, H = s.hidden, I = s.inter;
  if (format != WeightFormat::bf16) {
    // Random codes and scales straight in the kernels' layout (a quantizer would take minutes
    // on the host for 8 layers of a real shape); weights of magnitude ~ sqrt(3 / fan_in).
    w.format = format;
    auto make = [&](int64_t g, int64_t n, int64_t k, uint64_t sd) {
      return quant::random_experts(format, g, n, k, group_size, std::sqrt(3.0f / float(k)), sd, d,
                                   st);
    };
    w.w13 = make(E, 2 * I, H, seed);
    w.w2 = make(E, H, I, seed + 1);
    if (s.shared_inter > 0) {
      w.shared_w13 = make(1, 2 * int64_t(s.shared_inter), H, seed + 2);
      w.shared_w2 = make(1, H, s.shared_inter, seed + 3);
    }
    if (s.default_router().use_correction_bias) {
      w.correction_bias = Tensor::empty({E}, DType::f32, d);
      fill_uniform(w.correction_bias, seed + 4, -0.1f, 0.1f, st);
    }
    return w;
  }
  // Scales keep activations O(1): weights ~ U(-a, a) with a = sqrt(3 / fan_in).
  w.w13 = Tensor::empty({E, 2 * I, H}, DType::bf16, d);
  fill_uniform(w.w13.w, seed, -std::sqrt(3.0f / H), std::sqrt(3.0f / H), st);
  w.w2 = Tensor::empty({E, H, I}, DType::bf16, d);
  fill_uniform(w.w2.w, seed + 1, -std::sqrt(3.0f / I), std::sqrt(3.0f / I), st);
  if (s.shared_inter > 0) {
    const int64_t Is = s.shared_inter;
    w.shared_w13 = Tensor::empty({1, 2 * Is, H}, DType::bf16, d);
    fill_uniform(w.shared_w13.w, seed + 2, -std::sqrt(3.0f / H), std::sqrt(3.0f / H), st);
    w.shared_w2 = Tensor::empty({1, H, Is}, DType::bf16, d);
    fill_uniform(w.shared_w2.w, seed + 3, -std::sqrt(3.0f / Is), std::sqrt(3.0f / Is), st);
  }
  if (s.default_router().use_correction_bias) {
    w.correction_bias = Tensor::empty({E}, DType::f32, d);
    fill_uniform(w.correction_bias, seed + 4, -0.1f, 0.1f, st);
  }
  return w;
}

// A random adapter with separate gate, up and down LoRAs of rank r (host tensors).
MoeLoraWeights random_adapter(const MoeShape& s, int r, uint64_t seed) {
  const int64_t E = s.num_experts, H = s.hidden, I = s.inter;
  const Stream cpu;
  auto make = [&](Shape shape, uint64_t sd) {
    Tensor t = Tensor::empty(std::move(shape), DType::bf16);
    fill_uniform(t, sd, -0.05f, 0.05f, cpu);
    return t;
  };
  MoeLoraWeights w;
  w.gate_a = make({E, r, H}, seed), w.gate_b = make({E, I, r}, seed + 1);
  w.up_a = make({E, r, H}, seed + 2), w.up_b = make({E, I, r}, seed + 3);
  w.down_a = make({E, r, I}, seed + 4), w.down_b = make({E, H, r}, seed + 5);
  w.gate_scale = w.up_scale = w.down_scale = lora_scaling(32.0f, r, false);
  return w;
}

struct Row {
  int batch;
  std::string lora;
  double us, roofline_us, bytes, ratio;
};

}  // namespace

int run_bench_moe(const BenchMoeOptions& opt) {
  const WeightFormat format = parse_weight_format(opt.dtype);
  MOELORA_CHECK(opt.path == "hooks" || opt.path == "fast" || opt.path == "overlap" ||
                    opt.path == "direct" || opt.path == "inline",
                "--path: expected hooks, fast, overlap, direct or inline, found '{}'", opt.path);
  int64_t group_size = opt.group_size;
  if (group_size == 0) group_size = format == WeightFormat::nvfp4 ? 16 : 128;
  Device device = Device::cpu();
  if (opt.device == "cuda" || (opt.device == "auto" && cuda_available())) {
    MOELORA_CHECK(cuda_available(), "--device cuda: no usable CUDA device");
    device = Device::cuda();
  } else {
    MOELORA_CHECK(opt.device == "auto" || opt.device == "cpu",
                  "--device: expected auto, cpu or cuda, found '{}'", opt.device);
  }
  const bool gpu = device.is_cuda();
  std::vector<int> batches = opt.batches;
  if (batches.empty())
    batches = gpu ? std::vector<int>{1, 4, 16, 64, 128, 256} : std::vector<int>{1, 4, 16};
  for (int b : batches) MOELORA_CHECK(b >= 1, "--batches: sizes must be >= 1, found {}", b);
  const int layers = opt.layers > 0 ? opt.layers : (gpu ? 8 : 1);
  const int repeats = opt.repeats > 0 ? opt.repeats : (gpu ? 30 : 2);
  std::vector<LoraSetting> settings;
  for (const auto& l : opt.lora) settings.push_back(parse_lora(l));

  const MoeShape shape = MoeShape::by_name(opt.shape);
  const RouterConfig router = shape.default_router();
  const int64_t H = shape.hidden, I = shape.inter, E = shape.num_experts, k = shape.top_k;
  Stream stream = gpu ? Stream::create(device) : Stream();
  const DeviceInfo info = device_info(device);
  const double bw = measure_copy_bandwidth(device, stream);
  const int max_batch = *std::max_element(batches.begin(), batches.end());

  std::printf(
      "moelora bench moe: %s, %s weights, LoRA path %s, small-batch kernel %s, device "
      "%s, copy bandwidth %.0f GB/s, %d layer calls per %s, %d repeats\n",
      shape.name.c_str(), opt.dtype.c_str(), opt.path.c_str(), opt.small_batch_kernel.c_str(),
      info.name.c_str(), bw / 1e9, layers, gpu ? "CUDA graph" : "timing", repeats);
  std::fflush(stdout);

  MOELORA_CHECK(opt.small_batch_kernel == "default" || opt.small_batch_kernel == "on" ||
                    opt.small_batch_kernel == "off",
                "--small-batch-kernel: expected default, on or off, found '{}'",
                opt.small_batch_kernel);
  MoeRunnerConfig rc{shape, router, device, max_batch, format, opt.backend};
  if (opt.small_batch_kernel == "on") rc.small_batch_max_tokens = 4;
  if (opt.small_batch_kernel == "off") rc.small_batch_max_tokens = 0;
  MoeRunner runner(rc);
  std::vector<Layer> ls(static_cast<size_t>(layers));
  for (int l = 0; l < layers; ++l)
    ls[size_t(l)].weights = random_weights(shape, format, group_size, device,
                                           opt.seed * 1000 + uint64_t(l) * 10, stream);
  // Roofline bytes per touched expert (gate_up + down) and for the shared expert.
  const double expert_bytes =
      bytes_per_matrix(ls[0].weights.w13) + bytes_per_matrix(ls[0].weights.w2);
  const double shared_bytes = shape.shared_inter > 0 ? bytes_per_matrix(ls[0].weights.shared_w13) +
                                                           bytes_per_matrix(ls[0].weights.shared_w2)
                                                     : 0.0;

  std::vector<Row> rows;
  std::map<int, double> base_us;
  for (const LoraSetting& lora : settings) {
    for (int l = 0; l < layers; ++l) {
      Layer& L = ls[size_t(l)];
      L.hooks.reset();
      L.pool.reset();
      if (lora.rank == 0) continue;
      L.pool = std::make_unique<MoeLoraPool>(shape, lora.adapters, lora.rank, device);
      for (int a = 0; a < lora.adapters; ++a)
        L.pool->load(a,
                     random_adapter(shape, lora.rank, opt.seed * 7919 + uint64_t(l * 64 + a) * 8));
      MoeLoraHooksOptions hook_options;
      hook_options.side_stream_priority =
          opt.side_priority == "high" ? StreamPriority::high : StreamPriority::normal;
      // --path fast: LoRA expands folded into the activation / reduction at every batch here.
      if (opt.path == "fast") hook_options.fused_max_tokens = max_batch;
      // --path overlap: both deltas on the side stream, added in the activation / reduction.
      if (opt.path == "overlap") hook_options.overlap_max_tokens = max_batch;
      // --path direct: as overlap, each delta one kernel straight from the routing.
      if (opt.path == "direct") {
        hook_options.direct_max_tokens = max_batch;
        hook_options.direct_cluster_size = opt.direct_cluster;
      }
      // --path inline: both deltas in extra CTAs of the expert GEMM grids (backends that run
      // them; the others take the staged hooks).
      if (opt.path == "inline") {
        hook_options.inline_max_tokens = max_batch;
        hook_options.inline_column_splits = opt.inline_column_splits;
        hook_options.inline_k_splits = opt.inline_k_splits;
      }
      L.hooks = MoeLoraHooks::create(*L.pool, max_batch, hook_options);
    }
    for (int B : batches) {
      for (int l = 0; l < layers; ++l) {
        Layer& L = ls[size_t(l)];
        const uint64_t seed = opt.seed * 31 + uint64_t(B) * 1009 + uint64_t(l);
        L.in.x = Tensor::empty({B, H}, DType::bf16, device);
        fill_uniform(L.in.x, seed, -1.0f, 1.0f, stream);
        L.in.router_logits = Tensor::empty({B, E}, DType::f32, device);
        fill_uniform(L.in.router_logits, seed + 7, -4.0f, 4.0f, stream);
        if (shape.shared_gate) {
          L.in.shared_gate_logits = Tensor::empty({B}, DType::f32, device);
          fill_uniform(L.in.shared_gate_logits, seed + 9, -2.0f, 2.0f, stream);
        }
        L.y = Tensor::empty({B, H}, DType::bf16, device);
        if (L.hooks) {
          std::vector<int32_t> slots(static_cast<size_t>(B));
          for (int t = 0; t < B; ++t) slots[size_t(t)] = t % lora.adapters;
          L.token_slot = Tensor::wrap(slots.data(), {B}, DType::i32).to(device);
          L.hooks->bind(LoraBatch{L.token_slot});
        }
      }
      auto body = [&] {
        for (Layer& L : ls) runner.run(L.in, L.weights, L.hooks.get(), L.y, stream);
      };
      std::vector<double> ms;
      if (gpu) {
        body();  // eager warm-up (and error check) before capture
        stream.synchronize();
        CudaGraph graph = CudaGraph::capture(stream, body);
        for (int i = 0; i < 3; ++i) graph.replay(stream);
        Event start = Event::create(device), stop = Event::create(device);
        for (int r = 0; r < repeats; ++r) {
          start.record(stream);
          graph.replay(stream);
          stop.record(stream);
          stop.synchronize();
          ms.push_back(Event::elapsed_ms(start, stop));
        }
      } else {
        body();
        for (int r = 0; r < repeats; ++r) {
          const auto t0 = std::chrono::steady_clock::now();
          body();
          ms.push_back(
              std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                  .count());
        }
      }
      const double us = median(ms) * 1e3 / layers;
      double bytes = distinct_experts(double(E), double(k), B) * expert_bytes + shared_bytes;
      bytes += double(B) * double(H) * 2.0 * 2.0;  // x in, y out
      if (lora.rank > 0) {
        const double per_adapter_tokens = std::ceil(double(B) / lora.adapters);
        const double adapters_used = std::min<double>(lora.adapters, B);
        bytes += adapters_used * distinct_experts(double(E), double(k), per_adapter_tokens) *
                 lora.rank * double(2 * H + 2 * I + I + H) * 2.0;
      }
      if (lora.rank == 0) base_us[B] = us;
      const double ratio = base_us.count(B) ? base_us[B] / us : std::nan("");
      rows.push_back({B, lora.name, us, bytes / bw * 1e6, bytes, ratio});
      std::printf("  batch %4d  lora %-6s  %10.1f us/layer\n", B, lora.name.c_str(), us);
      std::fflush(stdout);
    }
  }

  std::printf("\n%-14s %6s %-7s %11s %9s %11s %8s %9s\n", "shape", "batch", "lora", "us/layer",
              "GB/s", "roofline_us", "%roof", "lora/base");
  for (const Row& r : rows) {
    std::printf("%-14s %6d %-7s %11.1f %9.0f %11.1f %7.1f%% %9s\n", shape.name.c_str(), r.batch,
                r.lora.c_str(), r.us, r.bytes / (r.us * 1e-6) / 1e9, r.roofline_us,
                100.0 * r.roofline_us / r.us,
                std::isnan(r.ratio) ? "-" : fmt::format("{:.3f}", r.ratio).c_str());
  }
  if (!opt.json.empty()) {
    nlohmann::json j;
    j["tool"] = "moelora bench moe";
    j["date"] = now_iso();
    j["device"] = info.name;
    j["copy_bandwidth_GBps"] = bw / 1e9;
    j["shape"] = shape.name;
    j["dtype"] = format_name(format);
    j["lora_path"] = opt.path;
    if (opt.path == "direct") j["direct_cluster"] = opt.direct_cluster;
    if (opt.path == "inline") {
      j["inline_column_splits"] = opt.inline_column_splits;
      j["inline_k_splits"] = opt.inline_k_splits;
    }
    j["side_priority"] = opt.side_priority;
    if (format != WeightFormat::bf16) j["group_size"] = group_size;
    j["bytes_per_expert"] = expert_bytes;
    j["backend"] = std::string(runner.backend().name());
    j["small_batch_max_tokens"] = rc.small_batch_max_tokens;
    j["layers_per_graph"] = layers;
    j["repeats"] = repeats;
    j["timing"] =
        gpu ? "CUDA graph of layer calls (routing+alignment included), median replay / layers"
            : "host clock, median / layers";
    for (const Row& r : rows) {
      j["results"].push_back(
          {{"batch", r.batch},
           {"lora", r.lora},
           {"us_per_layer", r.us},
           {"bytes", r.bytes},
           {"GBps", r.bytes / (r.us * 1e-6) / 1e9},
           {"roofline_us", r.roofline_us},
           {"pct_roofline", 100.0 * r.roofline_us / r.us},
           {"lora_over_base", std::isnan(r.ratio) ? nlohmann::json() : nlohmann::json(r.ratio)}});
    }
    std::ofstream out(opt.json);
    MOELORA_CHECK(out.good(), "--json: cannot write {}", opt.json);
    out << j.dump(2) << "\n";
    std::printf("wrote %s\n", opt.json.c_str());
  }
  return 0;
}

}  // namespace moelora::tools
