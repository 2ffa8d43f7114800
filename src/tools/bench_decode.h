// `moelora bench decode`: decode steps of a whole model of a real shape with random weights
// (made on the device, no checkpoint on disk: model/weight_loader.h "random weights"), per
// batch size and LoRA setting (random PEFT adapters on every target: attention q/k/v/o, dense
// MLPs and the experts). Each sequence starts with `context` tokens of random K/V in the paged
// cache, then every timed step feeds one new token per sequence.
//
// A step is one Model::forward call timed on the host clock: the per-step host work (batch
// validation, page reservation, table building and upload), the GPU work and the logits'
// download are all part of decode cost, so all of it is counted.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace moelora::tools {

struct BenchDecodeOptions {
  std::string shape = "qwen3-30b-a3b";  // qwen3-30b-a3b, mixtral-8x7b, tiny (CI smoke)
  std::string dtype = "fp8";            // expert weights: bf16, int4, int8, fp8, nvfp4
  int64_t group_size = 0;               // 0: the format's default (128; nvfp4 16)
  std::vector<int> batches;             // empty: 1,4,16,64,128,256 on CUDA; 1,4,16 on the CPU
  std::vector<std::string> lora = {"none", "r16x1", "r16x4"};
  std::vector<std::string> path = {"hooks"};  // decode paths (DecodePath): hooks, fast
  std::string moe_lora = "best";              // DecodeOptions::moe_lora on the fast path
  std::string side_priority = "normal";       // DecodeOptions::side_stream_priority
  std::string lora_targets = "all";  // write_random_adapter targets: all, attention, experts
  int64_t context = 512;             // KV length of every sequence before the timed steps
  int steps = 0;                     // timed steps per point; 0: 20 on CUDA, 3 on the CPU
  int warmup = 0;                    // untimed steps first; 0: 3 on CUDA, 1 on the CPU
  std::string device = "auto";       // auto | cpu | cuda
  std::string backend;               // MoE backend by name; empty: the model's pick
  std::string json;                  // write results here when set
  uint64_t seed = 1;
};

CLI::App* add_bench_decode_command(CLI::App& bench, BenchDecodeOptions& o);
int run_bench_decode(const BenchDecodeOptions& o);

}  // namespace moelora::tools
