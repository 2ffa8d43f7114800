// `moelora convert`: writes a quantized checkpoint (the library's quant::convert_checkpoint)
// with a progress line per tensor on stderr, or a one-line bar when stderr is a terminal.
#pragma once

#include <string>

#include <CLI/CLI.hpp>

namespace moelora::tools {

struct ConvertCliOptions {
  std::string in_dir, out_dir, format;
  int64_t group_size = 0;  // 0: the format's default
  bool sym = false;
  bool quiet = false;
};

// Adds the subcommand to `app`; `options` must outlive parsing.
CLI::App* add_convert_command(CLI::App& app, ConvertCliOptions& options);
// Runs it; returns a process exit code (errors are thrown as moelora::Error).
int run_convert(const ConvertCliOptions& options);

}  // namespace moelora::tools
