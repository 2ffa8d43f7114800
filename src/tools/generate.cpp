#include "tools/generate.h"
#include "tools/progress.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "moelora/core/error.h"
#include "moelora/engine/engine.h"
#include "moelora/io/tokenizer.h"
#include "moelora/lora/peft_adapter.h"
#include "moelora/model/model.h"

namespace moelora::tools {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// The fixture model `moelora generate` runs with no --model: the smallest committed model with
// adapters and a tokenizer, found next to the executable (build/bin/moelora of a checkout) or
// under the current directory.
constexpr const char* kDefaultFixture = "tests/fixtures/qwen3_moe_lora";

std::string find_default_fixture() {
  std::vector<fs::path> roots;
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec)
    for (fs::path p = exe.parent_path(); !p.empty() && p != p.root_path(); p = p.parent_path())
      roots.push_back(p);
  roots.push_back(fs::current_path());
  for (const fs::path& r : roots)
    if (fs::exists(r / kDefaultFixture / "model" / "config.json"))
      return (r / kDefaultFixture).string();
  MOELORA_THROW(
      "no --model given and the default fixture model ({}) was not found above {} or "
      "in the current directory; run from a moelora checkout or pass --model DIR",
      kDefaultFixture, ec ? std::string("the executable") : exe.string());
}

// A request as read from the command line or the JSONL file, before tokenization.
struct RawRequest {
  std::string label;
  std::optional<std::string> text;
  std::vector<int32_t> ids;
  std::string adapter;  // "" = base
  GenerationRequest req;
  std::string error;  // set: the request is refused without running
};

std::vector<int32_t> parse_ids(const std::string& s) {
  std::vector<int32_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (item.empty()) continue;
    size_t pos = 0;
    long v = 0;
    try {
      v = std::stol(item, &pos);
    } catch (const std::exception&) {
      pos = 0;
    }
    MOELORA_CHECK(pos == item.size() && v >= 0 && v <= INT32_MAX,
                  "--ids '{}': '{}' is not a token id (expected comma-separated integers >= 0)", s,
                  item);
    out.push_back(int32_t(v));
  }
  return out;
}

// eos_token_id of config.json / generation_config.json (an int or a list), as stop tokens.
std::vector<int32_t> eos_ids(const std::string& dir) {
  std::vector<int32_t> out;
  for (const char* f : {"generation_config.json", "config.json"}) {
    std::ifstream in(dir + "/" + f);
    if (!in) continue;
    std::stringstream ss;
    ss << in.rdbuf();
    const json j = json::parse(ss.str(), nullptr, false);
    if (j.is_discarded() || !j.contains("eos_token_id")) continue;
    const json& e = j["eos_token_id"];
    if (e.is_number_integer()) out.push_back(e.get<int32_t>());
    if (e.is_array())
      for (const json& x : e)
        if (x.is_number_integer()) out.push_back(x.get<int32_t>());
    if (!out.empty()) break;
  }
  return out;
}

GenerationRequest base_request(const GenerateOptions& o) {
  GenerationRequest r;
  r.max_new_tokens = o.max_new_tokens;
  r.sampling.temperature = o.temperature;
  r.sampling.top_p = o.top_p;
  r.sampling.top_k = o.top_k;
  r.sampling.seed = o.seed;
  r.stop_token_ids = o.stop_ids;
  return r;
}

