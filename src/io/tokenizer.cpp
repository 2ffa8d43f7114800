// Byte-level BPE (tokenizer.json) — see moelora/io/tokenizer.h for the supported pipeline.
// The text side (UTF-8, byte mapping, regex splits, normalizers) is in tokenizer_text.cpp.
#include "moelora/io/tokenizer.h"

#include <algorithm>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <sstream>
#include <unordered_map>

#include "io/tokenizer_text.h"
#include "moelora/core/error.h"

namespace moelora {

using namespace tokenizer_detail;  // NOLINT(google-build-using-namespace): this file's helpers


// ---- the tokenizer -------------------------------------------------------------------------

struct Tokenizer::Impl {
  struct Added {
    std::string content;
    int32_t id = 0;
    bool special = false, lstrip = false, rstrip = false, single_word = false;
  };
  std::unordered_map<std::string, int32_t> vocab;
  std::vector<std::string> id_token;   // id -> token string
  std::vector<bool> id_special;        // id -> special added token
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left, right) -> rank, id
  std::vector<Added> added;            // longest content first
  int32_t unk_id = -1;
  bool ignore_merges = false;
  Normalize normalizer;
  std::vector<Step> pre;
  bool byte_level = false;            // a ByteLevel pre-tokenizer maps bytes to stand-ins
  std::vector<std::pair<bool, int32_t>> template_single;  // (is sequence, special id)
  bool byte_level_decoder = false;
  std::string source;

  static uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

  void set_token(int32_t id, const std::string& tok, bool special) {
    MOELORA_CHECK(id >= 0, "{}: negative token id {} for '{}'", source, id, tok);
    if (size_t(id) >= id_token.size()) {
      id_token.resize(size_t(id) + 1);
      id_special.resize(size_t(id) + 1, false);
    }
    id_token[size_t(id)] = tok;
    id_special[size_t(id)] = special;
  }

  void parse_pre(const json& j, const std::string& where) {
    if (j.is_null()) return;
    const std::string type = str_field(j, "type", where);
    const std::string w = where + " (" + type + ")";
    if (type == "Sequence") {
      MOELORA_CHECK(j.contains("pretokenizers") && j["pretokenizers"].is_array(),
                    "{}: Sequence without a 'pretokenizers' array", w);
      for (const json& p : j["pretokenizers"]) parse_pre(p, w);
    } else if (type == "Split") {
      MOELORA_CHECK(j.contains("pattern") && j["pattern"].is_object(), "{}: missing 'pattern'", w);
      const json& pat = j["pattern"];
      std::string re;
      if (pat.contains("Regex"))
        re = pat["Regex"].get<std::string>();
      else if (pat.contains("String"))
        re = escape_regex(pat["String"].get<std::string>());
      else
        MOELORA_THROW("{}: pattern must be {{\"Regex\": ...}} or {{\"String\": ...}}", w);
      pre.push_back(make_split(re, w,
                               parse_behavior(str_field(j, "behavior", w), w),
                               bool_field(j, "invert", false)));
    } else if (type == "ByteLevel") {
      MOELORA_CHECK(!byte_level, "{}: two ByteLevel pre-tokenizers", w);
      byte_level = true;
      const bool prefix = bool_field(j, "add_prefix_space", false);
      if (prefix)
        pre.push_back([](Pieces& ps) {
          for (auto& p : ps)
            if (p.empty() || p[0] != ' ') p.insert(p.begin(), ' ');
        });
      if (bool_field(j, "use_regex", true))
        pre.push_back(make_split(kGpt2Pattern, w,
                                 SplitBehavior::isolated, false));
      pre.push_back([](Pieces& ps) {
        const ByteMap& m = byte_map();
        for (auto& p : ps) {
          std::string mapped;
          for (unsigned char c : p) mapped += m.to_char[c];
          p = std::move(mapped);
        }
      });
    } else if (type == "Digits") {
      const bool individual = bool_field(j, "individual_digits", false);
      pre.push_back(make_split(individual ? R"(\p{N})" : R"(\p{N}+)", w,
                               SplitBehavior::isolated, false));
    } else {
      MOELORA_THROW("{}: unsupported pre-tokenizer '{}' (supported: Sequence, Split, ByteLevel, "
                    "Digits)",
                    where, type);
    }
  }

  // BPE on one pre-tokenized piece.
  void bpe(const std::string& word, std::vector<int32_t>& out) const {
    if (ignore_merges) {
      if (auto it = vocab.find(word); it != vocab.end()) return out.push_back(it->second);
    }
    std::vector<int32_t> sym;
    for (const std::string& ch : utf8_chars(word)) {
      auto it = vocab.find(ch);
      if (it != vocab.end()) {
        sym.push_back(it->second);
      } else {
        MOELORA_CHECK(unk_id >= 0,
                      "{}: the character '{}' is not in the vocabulary and the model has no "
                      "unk_token",
                      source, ch);
        sym.push_back(unk_id);
      }
    }
    // Repeatedly merge the adjacent pair with the lowest rank (leftmost on ties).
    while (sym.size() > 1) {
      int32_t best_rank = std::numeric_limits<int32_t>::max(), best_id = -1;
      size_t best = 0;
      for (size_t i = 0; i + 1 < sym.size(); ++i) {
        auto it = merges.find(pair_key(sym[i], sym[i + 1]));
        if (it != merges.end() && it->second.first < best_rank) {
          best_rank = it->second.first;
          best_id = it->second.second;
          best = i;
        }
      }
      if (best_id < 0) break;
      sym[best] = best_id;
      sym.erase(sym.begin() + std::ptrdiff_t(best) + 1);
    }
    out.insert(out.end(), sym.begin(), sym.end());
  }

