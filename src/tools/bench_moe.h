// `moelora bench moe`: the MoE layer (routing and alignment included) timed per batch size and
// LoRA setting, against the byte roofline measured on the same device in the same run.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moelora::tools {

struct BenchMoeOptions {
  std::string shape = "qwen3-30b-a3b";
  std::string dtype = "bf16";            // bf16, int4, int8, fp8 (fp8_block), nvfp4
  int64_t group_size = 0;                // quantized formats: 0 = 128 (16 for nvfp4)
  std::string path = "hooks";  // LoRA: hooks (staged expands) | fast | overlap | direct | inline
  int inline_column_splits = 1;          // --path inline: MoeLoraHooksOptions::inline_column_splits
  int inline_k_splits = 0;               // --path inline: MoeLoraHooksOptions::inline_k_splits
  int direct_cluster = 0;                // --path direct: MoeLoraHooksOptions::direct_cluster_size
  std::string side_priority = "normal";  // MoeLoraHooksOptions::side_stream_priority
  std::vector<int> batches;              // empty: 1,4,16,64,128,256 on CUDA; 1,4,16 on the CPU
  std::vector<std::string> lora = {"none", "r16x1", "r16x4", "r64x1"};
  std::string device = "auto";  // auto | cpu | cuda
  std::string backend;          // empty: pick by capability
  // Batches without LoRA on the backend's one-kernel layer (cuda_bf16 small_batch_layer):
  // default = MoeRunnerConfig's small_batch_max_tokens, on = up to 4 tokens, off = never.
  std::string small_batch_kernel = "default";
  int layers = 0;    // layer calls per graph; 0: 8 on CUDA, 1 on the CPU
  int repeats = 0;   // timed replays; 0: 30 on CUDA, 2 on the CPU
  std::string json;  // write results here when set
  uint64_t seed = 1;
};

// Runs the benchmark, prints the table; returns a process exit code.
int run_bench_moe(const BenchMoeOptions& options);

}  // namespace moelora::tools