// One JSONL line: {"prompt" | "ids", "adapter", "max_new_tokens", "temperature", "top_p",
// "top_k", "seed", "stop"}. A bad line becomes a refused request, not a failed run.
RawRequest parse_request_line(const std::string& line, const std::string& where,
                              const GenerateOptions& o) {
  RawRequest r;
  r.label = where;
  r.req = base_request(o);
  try {
    const json j = json::parse(line);
    MOELORA_CHECK(j.is_object(), "expected a JSON object");
    for (const auto& [k, v] : j.items())
      MOELORA_CHECK(k == "prompt" || k == "ids" || k == "adapter" || k == "max_new_tokens" ||
                        k == "temperature" || k == "top_p" || k == "top_k" || k == "seed" ||
                        k == "stop",
                    "unknown field '{}' (expected prompt, ids, adapter, max_new_tokens, "
                    "temperature, top_p, top_k, seed, stop)",
                    k);
    MOELORA_CHECK(j.contains("prompt") != j.contains("ids"),
                  "give exactly one of 'prompt' "
                  "(text) and 'ids' (token ids)");
    if (j.contains("prompt")) r.text = j.at("prompt").get<std::string>();
    if (j.contains("ids")) r.ids = j.at("ids").get<std::vector<int32_t>>();
    if (j.contains("adapter") && !j.at("adapter").is_null())
      r.adapter = j.at("adapter").get<std::string>();
    if (j.contains("max_new_tokens")) r.req.max_new_tokens = j.at("max_new_tokens").get<int>();
    if (j.contains("temperature")) r.req.sampling.temperature = j.at("temperature").get<float>();
    if (j.contains("top_p")) r.req.sampling.top_p = j.at("top_p").get<float>();
    if (j.contains("top_k")) r.req.sampling.top_k = j.at("top_k").get<int>();
    if (j.contains("seed")) r.req.sampling.seed = j.at("seed").get<uint64_t>();
    if (j.contains("stop")) {
      const json& s = j.at("stop");
      if (s.is_number_integer())
        r.req.stop_token_ids.push_back(s.get<int32_t>());
      else
        r.req.stop_token_ids = s.get<std::vector<int32_t>>();
    }
  } catch (const json::exception& e) {
    r.error = fmt::format("{}: {}", where, e.what());
  } catch (const Error& e) {
    r.error = fmt::format("{}: {}", where, e.message());
  }
  return r;
}

std::vector<RawRequest> read_requests(const GenerateOptions& o) {
  std::vector<RawRequest> out;
  std::vector<std::string> use = o.use.empty() ? std::vector<std::string>{"base"} : o.use;
  auto add = [&](const std::string& label, std::optional<std::string> text,
                 std::vector<int32_t> ids) {
    for (const std::string& a : use) {
      RawRequest r;
      r.label = label;
      r.text = text;
      r.ids = ids;
      r.adapter = a == "base" || a == "none" ? "" : a;
      r.req = base_request(o);
      out.push_back(std::move(r));
    }
  };
  for (size_t i = 0; i < o.prompts.size(); ++i)
    add(fmt::format("--prompt #{}", i + 1), o.prompts[i], {});
  for (size_t i = 0; i < o.ids.size(); ++i)
    add(fmt::format("--ids #{}", i + 1), std::nullopt, parse_ids(o.ids[i]));
  if (!o.requests.empty()) {
    std::ifstream in(o.requests);
    MOELORA_CHECK(in.good(), "--requests {}: cannot open", o.requests);
    std::string line;
    for (int n = 1; std::getline(in, line); ++n) {
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      out.push_back(parse_request_line(line, fmt::format("{}:{}", o.requests, n), o));
    }
  }
  return out;
}

// Built-in requests for the fixture model: a mixed batch of base and every adapter.
std::vector<RawRequest> default_requests(const GenerateOptions& o,
                                         const std::vector<std::string>& adapter_names) {
  const std::vector<std::string> texts = {"Hello world! Experts route tokens.",
                                          "The quick brown fox", "def forward(self, x):"};
  std::vector<RawRequest> out;
  std::vector<std::string> variants = {""};
  variants.insert(variants.end(), adapter_names.begin(), adapter_names.end());
  for (size_t t = 0; t < texts.size(); ++t)
    for (size_t v = 0; v < variants.size(); ++v) {
      RawRequest r;
      r.label = fmt::format("builtin #{}", out.size() + 1);
      r.text = texts[t];
      r.adapter = variants[v];
      r.req = base_request(o);
      if (t == 2 && o.temperature == 0.0f) {  // one seeded sampled request per variant
        r.req.sampling.temperature = 0.8f;
        r.req.sampling.top_p = 0.9f;
        r.req.sampling.seed = 1234 + v;
      }
      out.push_back(std::move(r));
    }
  return out;
}

json top_logprobs(const float* lg, int64_t V, int k) {
  double mx = lg[0];
  for (int64_t i = 1; i < V; ++i) mx = std::max(mx, double(lg[i]));
  double z = 0;
  for (int64_t i = 0; i < V; ++i) z += std::exp(double(lg[i]) - mx);
  const double lz = mx + std::log(z);
  std::vector<int32_t> idx(static_cast<size_t>(V));
  for (int64_t i = 0; i < V; ++i) idx[size_t(i)] = int32_t(i);
  const int64_t n = std::min<int64_t>(k, V);
  std::partial_sort(idx.begin(), idx.begin() + n, idx.end(), [&](int32_t a, int32_t b) {
    return lg[a] > lg[b] || (lg[a] == lg[b] && a < b);
  });
  json out = json::array();
  for (int64_t i = 0; i < n; ++i) out.push_back({idx[size_t(i)], double(lg[idx[size_t(i)]]) - lz});
  return out;
}

