#!/usr/bin/env python3
"""Golden fixtures for whole models with attention + expert LoRA, from transformers + peft.

Runs on the device machine (torch, transformers 5.x, peft 0.21, tokenizers; no internet).
Writes two fixtures, each a tiny random-weight model saved by save_pretrained (bf16), two
PEFT adapters and the f32 reference (same tensor names as make_qwen3_moe_model_golden.py:
p{i}.prompt, p{i}.{v}.prefill / tokens / step_logits / min_margin, v = base, a, b):

  qwen3_moe_lora/  Qwen3-MoE (3 layers, layer 1 a dense mlp_only layer), vocab 384, with a
                   byte-level BPE tokenizer.json trained here (the CLI's default model).
      adapter_a  r 4, alpha 8: q/k/v/o and the experts; rank_pattern o_proj -> 2,
                 alpha_pattern o_proj -> 4. (It also asks for gate_proj/up_proj/down_proj, but
                 peft 0.21 turns those targets into the experts' 3D parameters for transformers
                 5 MoE models -- writing rank_pattern '.*\.gate_up_proj': 2r -- so the dense
                 mlp_only layer gets no LoRA; the C++ tests check dense-MLP LoRA against merged
                 weights instead.)
      adapter_b  r 8, alpha 16, rsLoRA: q/v and the experts
  mixtral_tiny/    Mixtral (2 layers, 4 experts, top-2, GQA, no sliding window), vocab 128.
      adapter_a  r 4: q/k/v/o and the experts (as peft writes them for this transformers)
      adapter_b  r 8 rsLoRA: q/k/v/o only
      adapter_a_per_expert  adapter_a rewritten with per-expert block_sparse_moe.experts.e.
                 {w1,w3,w2} keys (the transformers 4 / hub layout); same reference as a

Greedy steps recompute the whole sequence (no KV cache). lm_head is scaled by LOGIT_GAIN so
that greedy near-ties are rare; seeds are screened for them (top-1 / top-2 logit gap >= 0.05;
after a time budget the seed with the largest smallest gap is kept, and its min_margin
entries tell the test) only; routing near-ties are handled by the C++
tests from the engine's router margins (see make_qwen3_moe_model_golden.py).

Adapter b (rsLoRA: scale 16/sqrt(8) on LoRA weights of std 0.2) turned out ill-conditioned
at bf16 precision: a +-0.2% change of its weights moves the logits as far as the engine is
from this reference, and greedy paths diverge (see tests/cpu/lora_model_test.cpp). A
regeneration should draw adapter b's weights smaller (e.g. std 0.05).

Usage: make_lora_model_goldens.py OUT_DIR   (the device returns 2 folder levels: tar OUT_DIR)
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_qwen3_moe_model_golden as q3  # noqa: E402  (bf16_round, randomize_, greedy)

STEPS = q3.STEPS
PROMPT_LENS = (7, 13, 3)
TOKEN_MARGIN = 0.05
LOGIT_GAIN = 4.0
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Experts route tokens; adapters add B A x.",
    "Hello world! Mixture-of-Experts models with many LoRA adapters in one batch.",
    "def forward(self, x):\n    return self.down(silu(self.gate(x)) * self.up(x))\n",
    "Once upon a time there was a tiny model that spoke in random tokens.",
] * 20


def train_tokenizer(vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() <= vocab_size, tok.get_vocab_size()
    return tok


def expert_targets(model):
    """(target_modules, target_parameters) reaching the experts of this transformers' model."""
    params = [n for n, p in model.named_parameters()
              if n.startswith("model.layers.0.") and "experts" in n and p.dim() == 3]
    if params:  # fused 3D expert parameters (transformers 5)
        return [], sorted({n[len("model.layers.0."):] for n in params})
    names = {n.split(".")[-2] for n, _ in model.named_parameters()
             if n.startswith("model.layers.0.") and ".experts.0." in n}
    return sorted(names), []


def make_adapters(model, specs, seed):
    """One PeftModel per adapter, each on its own copy of the base model (peft refuses two
    adapters with different target_parameters in one model)."""
    import copy
    from peft import LoraConfig, get_peft_model
    pms = {}
    for idx, (name, a) in enumerate(specs.items()):
        lc = LoraConfig(r=a["r"], lora_alpha=a["alpha"], use_rslora=a.get("rslora", False),
                        target_modules=a["modules"], target_parameters=a["params"] or None,
                        rank_pattern=a.get("rank_pattern", {}),
                        alpha_pattern=a.get("alpha_pattern", {}),
                        init_lora_weights=False, lora_dropout=0.0)
        pm = get_peft_model(copy.deepcopy(model), lc, adapter_name=name)
        gl = torch.Generator().manual_seed(seed + 11 + idx)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(q3.bf16_round(torch.randn(p.shape, generator=gl) * 0.2))
        pms[name] = pm.eval()
    return pms


