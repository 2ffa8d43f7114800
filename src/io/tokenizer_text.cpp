// The text side of the tokenizer (tokenizer_text.h): UTF-8, GPT-2's byte-level mapping,
// pre-tokenizer splits on PCRE2 regexes with Unicode properties, utf8proc normalizers.
#include "io/tokenizer_text.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <cstdlib>
#include <memory>

#include "moelora/core/error.h"

namespace moelora::tokenizer_detail {

// ---- UTF-8 ---------------------------------------------------------------------------------

// Length of the UTF-8 sequence starting with byte `b` (1 for invalid lead bytes).
int utf8_len(unsigned char b) {
  if (b < 0x80) return 1;
  if ((b >> 5) == 0x6) return 2;
  if ((b >> 4) == 0xE) return 3;
  if ((b >> 3) == 0x1E) return 4;
  return 1;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

// Splits valid UTF-8 into its characters (as strings).
std::vector<std::string> utf8_chars(std::string_view s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    const size_t n = std::min<size_t>(utf8_len(static_cast<unsigned char>(s[i])), s.size() - i);
    out.emplace_back(s.substr(i, n));
    i += n;
  }
  return out;
}

bool valid_utf8(std::string_view s) {
  utf8proc_int32_t cp;
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(s.data());
  for (size_t i = 0; i < s.size();) {
    const utf8proc_ssize_t n = utf8proc_iterate(p + i, utf8proc_ssize_t(s.size() - i), &cp);
    if (n <= 0) return false;
    i += size_t(n);
  }
  return true;
}

// Invalid sequences become U+FFFD, as Rust's String::from_utf8_lossy (what tokenizers returns).
std::string utf8_lossy(std::string_view s) {
  std::string out;
  utf8proc_int32_t cp;
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(s.data());
  for (size_t i = 0; i < s.size();) {
    const utf8proc_ssize_t n = utf8proc_iterate(p + i, utf8proc_ssize_t(s.size() - i), &cp);
    if (n <= 0) {
      append_utf8(out, 0xFFFD);
      ++i;
    } else {
      out.append(s.substr(i, size_t(n)));
      i += size_t(n);
    }
  }
  return out;
}

// ---- byte-level mapping (GPT-2's bytes_to_unicode) ---------------------------------------

ByteMap::ByteMap() {
  uint32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
    const uint32_t cp = printable ? uint32_t(b) : next++;
    append_utf8(to_char[size_t(b)], cp);
    back[cp] = uint8_t(b);
  }
}

const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

std::string byte_level_to_bytes(std::string_view text) {
  const ByteMap& m = byte_map();
  std::string bytes;
  utf8proc_int32_t cp;
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(text.data());
  for (size_t i = 0; i < text.size();) {
    const utf8proc_ssize_t n = utf8proc_iterate(p + i, utf8proc_ssize_t(text.size() - i), &cp);
    const size_t len = size_t(std::max<utf8proc_ssize_t>(n, 1));
    auto it = n > 0 ? m.back.find(uint32_t(cp)) : m.back.end();
    if (it != m.back.end())
      bytes += char(it->second);
    else
      bytes.append(text.substr(i, len));
    i += len;
  }
  return bytes;
}

namespace {

// ---- regex (PCRE2, UTF + Unicode properties) ---------------------------------------------

class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where) {
    int err = 0;
    PCRE2_SIZE off = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                          PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      MOELORA_THROW("{}: regex '{}' does not compile at offset {}: {}", where, pattern, off,
                    reinterpret_cast<const char*>(msg));
    }
  }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  ~Regex() { pcre2_code_free(code_); }

  // Non-overlapping matches [begin, end) left to right; an empty match advances one character.
  std::vector<std::pair<size_t, size_t>> find_all(std::string_view s) const {
    std::vector<std::pair<size_t, size_t>> out;
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    size_t pos = 0;
    while (pos <= s.size()) {
      const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos, 0,
                                 md, nullptr);
      if (rc < 0) break;
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      const size_t b = ov[0], e = ov[1];
      if (e > b) {
        out.emplace_back(b, e);
        pos = e;
      } else {
        if (b >= s.size()) break;
        pos = b + utf8_len(static_cast<unsigned char>(s[b]));
      }
    }
    pcre2_match_data_free(md);
    return out;
  }

 private:
  pcre2_code* code_ = nullptr;
};



}  // namespace

std::string escape_regex(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (std::string_view("\\^$.|?*+()[]{}").find(c) != std::string_view::npos) out += '\\';
    out += c;
  }
  return out;
}

// ---- pipeline steps ------------------------------------------------------------------------