std::string printable(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '\n')
      out += "\\n";
    else if (c == '\t')
      out += "\\t";
    else
      out += c;
  }
  return out;
}

}  // namespace

CLI::App* add_generate_command(CLI::App& app, GenerateOptions& o) {
  CLI::App* g = app.add_subcommand(
      "generate",
      "generate text for a batch of requests, each with its own LoRA adapter or none "
      "(no --model: the committed tiny fixture model and its adapters)");
  g->add_option("--model", o.model,
                "Hugging Face model directory (config.json, safetensors, "
                "optional tokenizer.json)");
  g->add_option("--adapter", o.adapters, "PEFT adapter as name=path (repeatable)")
      ->allow_extra_args(false);
  g->add_option("--prompt", o.prompts, "a text request (repeatable; needs tokenizer.json)")
      ->allow_extra_args(false);
  g->add_option("--ids", o.ids, "a token-id request, e.g. 1,2,3 (repeatable)")
      ->allow_extra_args(false);
  g->add_option("--use", o.use,
                "adapter name(s) every --prompt/--ids request runs with, 'base' "
                "for none; each request runs once per name (default: base)")
      ->delimiter(',');
  g->add_option("--requests", o.requests,
                "JSONL file, one request per line: {\"prompt\" | "
                "\"ids\", \"adapter\", \"max_new_tokens\", \"temperature\", \"top_p\", "
                "\"top_k\", \"seed\", \"stop\"}");
  g->add_option("--max-new-tokens", o.max_new_tokens, "default for requests")
      ->capture_default_str();
  g->add_option("--temperature", o.temperature, "default; 0 = greedy")->capture_default_str();
  g->add_option("--top-p", o.top_p, "default nucleus mass")->capture_default_str();
  g->add_option("--top-k", o.top_k, "default; 0 = off")->capture_default_str();
  g->add_option("--seed", o.seed, "default sampling seed")->capture_default_str();
  g->add_option("--stop-id", o.stop_ids,
                "stop token id (repeatable; eos_token_id of the config "
                "is added unless --ignore-eos)")
      ->allow_extra_args(false);
  g->add_flag("--ignore-eos", o.ignore_eos, "do not stop at the config's eos_token_id");
  g->add_option("--logits-out", o.logits_out,
                "write each step's top-k logprobs (or full logits "
                "with --logits-top-k 0) per request as JSONL");
  g->add_option("--logits-top-k", o.logits_top_k, "entries per step in --logits-out")
      ->capture_default_str();
  g->add_option("--max-lora-rank", o.max_lora_rank, "largest adapter rank accepted")
      ->capture_default_str();
  g->add_option("--kv-pages", o.kv_pages, "KV cache budget in pages")->capture_default_str();
  g->add_option("--page-size", o.page_size, "tokens per KV page")->capture_default_str();
  g->add_option("--kv-dtype", o.kv_dtype, "bf16 or f32")->capture_default_str();
  g->add_option("--device", o.device,
                "cpu, cuda, or auto: cuda when a GPU is present and the model has a CUDA "
                "backend, else cpu")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
  g->add_option("--path", o.path,
                "decode path: hooks (eager steps) or fast (CUDA-graph decode steps, LoRA shrinks "
                "overlapped; as hooks on the CPU)")
      ->check(CLI::IsMember({"hooks", "fast"}))
      ->capture_default_str();
  g->add_option("--moe-backend", o.moe_backend,
                "MoE expert backend (reference, cuda_bf16, ...); default: picked for the "
                "device by capability");
  return g;
}

