#!/usr/bin/env python3
"""Golden fixtures for the MoE layer, produced by the reference framework (transformers + peft).

Runs on the device machine (torch, transformers 5.x, peft 0.21 there). For each tiny
random-weight block it saves, as safetensors, the inputs, the weights in moelora's layout, the
LoRA weights (as peft stored them and sliced per expert), and the framework's outputs for a
batch that mixes base tokens and two adapters. It also saves the raw peft adapter directories.

The per-expert slicing of peft's fused 3D-parameter LoRA is not assumed: candidate slicings are
tried against peft's own forward and the one that reproduces it is used (and reported).

Usage: make_moe_block_goldens.py OUT_DIR
"""
import json
import os
import sys

import torch
import torch.nn as nn
from safetensors.torch import save_file, load_file

OUT = sys.argv[1] if len(sys.argv) > 1 else "goldens"
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(1234)
DT = torch.float32  # run the reference in f32 on bf16-representable values


def bf16_round(t):
    return t.to(torch.bfloat16).to(torch.float32)


def randomize_(module, std):
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(bf16_round(torch.randn_like(p) * std))


class Wrapper(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        out = self.block(x[None])  # the blocks take [batch, seq, hidden]
        out = out[0] if isinstance(out, tuple) else out
        return out[0]


def describe(module):
    for n, p in module.named_parameters():
        print(f"  param {n} {tuple(p.shape)} {p.dtype}")
    for n, b in module.named_buffers():
        print(f"  buffer {n} {tuple(b.shape)} {b.dtype}")


def experts_3d(experts):
    """(gate_up [E, 2I, H], down [E, H, I]) whatever the module layout."""
    if hasattr(experts, "gate_up_proj"):
        gu, dn = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
        return gu, dn
    gate = torch.stack([e.gate_proj.weight for e in experts])
    up = torch.stack([e.up_proj.weight for e in experts])
    down = torch.stack([e.down_proj.weight for e in experts])
    return torch.cat([gate, up], dim=1).detach(), down.detach()


def peft_adapter(model, name, r, alpha, rslora, targets, seed):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=[],
                     target_parameters=targets, init_lora_weights=False, lora_dropout=0.0)
    return cfg


def lora_tensors(peft_model, adapter):
    """All lora_A / lora_B tensors of `adapter` by module name."""
    out = {}
    for n, p in peft_model.named_parameters():
        if n.endswith(f".{adapter}.weight") and ("lora_A" in n or "lora_B" in n):
            out[n] = p.detach().clone()
    return out


def candidates_gate_up(A, B, E, r, H, I2):
    """Candidate per-expert slicings of a fused 3D LoRA: A [E*r, H], B [I2, E*r]."""
    c = {}
    c["A_expert_major__B_cols_expert_major"] = (A.view(E, r, H), B.view(I2, E, r).permute(1, 0, 2))
    c["A_rank_major__B_cols_rank_major"] = (A.view(r, E, H).permute(1, 0, 2),
                                            B.view(I2, r, E).permute(2, 0, 1))
    c["A_expert_major__B_cols_rank_major"] = (A.view(E, r, H), B.view(I2, r, E).permute(2, 0, 1))
    c["A_rank_major__B_cols_expert_major"] = (A.view(r, E, H).permute(1, 0, 2),
                                              B.view(I2, E, r).permute(1, 0, 2))
    return c


def make_block(kind):
    if kind == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe import modeling_qwen3_moe as m
        cfg = Qwen3MoeConfig(hidden_size=192, moe_intermediate_size=64, num_experts=8,
                             num_experts_per_tok=2, norm_topk_prob=True, intermediate_size=128,
                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, vocab_size=128)
        block = m.Qwen3MoeSparseMoeBlock(cfg)
        meta = dict(hidden=192, inter=64, num_experts=8, top_k=2, scoring="softmax",
                    renormalize=True, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                    shared_inter=0)
    elif kind == "deepseek_v3":
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m
        cfg = DeepseekV3Config(hidden_size=192, moe_intermediate_size=64, n_routed_experts=16,
                               num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
                               routed_scaling_factor=2.5, norm_topk_prob=True,
                               intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=4, vocab_size=128, q_lora_rank=None,
                               kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                               v_head_dim=16, first_k_dense_replace=0)
        block = m.DeepseekV3MoE(cfg)
        meta = dict(hidden=192, inter=64, num_experts=16, top_k=4, scoring="sigmoid",
                    renormalize=True, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                    shared_inter=64)
    else:
        raise ValueError(kind)
    return block.to(DT), meta


