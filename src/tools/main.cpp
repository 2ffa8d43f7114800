// moelora command-line tool.
#include <cstdio>

#include <CLI/CLI.hpp>

#include "moelora/core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"moelora: MoE serving with many LoRA adapters"};
  app.require_subcommand(1);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const moelora::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