int run_generate(const GenerateOptions& o) {
  const bool builtin = o.model.empty();
  const std::string fixture = builtin ? find_default_fixture() : "";
  const std::string model_dir = builtin ? fixture + "/model" : o.model;
  std::vector<std::pair<std::string, std::string>> adapters;
  if (builtin && o.adapters.empty()) {
    adapters = {{"a", fixture + "/adapter_a"}, {"b", fixture + "/adapter_b"}};
  }
  for (const std::string& a : o.adapters) {
    const size_t eq = a.find('=');
    MOELORA_CHECK(eq != std::string::npos && eq > 0 && eq + 1 < a.size(),
                  "--adapter '{}': expected name=path", a);
    adapters.emplace_back(a.substr(0, eq), a.substr(eq + 1));
    MOELORA_CHECK(adapters.back().first != "base" && adapters.back().first != "none",
                  "--adapter '{}': 'base' and 'none' mean no adapter; pick another name", a);
  }
  MOELORA_CHECK(o.kv_dtype == "bf16" || o.kv_dtype == "f32",
                "--kv-dtype '{}': expected bf16 or f32", o.kv_dtype);

  Device device = Device::cpu();
  if (o.device == "cuda") {
    MOELORA_CHECK(cuda_available(), "--device cuda: {}",
                  built_with_cuda() ? "no usable CUDA device" : "moelora was built without CUDA");
    device = Device::cuda();
  } else if (o.device == "auto" && cuda_available() && Model::runs_on(model_dir, Device::cuda())) {
    device = Device::cuda();
  }

  const auto t_load = std::chrono::steady_clock::now();
  ModelOptions mo;
  mo.device = device;
  mo.moe_backend = o.moe_backend;
  mo.lora_slots = int(adapters.size());
  mo.lora_r_max = o.max_lora_rank;
  if (stderr_is_tty())  // a bar on a terminal; logs get no per-tensor lines
    mo.load_progress = [](int64_t i, int64_t n, const std::string& name) {
      draw_progress(i, n, "loaded", name, true);
    };
  auto model = Model::load(model_dir, mo);
  std::map<std::string, int> slot_of;
  for (size_t i = 0; i < adapters.size(); ++i) {
    MOELORA_CHECK(!slot_of.count(adapters[i].first), "--adapter: name '{}' given twice",
                  adapters[i].first);
    model->load_adapter(int(i), PeftAdapter::load(adapters[i].second));
    slot_of[adapters[i].first] = int(i);
  }
  std::optional<Tokenizer> tok;
  if (fs::exists(model_dir + "/tokenizer.json"))
    tok = Tokenizer::load(model_dir + "/tokenizer.json");
  const double load_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count();
  const HfModelConfig& c = model->config();
  fmt::print(
      "model {} ({}, {} layers, {} experts top-{}, vocab {}), {} adapter(s), "
      "tokenizer: {}; on {}; loaded in {:.2f} s\n",
      model_dir, c.model_type, c.num_hidden_layers, c.num_experts, c.num_experts_per_tok,
      c.vocab_size, adapters.size(), tok ? "yes" : "no (token ids in and out)", device.str(),
      load_s);
  for (const auto& [name, path] : adapters)
    fmt::print("  adapter {} = {} (slot {})\n", name, path, slot_of[name]);
  if (builtin)
    fmt::print("(no --model: the committed random-weight fixture model; its text is noise)\n");

  std::vector<RawRequest> raw;
  if (builtin && o.prompts.empty() && o.ids.empty() && o.requests.empty()) {
    std::vector<std::string> names;
    for (const auto& a : adapters) names.push_back(a.first);
    raw = default_requests(o, names);
  } else {
    raw = read_requests(o);
  }
  MOELORA_CHECK(!raw.empty(), "no requests: give --prompt, --ids or --requests");
  const std::vector<int32_t> eos = o.ignore_eos ? std::vector<int32_t>{} : eos_ids(model_dir);

  // Per-request problems (unknown adapter, no tokenizer for text) refuse that request only.
  std::vector<GenerationRequest> run;
  std::vector<size_t> run_of(raw.size(), SIZE_MAX);
  for (size_t i = 0; i < raw.size(); ++i) {
    RawRequest& r = raw[i];
    if (r.error.empty() && !r.adapter.empty() && !slot_of.count(r.adapter)) {
      std::string known;
      for (const auto& [n, s] : slot_of) known += (known.empty() ? "" : ", ") + n;
      r.error = fmt::format("unknown adapter '{}' (loaded: {})", r.adapter,
                            known.empty() ? "none" : known);
    }
    if (r.error.empty() && r.text && !tok)
      r.error =
          fmt::format("a text prompt needs {}/tokenizer.json; give token ids instead", model_dir);
    if (!r.error.empty()) continue;
    r.req.prompt = r.text ? tok->encode(*r.text) : r.ids;
    r.req.adapter_slot = r.adapter.empty() ? -1 : slot_of.at(r.adapter);
    for (int32_t e : eos)
      if (std::find(r.req.stop_token_ids.begin(), r.req.stop_token_ids.end(), e) ==
          r.req.stop_token_ids.end())
        r.req.stop_token_ids.push_back(e);
    run_of[i] = run.size();
    run.push_back(r.req);
  }

  EngineConfig ec;
  ec.page_size = o.page_size;
  ec.num_pages = o.kv_pages;
  ec.kv_dtype = o.kv_dtype == "f32" ? DType::f32 : DType::bf16;
  ec.record_logits = !o.logits_out.empty();
  ec.decode_path = parse_decode_path(o.path);
  Engine engine(*model, ec);
  std::vector<GenerationResult> results;
  if (!run.empty()) results = engine.generate(run);

  std::ofstream logits;
  if (!o.logits_out.empty()) {
    logits.open(o.logits_out);
    MOELORA_CHECK(logits.good(), "--logits-out {}: cannot write", o.logits_out);
  }
  int64_t prompt_tokens = 0, decode_tokens = 0, failed = 0;
  double prefill_s = 0, decode_s = 0;
  for (size_t i = 0; i < raw.size(); ++i) {
    const RawRequest& r = raw[i];
    const std::string who = r.adapter.empty() ? "base" : "adapter " + r.adapter;
    const GenerationResult* g = run_of[i] == SIZE_MAX ? nullptr : &results[run_of[i]];
    const std::string error = g ? (g->ok ? "" : g->error) : r.error;
    fmt::print("\n[{}] {} ({})\n", i + 1, r.label, who);
    if (!error.empty()) {
      ++failed;
      fmt::print("  error: {}\n", error);
      if (logits.is_open()) logits << json{{"request", i + 1}, {"error", error}}.dump() << "\n";
      continue;
    }
    const GenerationRequest& q = run[run_of[i]];
    if (tok) {
      fmt::print("  prompt: \"{}\" ({} tokens)\n", printable(tok->decode(q.prompt)),
                 q.prompt.size());
      fmt::print("  output: \"{}\"\n", printable(tok->decode(g->tokens)));
    } else {
      fmt::print("  prompt ids ({}): {}\n", q.prompt.size(), fmt::join(q.prompt, ","));
    }
    fmt::print("  ids: {}\n", fmt::join(g->tokens, ","));
    const int64_t dec = int64_t(g->tokens.size()) - 1;  // the first comes from the prefill
    fmt::print(
        "  finish: {}; {} generated; prefill {} tok in {:.1f} ms; decode {} tok in {:.1f} "
        "ms ({:.1f} tok/s, batch steps){}\n",
        g->finish_reason, g->tokens.size(), q.prompt.size(), g->prefill_seconds * 1e3, dec,
        g->decode_seconds * 1e3, g->decode_seconds > 0 ? double(dec) / g->decode_seconds : 0.0,
        q.sampling.temperature > 0
            ? fmt::format("; sampled T={} top_p={} top_k={} seed={}", q.sampling.temperature,
                          q.sampling.top_p, q.sampling.top_k, q.sampling.seed)
            : "; greedy");
    prompt_tokens += int64_t(q.prompt.size());
    decode_tokens += dec;
    prefill_s = std::max(prefill_s, g->prefill_seconds);
    decode_s = std::max(decode_s, g->decode_seconds);
    if (logits.is_open()) {
      const int64_t V = g->step_logits.size(1);
      json steps = json::array();
      for (size_t s = 0; s < g->tokens.size(); ++s) {
        const float* lg = g->step_logits.data<float>() + int64_t(s) * V;
        json st = {{"token", g->tokens[s]}};
        if (o.logits_top_k > 0)
          st["top_logprobs"] = top_logprobs(lg, V, o.logits_top_k);
        else
          st["logits"] = std::vector<float>(lg, lg + V);
        steps.push_back(st);
      }
      logits << json{{"request", i + 1},
                     {"adapter", r.adapter.empty() ? json() : json(r.adapter)},
                     {"prompt_ids", q.prompt},
                     {"steps", steps}}
                    .dump()
             << "\n";
    }
  }
  fmt::print(
      "\nbatch: {} request(s), {} refused; prefill {} tok in {:.1f} ms ({:.1f} tok/s); "
      "decode {} tok in {:.1f} ms ({:.1f} tok/s)\n",
      raw.size(), failed, prompt_tokens, prefill_s * 1e3,
      prefill_s > 0 ? double(prompt_tokens) / prefill_s : 0.0, decode_tokens, decode_s * 1e3,
      decode_s > 0 ? double(decode_tokens) / decode_s : 0.0);
  if (logits.is_open()) fmt::print("step logits written to {}\n", o.logits_out);
  return failed == int64_t(raw.size()) ? 1 : 0;
}

}  // namespace moelora::tools
