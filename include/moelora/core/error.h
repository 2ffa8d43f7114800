// moelora::Error — the one exception type of the library, and the checking macros.
#pragma once

#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace moelora {

// An error with the source location that raised it. `what()` is "message (file:line)".
class Error : public std::runtime_error {
 public:
  Error(std::string message, const char* file, int line)
      : std::runtime_error(fmt::format("{} ({}:{})", message, file, line)),
        message_(std::move(message)) {}
  // The message without the location.
  const std::string& message() const noexcept { return message_; }

 private:
  std::string message_;
};

}  // namespace moelora

// Throws moelora::Error with a fmt-formatted message.
#define MOELORA_THROW(...) throw ::moelora::Error(::fmt::format(__VA_ARGS__), __FILE__, __LINE__)

// Throws when `cond` is false; the message should say what was expected and what was found.
#define MOELORA_CHECK(cond, ...)      \
  do {                                \
    if (!(cond)) MOELORA_THROW(__VA_ARGS__); \
  } while (0)
