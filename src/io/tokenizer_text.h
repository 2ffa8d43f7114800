// The text side of the byte-level BPE tokenizer (internal to src/io/tokenizer.cpp): UTF-8
// helpers, GPT-2's byte-to-printable mapping, the pre-tokenizer steps and the normalizers
// named in tokenizer.json.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

namespace moelora::tokenizer_detail {

using json = nlohmann::json;

// Length of the UTF-8 sequence starting with byte `b` (1 for invalid lead bytes).
int utf8_len(unsigned char b);
void append_utf8(std::string& out, uint32_t cp);
// Splits valid UTF-8 into its characters (as strings).
std::vector<std::string> utf8_chars(std::string_view s);
bool valid_utf8(std::string_view s);
// Invalid sequences become U+FFFD, as Rust's String::from_utf8_lossy (what tokenizers returns).
std::string utf8_lossy(std::string_view s);

// GPT-2's bytes_to_unicode: each byte's printable stand-in and back.
struct ByteMap {
  std::array<std::string, 256> to_char;        // byte -> UTF-8 of its printable stand-in
  std::unordered_map<uint32_t, uint8_t> back;  // stand-in code point -> byte
  ByteMap();
};
const ByteMap& byte_map();
// The ByteLevel decoder: each stand-in character back to its byte; other characters kept.
std::string byte_level_to_bytes(std::string_view text);

// GPT-2's pre-tokenization pattern (ByteLevel with use_regex).
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

using Pieces = std::vector<std::string>;
using Step = std::function<void(Pieces&)>;

enum class SplitBehavior { removed, isolated, merged_with_previous, merged_with_next, contiguous };

// A step splitting each piece at the matches of `pattern` (a PCRE2 regex, UTF + Unicode
// properties; inverted: the non-matches are the delimiters). `where` names it in errors.
Step make_split(const std::string& pattern, const std::string& where, SplitBehavior behavior,
                bool invert);
std::string escape_regex(const std::string& s);
SplitBehavior parse_behavior(const std::string& b, const std::string& where);

std::string str_field(const json& j, const char* key, const std::string& where);
bool bool_field(const json& j, const char* key, bool dflt);

using Normalize = std::function<std::string(const std::string&)>;
// nullptr for a null normalizer; throws for an unsupported one.
Normalize parse_normalizer(const json& j, const std::string& where);

}  // namespace moelora::tokenizer_detail