def try_seed(cls, cfg, specs_of, seed):
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32).eval()
    q3.randomize_(model, seed)
    with torch.no_grad():  # larger logits: fewer greedy near-ties among many tokens
        model.lm_head.weight.copy_(q3.bf16_round(model.lm_head.weight * LOGIT_GAIN))
    g = torch.Generator().manual_seed(seed + 7)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()
               for n in PROMPT_LENS]
    res = {}
    worst = float("inf")
    for i, p in enumerate(prompts):
        res[(i, "base")] = q3.greedy(model, p)
        worst = min(worst, res[(i, "base")][3])
    if worst < TOKEN_MARGIN:
        return worst, None
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    specs = specs_of(model)
    pms = make_adapters(model, specs, seed)
    for name, pm in pms.items():
        for i, p in enumerate(prompts):
            res[(i, name)] = q3.greedy(pm, p)
            worst = min(worst, res[(i, name)][3])
        with pm.disable_adapter():
            chk = q3.logits_of(pm, prompts[0])
        assert torch.allclose(chk, res[(0, "base")][0], atol=1e-4), "disable_adapter differs"
    return worst, (seed, prompts, res, base_sd, pms, specs)


def build(cls, cfg, specs_of, seeds, budget_s=25.0):
    import time
    t0 = time.time()
    best = (-1.0, None)
    for seed in seeds:
        worst, payload = try_seed(cls, cfg, specs_of, seed)
        print(f"seed {seed}: min greedy margin {worst:.4f}")
        if payload is not None and worst > best[0]:
            best = (worst, payload)
        if worst >= TOKEN_MARGIN or (best[1] is not None and time.time() - t0 > budget_s):
            break
    if best[1] is None:
        raise SystemExit("no usable seed")
    print("seed", best[1][0], "min margin", best[0])
    return best[1]


def save_fixture(out, cls, cfg, seed, prompts, res, base_sd, pms, specs):
    import peft
    import transformers
    mdir = os.path.join(out, "model")
    clean = cls(cfg)
    clean.load_state_dict(base_sd, strict=True)
    clean.to(torch.bfloat16).save_pretrained(mdir, safe_serialization=True)
    st = load_file(os.path.join(mdir, "model.safetensors"))
    for k in sorted(st):
        if ".layers.0." in k or ".layers." not in k:
            print("  key", k, tuple(st[k].shape), st[k].dtype)
    re = cls.from_pretrained(mdir, dtype=torch.float32).eval()
    d = (q3.logits_of(re, prompts[1]) - res[(1, "base")][0]).abs().max().item()
    print("  reload max diff", d)
    assert d < 1e-4, "reloaded model differs"
    for name in specs:
        adir = os.path.join(out, "tmp_" + name)
        pms[name].save_pretrained(adir, selected_adapters=[name])
        src = adir if os.path.exists(os.path.join(adir, "adapter_config.json")) else \
            os.path.join(adir, name)
        dst = os.path.join(out, "adapter_" + name)
        os.makedirs(dst, exist_ok=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))
        shutil.rmtree(adir)
        for k, v in sorted(load_file(os.path.join(dst, "adapter_model.safetensors")).items()):
            if ".layers.0." in k or ".layers.1." in k:
                print("  adapter", name, k, tuple(v.shape), v.dtype)
    t = {}
    for i, p in enumerate(prompts):
        t[f"p{i}.prompt"] = torch.tensor(p, dtype=torch.int32)
        for v in ["base"] + list(specs):
            prefill, toks, steps, margin = res[(i, v)]
            t[f"p{i}.{v}.prefill"] = prefill.contiguous()
            t[f"p{i}.{v}.tokens"] = toks
            t[f"p{i}.{v}.step_logits"] = steps.contiguous()
            t[f"p{i}.{v}.min_margin"] = torch.tensor([margin], dtype=torch.float32)
            print(f"  p{i} {v}: tokens {toks.tolist()} min margin {margin:.3f}")
    meta = dict(seed=seed, steps=STEPS, prompts=len(prompts), adapters=list(specs),
                torch=torch.__version__, transformers=transformers.__version__,
                peft=peft.__version__, reference="f32 forward on bf16-representable weights, "
                "no KV cache (full recompute per step)")
    save_file(t, os.path.join(out, "reference.safetensors"), metadata={"meta": json.dumps(meta)})


