#!/usr/bin/env bash
# Per-kernel GPU time of one MoE layer call under Nsight Compute (device; kernels serialized,
# caches flushed before each, so each kernel's time is its cold, stand-alone duration).
# Usage: scripts/profile-layer.sh BIN OUT_DIR "bench args" [more "bench args" ...]
set -uo pipefail
BIN=$1; OUT=$2; shift 2
mkdir -p "$OUT"
i=0
for args in "$@"; do
  i=$((i + 1))
  # shellcheck disable=SC2086
  timeout 240 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
    --launch-count 400 "$BIN" bench moe --layers 1 --repeats 2 $args > "$OUT/ncu_$i.csv" 2> "$OUT/ncu_$i.err"
  echo "== $args (rc $?)"
  python3 - "$OUT/ncu_$i.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows: print("  no rows"); sys.exit()
h = rows[0]; ki = h.index("Kernel Name"); vi = h.index("Metric Value"); gi = h.index("Grid Size") if "Grid Size" in h else None
agg = collections.OrderedDict()
for r in rows[1:]:
    key = (r[ki].split("(")[0][:60], r[gi] if gi is not None else "")
    agg.setdefault(key, []).append(float(r[vi].replace(",", "")))
for (k, g), v in agg.items():
    v.sort()
    print(f"  {k:60s} grid {g:16s} n={len(v):3d} median {v[len(v)//2]/1000:8.2f} us")
PY
done
