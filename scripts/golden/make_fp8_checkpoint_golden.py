#!/usr/bin/env python3
"""Independent reference for the fp8 block-scale format: transformers' FineGrainedFP8Config.

Runs on the device machine (torch, transformers 5.x, a GPU with fp8: the quantizer refuses
otherwise). Builds a tiny random-weight Qwen3-MoE (1 layer), lets transformers quantize it on
load with FineGrainedFP8Config(weight_block_size=[128, 128]), saves the quantized checkpoint
with save_pretrained, and writes one small fixture (< 1 MB) with:
  - the layer-0 expert tensors exactly as the quantized checkpoint stores them (names and
    dtypes as on disk, whatever this transformers version calls them; listed in metadata),
  - transformers' own dequantization (Fp8Dequantize) of one expert's gate_up and down, f32,
  - a batch x (bf16), the router logits (f32, from the unquantized router), and the output of
    transformers' Qwen3-MoE block run in f32 on its dequantized expert weights (its FP8
    expert forward needs the `kernels` hub package, absent on the device image).
Findings with transformers 5.17 (device, 2026-11-22): save_pretrained splits the fused 3D
experts into per-expert Linears and writes each weight_scale_inv 1-D ((2,) for a [128, 256]
weight); reloading that checkpoint with FineGrainedFP8Config(dequantize=True) fails in its own
reshape. It also copies the whole quantized checkpoint (config.json + safetensors, < 1 MB) to
OUT/checkpoint and writes OUT/checkpoint_reference.safetensors: token ids and the f32 logits of
the same model with every fp8 weight replaced by its dequantized value (attention projections
and experts; transformers' fp8 forward needs the `kernels` package), for the whole-model
loader's test.

Usage: make_fp8_checkpoint_golden.py OUT_DIR
"""
import json
import os
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

OUT = sys.argv[1] if len(sys.argv) > 1 else "fp8_golden"
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(4321)

import transformers
from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Qwen3MoeConfig

print("transformers", transformers.__version__, "torch", torch.__version__)
H, I, E, K, M = 256, 128, 4, 2, 8
cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=H, intermediate_size=512, moe_intermediate_size=I,
                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=64, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True,
                     decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=64,
                     tie_word_embeddings=False)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
with torch.no_grad():
    for n, p in model.named_parameters():
        std = 0.5 if "norm" in n else 1.0 / (p.shape[-1] ** 0.5)
        p.copy_((torch.randn_like(p, dtype=torch.float32) * std).to(p.dtype))
tmp = tempfile.mkdtemp()
src, qdir = os.path.join(tmp, "bf16"), os.path.join(tmp, "fp8")
model.save_pretrained(src)

qcfg = FineGrainedFP8Config(weight_block_size=[128, 128])
qmodel = AutoModelForCausalLM.from_pretrained(src, quantization_config=qcfg,
                                              dtype=torch.bfloat16, device_map="cuda")
qmodel.save_pretrained(qdir)
print("quantized checkpoint files:", os.listdir(qdir))
with open(os.path.join(qdir, "config.json")) as f:
    qc = json.load(f).get("quantization_config")
print("quantization_config:", qc)
state = {}
for fn in sorted(os.listdir(qdir)):
    if fn.endswith(".safetensors"):
        state.update(load_file(os.path.join(qdir, fn)))
layer = {k: v for k, v in state.items() if ".layers.0.mlp." in k}
for k, v in sorted(layer.items()):
    print(f"  {k} {tuple(v.shape)} {v.dtype}")
expert_keys = sorted(k for k in layer if ".experts." in k)
fixture = {k: layer[k].contiguous() for k in expert_keys}


def find(pattern_all, exclude=()):
    for k in expert_keys:
        if all(p in k for p in pattern_all) and not any(x in k for x in exclude):
            return k
    return None


# Fused 3D experts (gate_up_proj / down_proj + their scale tensors) or per-expert Linears.
gu_key = find(["gate_up_proj"], exclude=["scale"])
dn_key = find(["down_proj"], exclude=["scale"])
layout = "fused3d" if gu_key is not None and layer[gu_key].dim() == 3 else "per_expert"
print("expert layout:", layout)

mlp = qmodel.model.layers[0].mlp
# transformers' own dequantization of the in-memory quantized experts (FP8Expert params
# [E, 2I, H] / [E, H, I] with their scale grids) through Fp8Dequantize's per-tensor helper.
# (Reloading the saved checkpoint with FineGrainedFP8Config(dequantize=True) fails in 5.17:
# the per-expert weight_scale_inv it wrote are 1-D and its own reshape rejects them.)
import inspect
from transformers.integrations import finegrained_fp8 as ff
print("Fp8Dequantize.__init__", inspect.signature(ff.Fp8Dequantize.__init__))
for n, p in mlp.named_parameters():
    print(f"  quantized model param {n} {tuple(p.shape)} {p.dtype}")
for n, b in mlp.named_buffers():
    print(f"  quantized model buffer {n} {tuple(b.shape)} {b.dtype}")
params = dict(mlp.experts.named_parameters())
params.update(dict(mlp.experts.named_buffers()))
deq_source = []


