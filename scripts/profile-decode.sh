#!/usr/bin/env bash
# Per-kernel GPU time of whole-model decode steps under Nsight Compute (device): the first
# kernels of the first (eager, hooks path) step of `bench decode` after the random weights
# (fill kernels skipped), aggregated by kernel name. Kernels are serialized and timed alone.
# Usage: scripts/profile-decode.sh BIN OUT_DIR COUNT "bench decode args" [more ...]
set -uo pipefail
BIN=$1; OUT=$2; COUNT=$3; shift 3
mkdir -p "$OUT"
i=0
for args in "$@"; do
  i=$((i + 1))
  # shellcheck disable=SC2086
  timeout 200 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
    --kernel-name regex:'^(?!fill)' --launch-count "$COUNT" \
    "$BIN" bench decode --steps 1 --warmup 1 --path ${DECODE_PATH:-hooks} $args > "$OUT/ncu_$i.csv" 2> "$OUT/ncu_$i.err"
  echo "== $args (rc $?)"
  python3 - "$OUT/ncu_$i.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows: print("  no rows"); sys.exit()
h = rows[0]; ki = h.index("Kernel Name"); vi = h.index("Metric Value"); gi = h.index("Grid Size") if "Grid Size" in h else None
agg = collections.OrderedDict(); total = 0.0
for r in rows[1:]:
    key = (r[ki].split("(")[0].split("<")[0][:50], r[gi] if gi is not None else "")
    v = float(r[vi].replace(",", "")); total += v
    agg.setdefault(key, []).append(v)
for (k, g), v in sorted(agg.items(), key=lambda kv: -sum(kv[1])):
    v.sort()
    print(f"  {k:50s} grid {g:16s} n={len(v):4d} median {v[len(v)//2]/1000:8.2f} us sum {sum(v)/1000:9.1f} us")
print(f"  total {total/1000:.1f} us over {len(rows)-1} kernels")
PY
done
