#include "tools/convert.h"
#include "tools/progress.h"


#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "moelora/quant/convert.h"

namespace moelora::tools {

CLI::App* add_convert_command(CLI::App& app, ConvertCliOptions& o) {
  CLI::App* c = app.add_subcommand(
      "convert",
      "quantize a Hugging Face checkpoint's projection weights (round-to-nearest) "
      "into a real on-disk format");
  c->add_option("--in", o.in_dir, "input model directory (config.json + safetensors)")->required();
  c->add_option("--out", o.out_dir, "output directory (new or empty)")->required();
  c->add_option("--format", o.format,
                fmt::format("{}", fmt::join(quant::convert_format_names(), ", ")))
      ->required();
  c->add_option("--group-size", o.group_size,
                "group size along K: 32, 64, 128 (default), -1 per-channel; fp8-block: block "
                "size (default 128); nvfp4: 16");
  c->add_flag("--sym", o.sym, "symmetric integers (gptq, ct): no zero points");
  c->add_flag("--quiet", o.quiet, "no per-tensor progress");
  return c;
}

int run_convert(const ConvertCliOptions& o) {
  quant::ConvertOptions opts;
  opts.in_dir = o.in_dir;
  opts.out_dir = o.out_dir;
  opts.format = quant::parse_convert_format(o.format);
  opts.group_size = o.group_size;
  opts.sym = o.sym;
  const bool tty = stderr_is_tty();
  auto progress = [&](const quant::ConvertProgress& p) {
    if (o.quiet) return;
    draw_progress(p.index, p.total, p.quantized ? "quantized" : "copied", *p.name, tty);
  };
  const quant::ConvertReport r = quant::convert_checkpoint(opts, progress);
  std::fprintf(stderr,
               "%s: %zu weights quantized, %zu tensors copied unchanged; %.1f MB -> %.1f MB\n",
               quant::convert_format_name(opts.format), r.quantized.size(), r.skipped.size(),
               double(r.bytes_in) / 1e6, double(r.bytes_out) / 1e6);
  // Group the skipped tensors by reason so a large model's list stays readable.
  std::map<std::string, std::vector<std::string>> by_reason;
  for (const auto& [name, why] : r.skipped) by_reason[why].push_back(name);
  for (const auto& [why, names] : by_reason) {
    std::fprintf(stderr, "  skipped (%s): %zu", why.c_str(), names.size());
    for (size_t i = 0; i < names.size() && i < 4; ++i)
      std::fprintf(stderr, "%s%s", i ? ", " : ": ", names[i].c_str());
    if (names.size() > 4) std::fprintf(stderr, ", ...");
    std::fputc('\n', stderr);
  }
  if (!r.ignored_modules.empty())
    std::fprintf(stderr,
                 "  %zu linear modules kept in full precision (written to the ignore list)\n",
                 r.ignored_modules.size());
  std::fprintf(stderr, "wrote %s\n", o.out_dir.c_str());
  return 0;
}

}  // namespace moelora::tools
