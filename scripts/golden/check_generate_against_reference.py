#!/usr/bin/env python3
"""Runs `moelora generate --logits-out` on a golden fixture's prompts and compares its greedy
tokens and step logits with the transformers reference (reference.safetensors written by
make_lora_model_goldens.py / make_qwen3_moe_model_golden.py). Standard library only.

Usage: check_generate_against_reference.py MOELORA_BINARY FIXTURE_DIR [ADAPTER[:REF] ...]
  ADAPTER names FIXTURE_DIR/adapter_ADAPTER; REF the reference it must match (default ADAPTER)
  e.g. build/bin/moelora tests/fixtures/mixtral_tiny a a_per_expert:a b
"""
import array
import json
import struct
import subprocess
import sys
import tempfile


def reader(path):
    f = open(path, "rb")
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))

    def get(key):
        e = header[key]
        f.seek(8 + n + e["data_offsets"][0])
        a = array.array({"I32": "i", "F32": "f"}[e["dtype"]])
        a.frombytes(f.read(e["data_offsets"][1] - e["data_offsets"][0]))
        return list(a)
    return header, get


def main():
    binary, fixture = sys.argv[1], sys.argv[2]
    adapters = [a.split(":")[0] for a in sys.argv[3:]]
    refs = ["base"] + [(a.split(":") + [a])[1] for a in sys.argv[3:]]
    header, get = reader(f"{fixture}/reference.safetensors")
    prompts = sorted({k.split(".")[0] for k in header if k.endswith(".prompt")})
    tags = ["base"] + adapters
    args = [binary, "generate", "--model", f"{fixture}/model", "--use", ",".join(tags),
            "--max-new-tokens", "8", "--ignore-eos", "--logits-top-k", "0", "--kv-dtype", "f32"]
    for a in adapters:
        args += ["--adapter", f"{a}={fixture}/adapter_{a}"]
    bad = 0
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
        for p in prompts:
            ids = ",".join(map(str, get(f"{p}.prompt")))
            subprocess.run(args + ["--ids", ids, "--logits-out", out.name], check=True,
                           capture_output=True)
            for line, tag, rtag in zip(open(out.name), tags, refs):
                r = json.loads(line)
                toks = [s["token"] for s in r["steps"]]
                ref = get(f"{p}.{rtag}.tokens")
                lg = [x for s in r["steps"] for x in s["logits"]]
                rl = get(f"{p}.{rtag}.step_logits")
                err = max(abs(a - b) for a, b in zip(lg, rl)) / max(abs(b) for b in rl)
                ok = toks == ref
                bad += not ok
                print(f"{p} {tag} (vs {rtag}): tokens {'match' if ok else 'DIFFER'}; max |logit diff| / "
                      f"max |logit| = {err:.4f}")
    print("all greedy tokens match" if bad == 0 else f"{bad} request(s) differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
