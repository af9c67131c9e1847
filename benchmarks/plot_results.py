"""Plot the JSON lines written by train_throughput.py: tokens/s and MFU per case, one bar per run.

python benchmarks/plot_results.py benchmarks/data/h100_train_throughput_mbs8.jsonl \
    benchmarks/data/h100_train_throughput_mbs16.jsonl --out docs/img/train_throughput.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", default="benchmarks/results/train_throughput.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for path in args.results for line in Path(path).read_text().splitlines() if line]
    rows = [r for r in rows if r["case"] in ("hf", "mfu")]
    labels = [f"{'ours (GPT-2 124M)' if r['name'].startswith('Trainer') else r['name']}\n"
              f"{r['case']}, micro batch {r['micro_batch']}" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 0.55 * len(rows) + 1.5))
    colours = ["tab:orange" if "transformers" in r["name"] else "tab:blue" for r in rows]
    left.barh(labels, [r["tokens_per_s"] / 1e3 for r in rows], color=colours)
    left.set_xlabel("thousand tokens/s")
    left.invert_yaxis()
    right.barh(labels, [100 * r.get("mfu", 0.0) for r in rows], color=colours)
    right.set_xlabel("MFU (%) of 989 TFLOP/s bf16")
    right.invert_yaxis()
    right.set_yticklabels([])
    fig.suptitle(f"Training throughput, {rows[0]['hardware']}, bf16, seq 1024 (blue: ours, orange: transformers)")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
