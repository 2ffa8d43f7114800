// `moelora generate`: load a model directory and PEFT adapters, run a batch of requests (each
// naming its adapter or none) through the engine, print the outputs with timing.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace moelora::tools {

struct GenerateOptions {
  std::string model;                  // model directory; empty: the committed fixture model
  std::vector<std::string> adapters;  // name=path
  std::vector<std::string> prompts;   // text requests (need tokenizer.json)
  std::vector<std::string> ids;       // "1,2,3" token-id requests
  std::vector<std::string> use;       // adapters each command-line request runs with
  std::string requests;               // JSONL file
  int max_new_tokens = 16;
  float temperature = 0.0f;
  float top_p = 1.0f;
  int top_k = 0;
  uint64_t seed = 0;
  std::vector<int32_t> stop_ids;
  bool ignore_eos = false;
  std::string logits_out;  // JSONL of each step's top-k logprobs (or full logits)
  int logits_top_k = 10;   // 0: full logits
  int max_lora_rank = 64;
  int64_t kv_pages = 1024;
  int page_size = 16;
  std::string kv_dtype = "bf16";
  std::string device =
      "auto";               // auto (cuda when a GPU is present and the model runs there), cpu, cuda
  std::string moe_backend;  // "" = the model's pick for the device
  std::string path = "hooks";  // decode path (DecodePath): hooks or fast
};

CLI::App* add_generate_command(CLI::App& app, GenerateOptions& o);
int run_generate(const GenerateOptions& o);

}  // namespace moelora::tools