def dequant(w, s):
    op = None
    for make in (lambda: ff.Fp8Dequantize(qmodel.hf_quantizer), lambda: ff.Fp8Dequantize()):
        try:
            op = make()
            break
        except Exception as e:  # noqa: BLE001
            print("Fp8Dequantize():", e)
    if op is not None and hasattr(op, "_dequantize_one"):
        try:
            out = op._dequantize_one(w, s, output_dtype=torch.float32)
            deq_source.append("transformers Fp8Dequantize._dequantize_one")
            return out.float().cpu()
        except Exception as e:  # noqa: BLE001
            print("_dequantize_one:", e)
    deq_source.append("formula codes * scale")
    rows, cols = w.shape[-2:]
    se = s.float().repeat_interleave(128, -2)[:rows].repeat_interleave(128, -1)[:, :cols]
    return (w.float() * se).cpu()


deq_all = {}
for name in ("gate_up_proj", "down_proj"):
    skey = [k for k in params if k.startswith(name) and "scale" in k][0]
    print(name, "scale key", skey, tuple(params[skey].shape))
    deq_all[name] = torch.stack([dequant(params[name][e].detach(), params[skey][e].detach())
                                 for e in range(E)])
    fixture[f"golden.deq.{name}.1"] = deq_all[name][1].contiguous()

# The block on a batch. Router logits from the router's own weight (kept bf16 or, if it was
# quantized too, dequantized) in f32.
x = (torch.randn(M, H) * 1.0).to(torch.bfloat16)
gate_w = None
for k in layer:
    if k.endswith("mlp.gate.weight"):
        gate_w = layer[k]
if gate_w is None or gate_w.dtype == torch.float8_e4m3fn:
    gate_w = mlp.gate.weight.detach().cpu()
print("router weight", None if gate_w is None else (tuple(gate_w.shape), gate_w.dtype))
logits = x.float() @ gate_w.float().t()
# transformers' FP8 expert forward needs the `kernels` hub package (absent on the device), so
# the block output is transformers' own Qwen3-MoE block, in f32, on transformers' dequantized
# expert weights: activations are NOT fp8-quantized here (the CPU test allows for that).
# The original bf16 model's layer-0 block (same config: E, I, top-k, norm_topk_prob), in f32.
blk = model.model.layers[0].mlp.float()
y_source = "transformers Qwen3MoeSparseMoeBlock f32 on dequantized weights"
with torch.no_grad():
    for n, p in blk.named_parameters():
        print(f"  f32 block param {n} {tuple(p.shape)}")
    blk.gate.weight.copy_(gate_w.float())
    gu, dn = blk.experts.gate_up_proj, blk.experts.down_proj
    gu.copy_(deq_all["gate_up_proj"] if gu.shape == deq_all["gate_up_proj"].shape
             else deq_all["gate_up_proj"].transpose(1, 2))
    dn.copy_(deq_all["down_proj"] if dn.shape == deq_all["down_proj"].shape
             else deq_all["down_proj"].transpose(1, 2))
    y = blk(x.float()[None])
y = (y[0] if isinstance(y, tuple) else y)[0].float().cpu()
fixture["golden.x"] = x
fixture["golden.router_logits"] = logits.contiguous()
fixture["golden.y"] = y.contiguous()
meta = {"transformers": transformers.__version__, "torch": torch.__version__,
        "layout": layout, "hidden": str(H), "inter": str(I), "experts": str(E), "top_k": str(K),
        "norm_topk_prob": "true", "deq_source": ",".join(sorted(set(deq_source))), "y_source": y_source, "quantization_config": json.dumps(qc),
        "expert_keys": json.dumps(expert_keys)}
path = os.path.join(OUT, "qwen3_moe_fp8_layer0.safetensors")

# The whole quantized checkpoint, and f32 logits of the model on its dequantized weights.
import shutil
ck = os.path.join(OUT, "checkpoint")
os.makedirs(ck, exist_ok=True)
for fn in os.listdir(qdir):
    if fn.endswith(".json") or fn.endswith(".safetensors"):
        shutil.copy(os.path.join(qdir, fn), os.path.join(ck, fn))
ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
qmods = dict(qmodel.named_modules())
replaced = []
with torch.no_grad():
    for name, mod in ref.named_modules():
        q = qmods.get(name)
        if q is None:
            continue
        qw = getattr(q, "weight", None)
        qs = getattr(q, "weight_scale_inv", None)
        if isinstance(qw, torch.Tensor) and qw.dtype == torch.float8_e4m3fn and qs is not None:
            mod.weight.copy_(dequant(qw.detach(), qs.detach()))
            replaced.append(name)
    rexp = ref.model.layers[0].mlp.experts
    for pname in ("gate_up_proj", "down_proj"):
        tgt = getattr(rexp, pname)
        src_w = deq_all[pname]
        tgt.copy_(src_w if tgt.shape == src_w.shape else src_w.transpose(1, 2))
        replaced.append("experts." + pname)
    print("dequantized into the f32 reference:", replaced)
    ids = torch.tensor([[3, 17, 42, 8, 63, 1, 29, 50, 11, 7, 36, 22]])
    ref_logits = ref(input_ids=ids).logits[0].float().contiguous()
save_file({"ids": ids[0].to(torch.int32).contiguous(), "logits": ref_logits},
          os.path.join(OUT, "checkpoint_reference.safetensors"),
          metadata={"dequantized": json.dumps(replaced), "transformers": transformers.__version__})
print("checkpoint files:", os.listdir(ck))
save_file(fixture, path, metadata=meta)
print("wrote", path, os.path.getsize(path), "bytes")
for k, v in sorted(fixture.items()):
    print(f"  {k} {tuple(v.shape)} {v.dtype}")