def router_weight(block):
    g = block.gate
    return g.weight.detach()


def build(kind, M=24):
    print(f"== {kind}")
    block, meta = make_block(kind)
    randomize_(block, 0.15)
    if kind == "deepseek_v3":
        with torch.no_grad():
            block.gate.e_score_correction_bias.copy_(torch.randn(meta["num_experts"]) * 0.05)
    describe(block)
    E, H, I = meta["num_experts"], meta["hidden"], meta["inter"]
    x = bf16_round(torch.randn(M, H))
    model = Wrapper(block)
    experts = block.experts  # peft replaces block.experts with a wrapper; keep the module
    gu, dn = experts_3d(experts)
    with torch.no_grad():
        y_base = model(x.clone())
        logits = (x @ router_weight(block).T).float()

    from peft import LoraConfig, get_peft_model
    targets_a = ["block.experts.gate_up_proj", "block.experts.down_proj"]
    targets_b = targets_a  # peft: every adapter must target the same parameters
    cfg_a = LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=targets_a,
                       init_lora_weights=False, lora_dropout=0.0)
    cfg_b = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=[],
                       target_parameters=targets_b, init_lora_weights=False, lora_dropout=0.0)
    pm = get_peft_model(model, cfg_a, adapter_name="a")
    pm.add_adapter("b", cfg_b)
    # Make every LoRA tensor bf16-representable and of a size that matters.
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(bf16_round(torch.randn_like(p) * 0.2))
    for n, p in pm.named_parameters():
        if "lora_" in n:
            print(f"  lora {n} {tuple(p.shape)}")

    outs = {}
    with torch.no_grad():
        for ad in ("a", "b"):
            pm.base_model.set_adapter(ad)
            outs[ad] = pm(x.clone())
        with pm.disable_adapter():
            y_check = pm(x.clone())
    assert torch.allclose(y_check, y_base, atol=1e-6), "disable_adapter did not give the base output"

    # Save raw adapters as peft writes them.
    for ad in ("a", "b"):
        d = os.path.join(OUT, f"{kind}_adapter_{ad}")
        pm.save_pretrained(d, selected_adapters=[ad])
        print("  saved", d, os.listdir(d), os.listdir(os.path.join(d, ad)) if os.path.isdir(os.path.join(d, ad)) else "")

    print("  gate_up", tuple(gu.shape), "down", tuple(dn.shape))
    assert gu.shape == (E, 2 * I, H) and dn.shape == (E, H, I), "unexpected expert layout"

    # Recover per-expert LoRA matrices by matching peft's forward.
    def run_merged(dgu, ddn):
        with torch.no_grad():
            with pm.disable_adapter():
                old_gu, old_dn = experts.gate_up_proj.data.clone(), experts.down_proj.data.clone()
                experts.gate_up_proj.data += dgu
                experts.down_proj.data += ddn
                y = pm(x.clone())
                experts.gate_up_proj.data.copy_(old_gu)
                experts.down_proj.data.copy_(old_dn)
        return y

    result = {}
    for ad, cfg, r in (("a", cfg_a, 4), ("b", cfg_b, 8)):
        t = lora_tensors(pm, ad)
        scale = cfg.lora_alpha / (r ** 0.5 if cfg.use_rslora else r)
        # Pair each lora_A with its lora_B (same module path); classify by A's input size.
        gu_A, gu_B, dn_A, dn_B = [], [], [], []
        for k, v in t.items():
            if "lora_A" not in k:
                continue
            b = t[k.replace("lora_A", "lora_B")]
            if v.shape[1] == H:
                gu_A.append(v); gu_B.append(b)
            elif v.shape[1] == I:
                dn_A.append(v); dn_B.append(b)
            else:
                raise RuntimeError(f"unexpected lora_A shape {tuple(v.shape)} for {k}")
        print(f"  adapter {ad}: keys", list(t.keys()))
        best = None
        dn_cands = candidates_gate_up(dn_A[0], dn_B[0], E, r, I, H)
        gu_cands = candidates_gate_up(gu_A[0], gu_B[0], E, r, H, 2 * I) if gu_A else {"none": None}
        for gname, gpair in gu_cands.items():
            for dname, dpair in dn_cands.items():
                dgu = torch.zeros_like(gu) if gpair is None else scale * torch.bmm(gpair[1], gpair[0])
                ddn = scale * torch.bmm(dpair[1], dpair[0])
                err = (run_merged(dgu, ddn) - outs[ad]).abs().max().item()
                if best is None or err < best[0]:
                    best = (err, gname, dname, gpair, dpair)
        print(f"  adapter {ad}: best slicing gate_up={best[1]} down={best[2]} max err {best[0]:.3e}")
        assert best[0] < 1e-4, "no candidate slicing reproduces peft's forward"
        result[ad] = dict(scale=scale, r=r, gate_up=best[3], down=best[4],
                          slicing=dict(gate_up=best[1], down=best[2]))

    # Mixed batch: token t uses slot token_slot[t] (-1 base, 0 adapter a, 1 adapter b).
    token_slot = torch.tensor([(-1, 0, 1)[t % 3] for t in range(M)], dtype=torch.int32)
    y_mixed = torch.where((token_slot == -1)[:, None], y_base,
                          torch.where((token_slot == 0)[:, None], outs["a"], outs["b"]))

    tensors = {
        "x": x.to(torch.bfloat16).contiguous(),
        "router_logits": logits.contiguous(),
        "w13": gu.to(torch.bfloat16).contiguous(),
        "w2": dn.to(torch.bfloat16).contiguous(),
        "y_base": y_base.float().contiguous(),
        "y_a": outs["a"].float().contiguous(),
        "y_b": outs["b"].float().contiguous(),
        "y_mixed": y_mixed.float().contiguous(),
        "token_slot": token_slot.contiguous(),
        "a.gate_up_a": result["a"]["gate_up"][0].float().contiguous(),
        "a.gate_up_b": result["a"]["gate_up"][1].float().contiguous(),
        "a.down_a": result["a"]["down"][0].float().contiguous(),
        "a.down_b": result["a"]["down"][1].float().contiguous(),
        "b.gate_up_a": result["b"]["gate_up"][0].float().contiguous(),
        "b.gate_up_b": result["b"]["gate_up"][1].float().contiguous(),
        "b.down_a": result["b"]["down"][0].float().contiguous(),
        "b.down_b": result["b"]["down"][1].float().contiguous(),
        "a.scale": torch.tensor([result["a"]["scale"]], dtype=torch.float32),
        "b.scale": torch.tensor([result["b"]["scale"]], dtype=torch.float32),
    }
    if kind == "deepseek_v3":
        tensors["correction_bias"] = block.gate.e_score_correction_bias.detach().float().contiguous()
        se = block.shared_experts
        tensors["shared_w13"] = torch.cat([se.gate_proj.weight, se.up_proj.weight], 0)[None].to(torch.bfloat16).contiguous()
        tensors["shared_w2"] = se.down_proj.weight[None].to(torch.bfloat16).contiguous()
    meta.update(M=M, slicing_a=result["a"]["slicing"], slicing_b=result["b"]["slicing"])
    save_file(tensors, os.path.join(OUT, f"{kind}_block.safetensors"),
              metadata={"meta": json.dumps(meta)})
    print("  wrote", kind, {k: tuple(v.shape) for k, v in tensors.items()})


if __name__ == "__main__":
    import transformers, peft
    print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)
    for kind in ("qwen3_moe", "deepseek_v3"):
        try:
            build(kind)
        except Exception as e:  # keep going: one report per block
            import traceback
            traceback.print_exc()
            print(f"FAILED {kind}: {e}")