Step make_split(const std::string& pattern, const std::string& where, SplitBehavior behavior,
                bool invert) {
  auto re = std::make_shared<Regex>(pattern, where);
  return [re, behavior, invert](Pieces& pieces) {
    Pieces out;
    for (const std::string& p : pieces) {
      std::vector<std::pair<std::string, bool>> segs;  // (text, is delimiter)
      size_t last = 0;
      for (auto [b, e] : re->find_all(p)) {
        if (b > last) segs.emplace_back(p.substr(last, b - last), invert);
        segs.emplace_back(p.substr(b, e - b), !invert);
        last = e;
      }
      if (last < p.size()) segs.emplace_back(p.substr(last), invert);
      std::vector<std::string> res;
      bool pending_next = false;  // merged_with_next: the last result awaits the next piece
      for (size_t i = 0; i < segs.size(); ++i) {
        auto& [text, delim] = segs[i];
        switch (behavior) {
          case SplitBehavior::removed:
            if (!delim) res.push_back(text);
            break;
          case SplitBehavior::isolated: res.push_back(text); break;
          case SplitBehavior::merged_with_previous:
            if (delim && !res.empty() && !segs[i - 1].second)
              res.back() += text;
            else
              res.push_back(text);
            break;
          case SplitBehavior::merged_with_next:
            if (pending_next)
              res.back() += text;
            else
              res.push_back(text);
            pending_next = delim;
            break;
          case SplitBehavior::contiguous:
            if (delim && i > 0 && segs[i - 1].second)
              res.back() += text;
            else
              res.push_back(text);
            break;
        }
      }
      for (auto& r : res)
        if (!r.empty()) out.push_back(std::move(r));
    }
    pieces = std::move(out);
  };
}

SplitBehavior parse_behavior(const std::string& b, const std::string& where) {
  if (b == "Removed") return SplitBehavior::removed;
  if (b == "Isolated") return SplitBehavior::isolated;
  if (b == "MergedWithPrevious") return SplitBehavior::merged_with_previous;
  if (b == "MergedWithNext") return SplitBehavior::merged_with_next;
  if (b == "Contiguous") return SplitBehavior::contiguous;
  MOELORA_THROW("{}: unknown split behavior '{}' (expected Removed, Isolated, "
                "MergedWithPrevious, MergedWithNext or Contiguous)",
                where, b);
}

std::string str_field(const json& j, const char* key, const std::string& where) {
  MOELORA_CHECK(j.contains(key) && j[key].is_string(), "{}: missing string field '{}'", where,
                key);
  return j[key].get<std::string>();
}

bool bool_field(const json& j, const char* key, bool dflt) {
  return j.contains(key) && j[key].is_boolean() ? j[key].get<bool>() : dflt;
}

// ---- normalizers ---------------------------------------------------------------------------


std::string utf8proc_apply(const std::string& s, utf8proc_option_t opts) {
  utf8proc_uint8_t* out = nullptr;
  const utf8proc_ssize_t n =
      utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()), utf8proc_ssize_t(s.size()),
                   &out, utf8proc_option_t(opts | UTF8PROC_STABLE));
  MOELORA_CHECK(n >= 0, "tokenizer normalizer: {}", utf8proc_errmsg(n));
  std::string r(reinterpret_cast<char*>(out), size_t(n));
  std::free(out);
  return r;
}

Normalize parse_normalizer(const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string type = str_field(j, "type", where);
  const std::string w = where + " (" + type + ")";
  if (type == "NFC") return [](const std::string& s) { return utf8proc_apply(s, UTF8PROC_COMPOSE); };
  if (type == "NFD")
    return [](const std::string& s) { return utf8proc_apply(s, UTF8PROC_DECOMPOSE); };
  if (type == "NFKC")
    return [](const std::string& s) {
      return utf8proc_apply(s, utf8proc_option_t(UTF8PROC_COMPOSE | UTF8PROC_COMPAT));
    };
  if (type == "NFKD")
    return [](const std::string& s) {
      return utf8proc_apply(s, utf8proc_option_t(UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT));
    };
  if (type == "Lowercase")
    return [](const std::string& s) {
      std::string out;
      utf8proc_int32_t cp;
      const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(s.data());
      for (size_t i = 0; i < s.size();) {
        const utf8proc_ssize_t n = utf8proc_iterate(p + i, utf8proc_ssize_t(s.size() - i), &cp);
        append_utf8(out, uint32_t(utf8proc_tolower(cp)));
        i += size_t(std::max<utf8proc_ssize_t>(n, 1));
      }
      return out;
    };
  if (type == "Sequence") {
    MOELORA_CHECK(j.contains("normalizers") && j["normalizers"].is_array(),
                  "{}: Sequence without a 'normalizers' array", w);
    std::vector<Normalize> steps;
    for (const json& n : j["normalizers"])
      if (auto f = parse_normalizer(n, w)) steps.push_back(std::move(f));
    return [steps](const std::string& s) {
      std::string r = s;
      for (const auto& f : steps) r = f(r);
      return r;
    };
  }
  MOELORA_THROW("{}: unsupported normalizer '{}' (supported: NFC, NFD, NFKC, NFKD, Lowercase, "
                "Sequence)",
                where, type);
}

}  // namespace moelora::tokenizer_detail
