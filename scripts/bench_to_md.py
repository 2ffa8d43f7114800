#!/usr/bin/env python3
"""Renders `moelora bench moe --json` results as a markdown table (for BENCHMARKS.md)."""
import json
import sys

for path in sys.argv[1:]:
    j = json.load(open(path))
    print(f"**{j['shape']}**, {j['dtype']}, backend `{j['backend']}`, {j['device']}, "
          f"copy bandwidth {j['copy_bandwidth_GBps']:.0f} GB/s, {j['date']} "
          f"(`{path.split('/')[-1]}`)\n")
    by_batch = {}
    settings = []
    for r in j["results"]:
        by_batch.setdefault(r["batch"], {})[r["lora"]] = r
        if r["lora"] not in settings:
            settings.append(r["lora"])
    head = "| batch | " + " | ".join(
        f"{s} µs" + (" (% roofline)" if s == "none" else " (ratio)") for s in settings) + " | roofline µs (none) |"
    print(head)
    print("|" + "---|" * (len(settings) + 2))
    for b in sorted(by_batch):
        cells = []
        for s in settings:
            r = by_batch[b].get(s)
            if r is None:
                cells.append("-")
            elif s == "none":
                cells.append(f"{r['us_per_layer']:.1f} ({r['pct_roofline']:.0f}%)")
            else:
                ratio = r.get("lora_over_base")
                cells.append(f"{r['us_per_layer']:.1f} ({ratio:.2f})" if ratio else f"{r['us_per_layer']:.1f}")
        roof = by_batch[b].get("none", {}).get("roofline_us", float("nan"))
        print(f"| {b} | " + " | ".join(cells) + f" | {roof:.1f} |")
    print()
