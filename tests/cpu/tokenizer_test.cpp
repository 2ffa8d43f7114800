// Byte-level BPE: conformance with the Hugging Face `tokenizers` library on fixtures it wrote
// (scripts/golden/make_tokenizer_goldens.py), hand-checked merges, and bad input.
#include <fstream>
#include <functional>
#include <initializer_list>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "moelora/io/tokenizer.h"
#include "test_util.h"

namespace moelora {
namespace {

using nlohmann::json;

json read_json(const std::string& path) {
  std::ifstream f(path);
  EXPECT_TRUE(f.good()) << path;
  std::stringstream ss;
  ss << f.rdbuf();
  return json::parse(ss.str());
}

class TokenizerConformance : public ::testing::TestWithParam<std::string> {};

TEST_P(TokenizerConformance, MatchesTokenizersLibrary) {
  const std::string dir = test::fixture_path("tokenizer/" + GetParam());
  const Tokenizer tok = Tokenizer::load(dir + "/tokenizer.json");
  const json cases = read_json(dir + "/cases.json");
  ASSERT_GT(cases["cases"].size(), 10u);
  for (const json& c : cases["cases"]) {
    const std::string text = c["text"].get<std::string>();
    SCOPED_TRACE("text: '" + text + "'");
    const auto ids = c["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(tok.encode(text, true), ids);
    EXPECT_EQ(tok.encode(text, false), c["ids_no_special"].get<std::vector<int32_t>>());
    EXPECT_EQ(tok.decode(ids, false), c["decoded"].get<std::string>());
    EXPECT_EQ(tok.decode(ids, true), c["decoded_skip_special"].get<std::string>());
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, TokenizerConformance, ::testing::Values("qwen2", "gpt2"));

// A tiny hand-written tokenizer: every byte stand-in of "abc Ġ" plus merges whose order
// decides the result.
std::string tiny_json(const std::string& merges, const std::string& extra = "") {
  return R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "Ġ": 3, "ab": 4, "bc": 5,
             "abc": 6, "Ġa": 7}, "merges": )" +
         merges + R"(}, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false,
             "use_regex": true}, "decoder": {"type": "ByteLevel"})" +
         extra + "}";
}

TEST(Tokenizer, MergeRankDecides) {
  // "bc" ranks before "ab": abc -> a + bc (no "a bc" merge) -> [0, 5].
  const Tokenizer t1 = Tokenizer::parse(tiny_json(R"(["b c", "a b", "ab c"])"), "t1");
  EXPECT_EQ(t1.encode("abc"), (std::vector<int32_t>{0, 5}));
  // "ab" first, then "ab c" -> abc.
  const Tokenizer t2 = Tokenizer::parse(tiny_json(R"([["a", "b"], ["ab", "c"], ["b", "c"]])"), "t2");
  EXPECT_EQ(t2.encode("abc"), (std::vector<int32_t>{6}));
  // The space becomes its own byte stand-in Ġ and merges with the word that follows.
  const Tokenizer t3 = Tokenizer::parse(tiny_json(R"(["Ġ a", "a b"])"), "t3");
  EXPECT_EQ(t3.encode("ab a"), (std::vector<int32_t>{4, 7}));
  EXPECT_EQ(t3.decode({4, 7}), "ab a");
  EXPECT_EQ(t3.token_to_id("Ġa"), 7);
  EXPECT_EQ(t3.id_to_token(6), "abc");
  EXPECT_EQ(t3.vocab_size(), 8);
}

// The error names every needle (file, field, expected vs found).
void expect_error_all(const std::function<void()>& f, std::initializer_list<std::string> needles) {
  for (const std::string& n : needles) test::expect_error(f, n);
}

TEST(Tokenizer, BadInput) {
  expect_error_all([] { Tokenizer::parse("{", "bad.json"); }, {"bad.json", "not valid JSON"});
  expect_error_all([] { Tokenizer::parse(R"({"model": {"type": "Unigram"}})", "u.json"); },
                   {"u.json", "only BPE"});
  expect_error_all([] { Tokenizer::parse(tiny_json(R"(["a z"])"), "m.json"); },
                   {"m.json", "merge 0", "missing from the vocab"});
  expect_error_all(
      [] {
        Tokenizer::parse(tiny_json(R"([])", R"(, "normalizer": {"type": "Precompiled"})"), "n.json");
      },
      {"n.json", "unsupported normalizer 'Precompiled'"});
  expect_error_all(
      [] {
        Tokenizer::parse(R"({"model": {"type": "BPE", "byte_fallback": true, "vocab": {},
                         "merges": []}})",
                         "sp.json");
      },
      {"sp.json", "byte_fallback"});
  const Tokenizer t = Tokenizer::parse(tiny_json("[]"), "t");
  // A character with no vocabulary entry and no unk_token is an error, not a silent drop.
  test::expect_error([&] { t.encode("abz"); }, "'z' is not in the vocabulary");
  test::expect_error([&] { t.encode(std::string("a\xff", 2)); }, "not valid UTF-8");
  test::expect_error([&] { t.decode({0, 99}); }, "id 99 is outside the vocabulary");
  test::expect_error([] { Tokenizer::load("/nonexistent/tokenizer.json"); },
                     "/nonexistent/tokenizer.json");
}

}  // namespace
}  // namespace moelora