  void encode_plain(const std::string& text, std::vector<int32_t>& out) const {
    if (text.empty()) return;
    Pieces pieces{normalizer ? normalizer(text) : text};
    for (const Step& s : pre) s(pieces);
    for (const std::string& p : pieces) bpe(p, out);
  }
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  MOELORA_CHECK(f.good(), "tokenizer: cannot open {}", path);
  std::stringstream ss;
  ss << f.rdbuf();
  return parse(ss.str(), path);
}

Tokenizer Tokenizer::parse(std::string_view text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    MOELORA_THROW("{}: not valid JSON: {}", source, e.what());
  }
  auto impl = std::make_unique<Impl>();
  Impl& t = *impl;
  t.source = source;
  MOELORA_CHECK(j.is_object() && j.contains("model") && j["model"].is_object(),
                "{}: no 'model' object", source);
  const json& m = j["model"];
  const std::string mtype = m.value("type", std::string("BPE"));
  MOELORA_CHECK(mtype == "BPE", "{}: model.type is '{}', only BPE is supported", source, mtype);
  MOELORA_CHECK(!bool_field(m, "byte_fallback", false),
                "{}: model.byte_fallback is true (SentencePiece-style BPE), not supported", source);
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    MOELORA_CHECK(!m.contains(key) || m[key].is_null() || m[key] == "",
                  "{}: model.{} is set, not supported for byte-level BPE", source, key);
  MOELORA_CHECK(!m.contains("dropout") || m["dropout"].is_null(),
                "{}: model.dropout is set (BPE dropout is a training feature), not supported",
                source);
  t.ignore_merges = bool_field(m, "ignore_merges", false);
  MOELORA_CHECK(m.contains("vocab") && m["vocab"].is_object(), "{}: model.vocab missing", source);
  for (const auto& [tok, id] : m["vocab"].items()) {
    MOELORA_CHECK(id.is_number_integer(), "{}: model.vocab['{}'] is not an integer", source, tok);
    t.vocab[tok] = id.get<int32_t>();
    t.set_token(id.get<int32_t>(), tok, false);
  }
  MOELORA_CHECK(m.contains("merges") && m["merges"].is_array(), "{}: model.merges missing",
                source);
  int32_t rank = 0;
  for (const json& mg : m["merges"]) {
    std::string a, b;
    if (mg.is_string()) {  // "a b" (tokenizers < 0.20)
      const std::string s = mg.get<std::string>();
      const size_t sp = s.find(' ', 1);
      MOELORA_CHECK(sp != std::string::npos, "{}: merge {} '{}' is not 'left right'", source,
                    rank, s);
      a = s.substr(0, sp), b = s.substr(sp + 1);
    } else {  // ["a", "b"]
      MOELORA_CHECK(mg.is_array() && mg.size() == 2, "{}: merge {} is not a pair", source, rank);
      a = mg[0].get<std::string>(), b = mg[1].get<std::string>();
    }
    auto ia = t.vocab.find(a), ib = t.vocab.find(b), iab = t.vocab.find(a + b);
    MOELORA_CHECK(ia != t.vocab.end() && ib != t.vocab.end() && iab != t.vocab.end(),
                  "{}: merge {} ('{}' + '{}') has a part or result missing from the vocab", source,
                  rank, a, b);
    t.merges.emplace(Impl::pair_key(ia->second, ib->second), std::make_pair(rank, iab->second));
    ++rank;
  }
  if (m.contains("unk_token") && m["unk_token"].is_string()) {
    auto it = t.vocab.find(m["unk_token"].get<std::string>());
    MOELORA_CHECK(it != t.vocab.end(), "{}: model.unk_token '{}' is not in the vocab", source,
                  m["unk_token"].get<std::string>());
    t.unk_id = it->second;
  }
  if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
    for (const json& a : j["added_tokens"]) {
      Impl::Added ad;
      ad.content = str_field(a, "content", source + " added_tokens");
      MOELORA_CHECK(a.contains("id") && a["id"].is_number_integer(),
                    "{}: added token '{}' has no integer id", source, ad.content);
      ad.id = a["id"].get<int32_t>();
      ad.special = bool_field(a, "special", false);
      ad.lstrip = bool_field(a, "lstrip", false);
      ad.rstrip = bool_field(a, "rstrip", false);
      ad.single_word = bool_field(a, "single_word", false);
      MOELORA_CHECK(!ad.content.empty(), "{}: added token {} is empty", source, ad.id);
      t.set_token(ad.id, ad.content, ad.special);
      t.vocab[ad.content] = ad.id;
      t.added.push_back(std::move(ad));
    }
    std::stable_sort(t.added.begin(), t.added.end(), [](const auto& x, const auto& y) {
      return x.content.size() > y.content.size();
    });
  }
  t.normalizer = parse_normalizer(j.value("normalizer", json()), source + " normalizer");
  t.parse_pre(j.value("pre_tokenizer", json()), source + " pre_tokenizer");

  std::function<void(const json&, const std::string&)> parse_post = [&](const json& p,
                                                                        const std::string& w) {
    if (p.is_null()) return;
    const std::string type = str_field(p, "type", w);
    if (type == "ByteLevel") return;  // offsets only
    if (type == "Sequence") {
      for (const json& q : p.value("processors", json::array())) parse_post(q, w);
      return;
    }
    MOELORA_CHECK(type == "TemplateProcessing",
                  "{}: unsupported post-processor '{}' (supported: ByteLevel, "
                  "TemplateProcessing, Sequence)",
                  w, type);
    MOELORA_CHECK(t.template_single.empty(), "{}: two TemplateProcessing post-processors", w);
    const json& specials = p.value("special_tokens", json::object());
    for (const json& piece : p.value("single", json::array())) {
      if (piece.contains("Sequence")) {
        t.template_single.emplace_back(true, -1);
      } else {
        MOELORA_CHECK(piece.contains("SpecialToken"), "{}: template piece {} not understood", w,
                      piece.dump());
        const std::string name = str_field(piece["SpecialToken"], "id", w);
        MOELORA_CHECK(specials.contains(name) && specials[name].contains("ids"),
                      "{}: template special token '{}' not in special_tokens", w, name);
        for (const json& id : specials[name]["ids"]) t.template_single.emplace_back(false, id.get<int32_t>());
      }
    }
  };
  parse_post(j.value("post_processor", json()), source + " post_processor");

  const json& dec = j.value("decoder", json());
  if (!dec.is_null()) {
    const std::string type = str_field(dec, "type", source + " decoder");
    t.byte_level_decoder = type == "ByteLevel";
    MOELORA_CHECK(t.byte_level_decoder, "{} decoder: unsupported decoder '{}' (supported: ByteLevel)",
                  source, type);
  }
  return Tokenizer(std::move(impl));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  const Impl& t = *impl_;
  MOELORA_CHECK(valid_utf8(text), "tokenizer encode: the input is not valid UTF-8");
  std::vector<int32_t> ids;
  // Split at added tokens: at each position the longest one that matches wins.
  std::string plain;
  size_t i = 0;
  const std::string s(text);
  auto is_word_char = [&](size_t pos) {
    if (pos >= s.size()) return false;
    const unsigned char c = static_cast<unsigned char>(s[pos]);
    return std::isalnum(c) || c == '_' || c >= 0x80;
  };
  while (i < s.size()) {
    const Impl::Added* hit = nullptr;
    for (const auto& a : t.added) {
      if (s.compare(i, a.content.size(), a.content) != 0) continue;
      if (a.single_word &&
          ((i > 0 && is_word_char(i - 1)) || is_word_char(i + a.content.size())))
        continue;
      hit = &a;
      break;
    }
    if (!hit) {
      const size_t n = utf8_len(static_cast<unsigned char>(s[i]));
      plain.append(s, i, n);
      i += n;
      continue;
    }
    if (hit->lstrip)
      while (!plain.empty() && std::isspace(static_cast<unsigned char>(plain.back()))) plain.pop_back();
    t.encode_plain(plain, ids);
    plain.clear();
    ids.push_back(hit->id);
    i += hit->content.size();
    if (hit->rstrip)
      while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  }
  t.encode_plain(plain, ids);
  if (!add_special_tokens || t.template_single.empty()) return ids;
  std::vector<int32_t> out;
  for (auto [is_seq, id] : t.template_single) {
    if (is_seq)
      out.insert(out.end(), ids.begin(), ids.end());
    else
      out.push_back(id);
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  const Impl& t = *impl_;
  std::string joined;
  for (int32_t id : ids) {
    const std::string& tok = id_to_token(id);
    if (skip_special_tokens && t.id_special[size_t(id)]) continue;
    joined += tok;
  }
  return utf8_lossy(t.byte_level_decoder ? byte_level_to_bytes(joined) : joined);
}

int64_t Tokenizer::vocab_size() const { return int64_t(impl_->id_token.size()); }

int32_t Tokenizer::token_to_id(std::string_view token) const {
  auto it = impl_->vocab.find(std::string(token));
  return it == impl_->vocab.end() ? -1 : it->second;
}

const std::string& Tokenizer::id_to_token(int32_t id) const {
  MOELORA_CHECK(id >= 0 && size_t(id) < impl_->id_token.size(),
                "tokenizer: id {} is outside the vocabulary [0, {})", id, impl_->id_token.size());
  return impl_->id_token[size_t(id)];
}

}  // namespace moelora
