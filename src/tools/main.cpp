// moelora command-line tool.
#include <cstdio>

#include <CLI/CLI.hpp>

#include "moelora/core/error.h"
#include "moelora/moe/config.h"
#include "tools/bench_decode.h"
#include "tools/bench_moe.h"
#include "tools/convert.h"
#include "tools/generate.h"

int main(int argc, char** argv) {
  CLI::App app{"moelora: Mixture-of-Experts serving with many LoRA adapters"};
  app.require_subcommand(1);

  CLI::App* bench = app.add_subcommand("bench", "benchmarks");
  bench->require_subcommand(1);
  moelora::tools::BenchMoeOptions moe;
  CLI::App* bench_moe = bench->add_subcommand(
      "moe", "time one MoE layer (routing + alignment + experts + LoRA) per batch size");
  std::string shapes_help = "model shape:";
  for (const auto& n : moelora::MoeShape::known_names()) shapes_help += " " + n;
  bench_moe->add_option("--shape", moe.shape, shapes_help)->capture_default_str();
  bench_moe->add_option("--dtype", moe.dtype, "expert weight format: bf16, int4, int8, fp8, nvfp4")
      ->capture_default_str();
  bench_moe
      ->add_option("--path", moe.path,
                   "LoRA path: hooks (staged expand kernels), fast (expands folded into "
                   "the activation and the top-k reduction), overlap (both deltas on the "
                   "side stream beside the GEMMs, added in the activation and reduction), "
                   "direct (as overlap, each delta one kernel straight from the routing) or "
                   "inline (both deltas in extra CTAs of the expert GEMM grids; backends "
                   "that run it: cuda_fp8_block)")
      ->capture_default_str();
  bench_moe
      ->add_option("--inline-splits", moe.inline_column_splits,
                   "--path inline: CTAs per (plan block, half) along the output columns")
      ->capture_default_str();
  bench_moe
      ->add_option("--inline-k-splits", moe.inline_k_splits,
                   "--path inline: K slices of the shrink (0: by batch size)")
      ->capture_default_str();
  bench_moe
      ->add_option("--direct-cluster", moe.direct_cluster,
                   "--path direct: CTAs per (adapter, expert) pair: 1 (no cluster), 2, 4 or 8; 0 = by "
                   "batch size")
      ->check(CLI::IsMember({0, 1, 2, 4, 8}))
      ->capture_default_str();
  bench_moe
      ->add_option("--side-priority", moe.side_priority,
                   "priority of the LoRA side stream (staged / overlap paths): normal or high")
      ->check(CLI::IsMember({"normal", "high"}))
      ->capture_default_str();
  bench_moe->add_option("--group-size", moe.group_size,
                        "quantization group along K (0: 128; nvfp4 16; fp8 = square block)");
  bench_moe
      ->add_option("--batches", moe.batches, "batch sizes (default 1,4,16,64,128,256; CPU 1,4,16)")
      ->delimiter(',');
  bench_moe->add_option("--lora", moe.lora, "LoRA settings: none, r<rank>x<adapters>")
      ->delimiter(',')
      ->capture_default_str();
  bench_moe->add_option("--device", moe.device, "auto, cpu or cuda")->capture_default_str();
  bench_moe->add_option("--backend", moe.backend, "MoE backend by name (default: by capability)");
  bench_moe
      ->add_option("--small-batch-kernel", moe.small_batch_kernel,
                   "default (the runner's setting), on (batches up to 4 tokens without "
                   "LoRA run the backend's one-kernel layer) or off (the staged kernels)")
      ->capture_default_str();
  bench_moe->add_option("--layers", moe.layers,
                        "layer calls per graph (default 8 on CUDA, 1 on CPU)");
  bench_moe->add_option("--repeats", moe.repeats, "timed repeats (default 30 on CUDA, 2 on CPU)");
  bench_moe->add_option("--json", moe.json, "write results as JSON to this file");
  bench_moe->add_option("--seed", moe.seed, "random seed")->capture_default_str();

  moelora::tools::BenchDecodeOptions dec;
  CLI::App* bench_decode = moelora::tools::add_bench_decode_command(*bench, dec);

  moelora::tools::ConvertCliOptions conv;
  CLI::App* convert = moelora::tools::add_convert_command(app, conv);

  moelora::tools::GenerateOptions gen;
  CLI::App* generate = moelora::tools::add_generate_command(app, gen);

  try {
    app.parse(argc, argv);
    if (*bench_moe) return moelora::tools::run_bench_moe(moe);
    if (*bench_decode) return moelora::tools::run_bench_decode(dec);
    if (*convert) return moelora::tools::run_convert(conv);
    if (*generate) return moelora::tools::run_generate(gen);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const moelora::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