def per_expert_copy(src, dst, num_experts, hidden, inter, layers):
    """adapter_a with its fused 3D expert LoRA rewritten as per-expert w1/w3/w2 modules."""
    os.makedirs(dst, exist_ok=True)
    cfg = json.load(open(os.path.join(src, "adapter_config.json")))
    w = load_file(os.path.join(src, "adapter_model.safetensors"))
    r = cfg["r"]
    pre = "base_model.model.model.layers.{}."
    out = {k: v for k, v in w.items() if ".experts" not in k}
    E = num_experts
    for l in range(layers):
        fused = {k: v for k, v in w.items() if k.startswith(pre.format(l)) and ".experts" in k}
        if not fused:
            continue
        # Two parameter LoRAs on one module: peft nests them, the outer one (the last target
        # parameter) on `experts`, the inner one on `experts.base_layer`.
        pairs = {}
        for k, v in fused.items():
            mod = k[:k.index(".lora_")]
            pairs.setdefault(mod, {})["A" if ".lora_A." in k else "B"] = v
        for mod, ab in pairs.items():
            a, b = ab["A"], ab["B"]
            part = "gate_up" if a.shape[1] == hidden else "down"
            for e in range(E):
                ae = a[e * r:(e + 1) * r]
                be = b[:, [j * E + e for j in range(r)]]
                ep = pre.format(l) + f"block_sparse_moe.experts.{e}."
                if part == "gate_up":
                    for nm, rows in (("w1", slice(0, inter)), ("w3", slice(inter, 2 * inter))):
                        out[ep + nm + ".lora_A.weight"] = ae.clone()
                        out[ep + nm + ".lora_B.weight"] = be[rows].contiguous()
                else:
                    out[ep + "w2.lora_A.weight"] = ae.clone()
                    out[ep + "w2.lora_B.weight"] = be.contiguous()
    cfg["target_parameters"] = None
    cfg["target_modules"] = sorted(set(cfg["target_modules"] or []) | {"w1", "w2", "w3"})
    save_file(out, os.path.join(dst, "adapter_model.safetensors"))
    json.dump(cfg, open(os.path.join(dst, "adapter_config.json"), "w"), indent=2)
    print("  wrote", dst, len(out), "tensors")


def main():
    import peft
    import transformers
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
    print("torch", torch.__version__, "transformers", transformers.__version__, "peft",
          peft.__version__)
    out = sys.argv[1] if len(sys.argv) > 1 else "fixtures"

    # Qwen3-MoE with a tokenizer (the CLI's default model).
    tok = train_tokenizer(384)
    qcfg = Qwen3MoeConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
        decoder_sparse_step=1, max_position_embeddings=64, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=False, attention_bias=False,
        output_router_logits=False, eos_token_id=tok.token_to_id("<|endoftext|>"))

    def qspecs(model):
        mods, params = expert_targets(model)
        return {
            "a": dict(r=4, alpha=8, modules=ATTN + ["gate_proj", "up_proj", "down_proj"] + mods,
                      params=params, rank_pattern={"o_proj": 2}, alpha_pattern={"o_proj": 4}),
            "b": dict(r=8, alpha=16, rslora=True, modules=["q_proj", "v_proj"] + mods,
                      params=params),
        }

    qdir = os.path.join(out, "qwen3_moe_lora")
    print("== qwen3_moe_lora")
    r = build(Qwen3MoeForCausalLM, qcfg, qspecs, range(200, 300))
    save_fixture(qdir, Qwen3MoeForCausalLM, qcfg, *r)
    tok.save(os.path.join(qdir, "model", "tokenizer.json"))
    text = "Hello world! Experts route tokens."
    ids = tok.encode(text).ids
    print("  tokenizer vocab", tok.get_vocab_size(), "ids", ids, "decoded", tok.decode(ids))

    # Mixtral.
    mcfg = MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False,
        router_jitter_noise=0.0, output_router_logits=False)

    def mspecs(model):
        mods, params = expert_targets(model)
        print("  mixtral expert targets", mods, params)
        return {
            "a": dict(r=4, alpha=8, modules=ATTN + mods, params=params),
            "b": dict(r=8, alpha=16, rslora=True, modules=ATTN, params=[]),
        }

    mdir = os.path.join(out, "mixtral_tiny")
    print("== mixtral_tiny")
    r = build(MixtralForCausalLM, mcfg, mspecs, range(300, 400))
    save_fixture(mdir, MixtralForCausalLM, mcfg, *r)
    if r[5]["a"]["params"]:
        try:
            per_expert_copy(os.path.join(mdir, "adapter_a"),
                            os.path.join(mdir, "adapter_a_per_expert"), 4, 64, 32, 2)
        except Exception as e:  # the fused layout was not what this expects: say so, go on
            print("  per-expert copy failed:", repr(e))
    for d in (qdir, mdir):
        total = sum(os.path.getsize(os.path.join(p, f)) for p, _, fs in os.walk(d) for f in fs)
        print("  size", d, total)
    print("wrote", out)


if __name__ == "__main__":
    main()
