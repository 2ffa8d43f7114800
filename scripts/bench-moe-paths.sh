#!/usr/bin/env bash
# bench moe, hooks vs fast LoRA path, for the given expert formats (device).
# Usage: scripts/bench-moe-paths.sh BIN OUT_DIR dtype [dtype ...]
# PATHS: LoRA paths (default "hooks fast"); "inlineCkS" = --path inline --inline-splits C
# --inline-k-splits S (S 0: by batch size); "directC" = --path direct --direct-cluster C;
# a "hi" suffix adds --side-priority high.
# LORAS, BATCHES: override the settings and batch sizes.
set -uo pipefail
BIN=$1; OUT=$2; shift 2
mkdir -p "$OUT"
for dt in "$@"; do
  for path in ${PATHS:-hooks fast}; do
    p=${path%hi}
    args=(--path "$p")
    case $p in
      inline*k*) c=${p#inline}; args=(--path inline --inline-splits "${c%k*}" --inline-k-splits "${p##*k}");;
      inline[0-9]*) args=(--path inline --inline-splits "${p#inline}");;
      direct[0-9]*) args=(--path direct --direct-cluster "${p#direct}");;
    esac
    [ "$p" != "$path" ] && args+=(--side-priority high)
    timeout 200 "$BIN" bench moe --dtype "$dt" "${args[@]}" --lora "${LORAS:-none,r16x1,r16x4,r64x1}" \
      ${BATCHES:+--batches $BATCHES} --json "$OUT/moe_${dt}_${path}.json" > "$OUT/moe_${dt}_${path}.log" 2>&1
    echo "== $dt $path rc=$?"
  done
  python3 - $(for p in ${PATHS:-hooks fast}; do echo "$OUT/moe_${dt}_$p.json"; done) <<'PY'
import json, sys
rows = {}
for f in sys.argv[1:]:
    j = json.load(open(f))
    path = f.rsplit("_", 1)[1][:-5]
    for r in j["results"]:
        rows.setdefault((r["batch"], r["lora"]), {})[path] = r["us_per_layer"]
paths = sorted({p for v in rows.values() for p in v})
print(f"{'batch':>5} {'lora':>6} " + " ".join(f"{p:>9}" for p in paths))
for (b, l), v in sorted(rows.items()):
    print(f"{b:5d} {l:>6} " + " ".join(f"{v.get(p, float('nan')):9.1f}" for p in paths))
PY
done
