#!/usr/bin/env python3
"""Summarises `nsys stats --report cuda_gpu_kern_sum --format csv` read from stdin: the total
GPU kernel time and the kernels that took the most of it (scripts/gpu-check uses it)."""
import csv
import sys

top = int(sys.argv[1]) if len(sys.argv) > 1 else 14
rows = list(csv.DictReader(line for line in sys.stdin if line.count(",") > 3))
if not rows:
    sys.exit("nsys_top: no kernel rows on stdin")
total = sum(float(r["Total Time (ns)"]) for r in rows)
launches = sum(int(r["Instances"]) for r in rows)
print(f"total kernel time {total / 1e6:.1f} ms over {launches} launches")
for r in rows[:top]:
    print(f"{float(r['Total Time (ns)']) / 1e6:8.2f} ms {int(r['Instances']):6d}x  {r['Name'][:110]}")
