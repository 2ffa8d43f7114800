// Micro-benchmark of the CUDA expert GEMMs (cuda::moe_gemm1 / moe_gemm2), graph-captured.
//
// Per model shape and batch: 8 different routings and token sets run back to back in one
// CUDA graph (so the touched experts change from call to call and the weights cannot sit in
// the 50 MB L2), replayed many times; the median per-call time is reported with the
// achieved weight bandwidth against the device-to-device copy bandwidth measured in the same
// run. Every tile (rows per CTA) is timed next to the heuristic's choice.
//
//   moe_gemm_bench [--profile] [--batch N] [shape ...]
//     default shapes: qwen3-30b-a3b deepseek-v2-lite mixtral-8x7b; default batches
//     1,4,16,64,128,256. --profile: one eager gemm1 + gemm2 per batch, no timing (for ncu).
#include <algorithm>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "core/cuda_check.h"
#include "kernels/cuda/moe_gemm_config.h"
#include "kernels/cuda/moe_heuristics.h"
#include "kernels/cuda/moe_ops.h"
#include "moelora/core/stream.h"
#include "moelora/core/tensor.h"
#include "moelora/moe/config.h"
#include "moelora/moe/types.h"

namespace moelora {
namespace {

constexpr int kRoutings = 8;

MoeAlignment make_plan(const std::vector<int32_t>& ids, int groups, int block_m) {
  const int64_t slots = int64_t(ids.size());
  const int64_t cap = MoeAlignment::capacity(slots, groups, block_m);
  std::vector<int32_t> sorted(cap, int32_t(slots)), block_group(cap / block_m, -1);
  std::vector<std::vector<int32_t>> members(groups);
  for (int64_t s = 0; s < slots; ++s)
    if (ids[s] >= 0) members[ids[s]].push_back(int32_t(s));
  int64_t pos = 0;
  for (int g = 0; g < groups; ++g) {
    const int64_t start = pos;
    for (int32_t s : members[g]) sorted[pos++] = s;
    pos = start + (pos - start + block_m - 1) / block_m * block_m;
    for (int64_t b = start / block_m; b < pos / block_m; ++b) block_group[b] = g;
  }
  auto upload = [](const std::vector<int32_t>& v) {
    Tensor t = Tensor::empty({int64_t(v.size())}, DType::i32);
    std::copy(v.begin(), v.end(), t.data<int32_t>());
    return t.to(Device::cuda());
  };
  MoeAlignment p;
  p.block_m = block_m;
  p.num_groups = groups;
  p.sorted_slots = upload(sorted);
  p.block_group = upload(block_group);
  p.num_padded = upload({int32_t(pos)});
  p.group_offsets = upload(std::vector<int32_t>(groups + 1, 0));  // unused by the GEMMs
  return p;
}

// Median microseconds per call of `body` (which issues `calls` GEMM calls) in a graph.
double time_graph(const Stream& stream, int calls, const std::function<void()>& body) {
  auto s = static_cast<cudaStream_t>(stream.handle());
  body();  // eager warm-up
  MOELORA_CUDA_CHECK(cudaStreamSynchronize(s));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  MOELORA_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  body();
  MOELORA_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  MOELORA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t start, stop;
  MOELORA_CUDA_CHECK(cudaEventCreate(&start));
  MOELORA_CUDA_CHECK(cudaEventCreate(&stop));
  MOELORA_CUDA_CHECK(cudaGraphLaunch(exec, s));
  std::vector<double> samples;
  constexpr int kReps = 10;
  for (int i = 0; i < 7; ++i) {
    MOELORA_CUDA_CHECK(cudaEventRecord(start, s));
    for (int r = 0; r < kReps; ++r) MOELORA_CUDA_CHECK(cudaGraphLaunch(exec, s));
    MOELORA_CUDA_CHECK(cudaEventRecord(stop, s));
    MOELORA_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    MOELORA_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    samples.push_back(ms * 1000.0 / (kReps * calls));
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

double copy_bandwidth_gbs(const Stream& stream) {
  const int64_t bytes = int64_t(1) << 30;
  Tensor src = Tensor::empty({bytes}, DType::u8, Device::cuda());
  Tensor dst = Tensor::empty({bytes}, DType::u8, Device::cuda());
  src.fill_bytes(1);
  auto s = static_cast<cudaStream_t>(stream.handle());
  const double us = time_graph(stream, 1, [&] {
    MOELORA_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), bytes, cudaMemcpyDeviceToDevice, s));
  });
  return 2.0 * double(bytes) / us / 1e3;  // read + write
}

void bench_shape(const MoeShape& shape, const std::vector<int>& batches, double copy_gbs,
                 int num_sms, bool profile, const Stream& stream) {
  const int64_t H = shape.hidden, I = shape.inter, E = shape.num_experts, k = shape.top_k;
  const int64_t max_m = *std::max_element(batches.begin(), batches.end());
  Tensor w13 = Tensor::empty({E, 2 * I, H}, DType::bf16, Device::cuda());
  Tensor w2 = Tensor::empty({E, H, I}, DType::bf16, Device::cuda());
  w13.fill_bytes(0x3C);  // bf16 0x3C3C ~ 0.0115: values do not change the timing
  w2.fill_bytes(0x3C);
  std::vector<Tensor> xs, as, sws;
  for (int r = 0; r < kRoutings; ++r) {
    xs.push_back(Tensor::empty({max_m, H}, DType::bf16, Device::cuda()));
    as.push_back(Tensor::empty({max_m * k, I}, DType::bf16, Device::cuda()));
    sws.push_back(Tensor::empty({max_m * k}, DType::f32, Device::cuda()));
    xs.back().fill_bytes(0x3C);
    as.back().fill_bytes(0x3C);
    sws.back().fill_bytes(0x3C);
  }
  Tensor h = Tensor::empty({max_m * k, 2 * I}, DType::f32, Device::cuda());
  Tensor o = Tensor::empty({max_m * k, H}, DType::f32, Device::cuda());
  std::mt19937_64 rng(1234);

  for (int m : batches) {
    const int block_m = cuda::moe_block_m(m, shape);
    std::vector<MoeAlignment> plans;
    std::vector<std::vector<int32_t>> routing_ids;
    double touched = 0;
    for (int r = 0; r < kRoutings; ++r) {
      std::vector<int32_t> ids(m * k), perm(E);
      for (int e = 0; e < E; ++e) perm[e] = e;
      std::vector<char> hit(E, 0);
      for (int t = 0; t < m; ++t) {
        std::shuffle(perm.begin(), perm.end(), rng);
        for (int j = 0; j < k; ++j) ids[t * k + j] = perm[j], hit[perm[j]] = 1;
      }
      touched += std::count(hit.begin(), hit.end(), 1) / double(kRoutings);
      plans.push_back(make_plan(ids, int(E), block_m));
      routing_ids.push_back(ids);
    }
    const int64_t slots = m * k;
    const double bytes1 = touched * 2 * I * H * 2, bytes2 = touched * H * I * 2;
    const int rows1 = cuda::moe_gemm_config(2 * I, H, block_m, slots, int(E), num_sms).rows;
    const int rows2 = cuda::moe_gemm_config(H, I, block_m, slots, int(E), num_sms).rows;
    auto gemm1 = [&](int r, int rows) {
      Tensor hv = h.first_rows(slots);
      cuda::moe_gemm1_tiled(xs[r].first_rows(m), int(k), plans[r], w13, hv, stream, {rows});
    };
    auto gemm2 = [&](int r, int rows) {
      Tensor ov = o.first_rows(slots);
      cuda::moe_gemm2_tiled(as[r].first_rows(slots), plans[r], w2, sws[r].first_rows(slots), ov,
                            stream, {rows});
    };
    if (profile) {
      gemm1(0, rows1);
      gemm2(0, rows2);
      stream.synchronize();
      std::printf("%s batch %d: profiled gemm1 rows %d, gemm2 rows %d, block_m %d\n",
                  shape.name.c_str(), m, rows1, rows2, block_m);
      continue;
    }
    for (int rows : {32, 64, 128}) {
      const double us1 = time_graph(stream, kRoutings, [&] {
        for (int r = 0; r < kRoutings; ++r) gemm1(r, rows);
      });
      const double us2 = time_graph(stream, kRoutings, [&] {
        for (int r = 0; r < kRoutings; ++r) gemm2(r, rows);
      });
      std::printf("%-17s batch %4d block_m %3d experts %6.1f rows %3d | gemm1 %8.2f us %6.0f GB/s %5.1f%% %s| gemm2 %8.2f us %6.0f GB/s %5.1f%% %s\n",
                  shape.name.c_str(), m, block_m, touched, rows, us1, bytes1 / us1 / 1e3,
                  100.0 * bytes1 / us1 / 1e3 / copy_gbs, rows == rows1 ? "*" : " ", us2,
                  bytes2 / us2 / 1e3, 100.0 * bytes2 / us2 / 1e3 / copy_gbs,
                  rows == rows2 ? "*" : " ");
    }
    // Neighbouring block sizes with the heuristic tiles (block_m trades re-reads of an
    // expert's weights by its extra blocks against MMA columns spent on padding).
    for (int bm : {block_m / 2, block_m * 2}) {
      if (bm < 8 || bm > kMaxBlockM) continue;
      std::vector<MoeAlignment> alt;
      for (int r = 0; r < kRoutings; ++r) {
        alt.push_back(make_plan(routing_ids[r], int(E), bm));
      }
      const int r1 = cuda::moe_gemm_config(2 * I, H, bm, slots, int(E), num_sms).rows;
      const int r2 = cuda::moe_gemm_config(H, I, bm, slots, int(E), num_sms).rows;
      const double us1 = time_graph(stream, kRoutings, [&] {
        for (int r = 0; r < kRoutings; ++r) {
          Tensor hv = h.first_rows(slots);
          cuda::moe_gemm1_tiled(xs[r].first_rows(m), int(k), alt[r], w13, hv, stream, {r1});
        }
      });
      const double us2 = time_graph(stream, kRoutings, [&] {
        for (int r = 0; r < kRoutings; ++r) {
          Tensor ov = o.first_rows(slots);
          cuda::moe_gemm2_tiled(as[r].first_rows(slots), alt[r], w2, sws[r].first_rows(slots),
                                ov, stream, {r2});
        }
      });
      std::printf("%-17s batch %4d block_m %3d (alt)        rows %3d/%3d | gemm1 %8.2f us %6.0f GB/s | gemm2 %8.2f us %6.0f GB/s\n",
                  shape.name.c_str(), m, bm, r1, r2, us1, bytes1 / us1 / 1e3, us2,
                  bytes2 / us2 / 1e3);
    }
    const double both = time_graph(stream, kRoutings, [&] {
      for (int r = 0; r < kRoutings; ++r) gemm1(r, rows1), gemm2(r, rows2);
    });
    std::printf("%-17s batch %4d SUMMARY gemm1+gemm2 (heuristic tiles %d/%d) %8.2f us  %6.0f GB/s  %5.1f%% of copy  (roofline %.2f us)\n",
                shape.name.c_str(), m, rows1, rows2, both, (bytes1 + bytes2) / both / 1e3,
                100.0 * (bytes1 + bytes2) / both / 1e3 / copy_gbs,
                (bytes1 + bytes2) / copy_gbs / 1e3);
    if (m <= 16) {
      // Small batches: what programmatic dependent launch buys between the GEMMs.
      auto pair = [&](bool pdl, bool plan_ready = false) {
        return time_graph(stream, kRoutings, [&] {
          for (int r = 0; r < kRoutings; ++r) {
            Tensor hv = h.first_rows(slots), ov = o.first_rows(slots);
            cuda::moe_gemm1_tiled(xs[r].first_rows(m), int(k), plans[r], w13, hv, stream,
                                  {rows1, pdl});
            cuda::moe_gemm2_tiled(as[r].first_rows(slots), plans[r], w2,
                                  sws[r].first_rows(slots), ov, stream,
                                  {rows2, pdl, plan_ready});
          }
        });
      };
      // As in the layer: gemm1 -> activation (another helper's kernel) -> gemm2.
      std::vector<Tensor> ids_dev;
      for (int r = 0; r < kRoutings; ++r) {
        Tensor t = Tensor::empty({int64_t(m), k}, DType::i32);
        std::copy(routing_ids[r].begin(), routing_ids[r].end(), t.data<int32_t>());
        ids_dev.push_back(t.to(Device::cuda()));
      }
      auto triple = [&](bool plan_ready) {
        return time_graph(stream, kRoutings, [&] {
          for (int r = 0; r < kRoutings; ++r) {
            Tensor hv = h.first_rows(slots), ov = o.first_rows(slots);
            Tensor av = as[r].first_rows(slots);
            cuda::moe_gemm1_tiled(xs[r].first_rows(m), int(k), plans[r], w13, hv, stream,
                                  {rows1, true});
            cuda::moe_activation(hv, ids_dev[r], av, stream);
            cuda::moe_gemm2_tiled(av, plans[r], w2, sws[r].first_rows(slots), ov, stream,
                                  {rows2, true, plan_ready});
          }
        });
      };
      const double t_wait = triple(false), t_early = triple(true);
      std::printf("%-17s batch %4d TRIPLE gemm1+activation+gemm2 PDL %8.2f us | + gemm2 plan_ready %8.2f us\n",
                  shape.name.c_str(), m, t_wait, t_early);
      const double off = pair(false), on = pair(true), early = pair(true, true);
      std::printf("%-17s batch %4d PAIR gemm1+gemm2 no-PDL %8.2f us | PDL %8.2f us | PDL + gemm2 plan_ready %8.2f us | floor at 3.0 TB/s %.2f us\n",
                  shape.name.c_str(), m, off, on, early, (bytes1 + bytes2) / 3.0e6);
    }
    std::fflush(stdout);
  }
}

}  // namespace
}  // namespace moelora

int main(int argc, char** argv) {
  using namespace moelora;
  try {
    std::vector<std::string> names;
    std::vector<int> batches;
    bool profile = false;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--profile") profile = true;
      else if (a == "--batch" && i + 1 < argc) batches.push_back(std::stoi(argv[++i]));
      else names.push_back(a);
    }
    if (batches.empty()) batches = {1, 4, 16, 64, 128, 256};
    if (names.empty()) names = {"qwen3-30b-a3b", "deepseek-v2-lite", "mixtral-8x7b"};
    Stream stream = Stream::create(Device::cuda());
    int device = 0, sms = 0;
    MOELORA_CUDA_CHECK(cudaGetDevice(&device));
    MOELORA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const double copy_gbs = profile ? 3000.0 : copy_bandwidth_gbs(stream);
    std::printf("device copy bandwidth (read+write): %.0f GB/s, %d SMs\n", copy_gbs, sms);
    for (const auto& n : names)
      bench_shape(MoeShape::by_name(n), batches, copy_gbs, sms, profile, stream);
  } catch (const Error& e) {
    std::fprintf(stderr, "moe_gemm_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
