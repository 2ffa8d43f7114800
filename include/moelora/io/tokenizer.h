// Byte-level BPE tokenizers as Hugging Face `tokenizers` writes them (tokenizer.json): the
// GPT-2 / Qwen2 / Qwen3 / DeepSeek-V3 family. Encoding and decoding follow the library's
// pipeline:
//   added tokens (matched literally in the raw text, longest first; lstrip / rstrip absorb
//   neighbouring whitespace) split the text; each remaining piece goes through
//   normalizer (NFC / NFD / NFKC / NFKD, Lowercase, Sequence) ->
//   pre-tokenizer (Split by regex or string with its behaviour, ByteLevel with or without
//   the GPT-2 regex, Digits, Sequence) ->
//   BPE model (merge ranks, ignore_merges, unk_token) ->
//   post-processor (ByteLevel: nothing; TemplateProcessing: the "single" template).
// Decoding maps ids back to token strings and undoes the byte-level mapping (ByteLevel
// decoder). Regexes run on PCRE2 with Unicode properties (tokenizers uses Oniguruma; the
// patterns these models ship use only what both agree on). Anything outside this subset —
// a WordPiece/Unigram model, a Metaspace pre-tokenizer, byte_fallback, continuing-subword
// prefixes — is refused at load time naming the field, never half-applied.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace moelora {

class Tokenizer {
 public:
  // Reads `path` (a tokenizer.json). Throws moelora::Error naming the file and field.
  static Tokenizer load(const std::string& path);
  // Parses tokenizer.json text; `source` names it in errors.
  static Tokenizer parse(std::string_view json_text, const std::string& source);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // `add_special_tokens` applies the post-processor's template (e.g. a BOS token).
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = true) const;
  // Special added tokens are dropped when `skip_special_tokens`. Invalid UTF-8 produced by a
  // partial byte sequence is kept as bytes (callers streaming tokens may join later).
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const;

  int64_t vocab_size() const;  // largest id + 1, added tokens included
  // The id of a token string (vocab or added token), or -1.
  int32_t token_to_id(std::string_view token) const;
  // The token string of an id (byte-level form for vocab tokens); throws for an unknown id.
  const std::string& id_to_token(int32_t id) const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moelora
