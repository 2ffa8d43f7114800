// A progress line for the command-line tools: a bar redrawn in place when stderr is a
// terminal, one line per step otherwise (logs stay readable).
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>

namespace moelora::tools {

inline bool stderr_is_tty() { return ::isatty(fileno(stderr)) != 0; }

// Step `index` (1-based) of `total`: "<what> <name>".
inline void draw_progress(int64_t index, int64_t total, const char* what, const std::string& name,
                          bool tty) {
  if (tty) {
    constexpr int kWidth = 30;
    const int filled = int(kWidth * index / std::max<int64_t>(total, 1));
    std::fprintf(stderr, "\r[%-*s] %lld/%lld %s %.60s\033[K", kWidth,
                 std::string(size_t(filled), '#').c_str(), (long long)index, (long long)total,
                 what, name.c_str());
    if (index == total) std::fputc('\n', stderr);
  } else {
    std::fprintf(stderr, "[%lld/%lld] %s %s\n", (long long)index, (long long)total, what,
                 name.c_str());
  }
}

}  // namespace moelora::tools
