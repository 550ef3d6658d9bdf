"""Derive per-category policy thresholds from held-out labelled pairs, and report them.

    python training/thresholds.py --model models/carewall-safety --data training/data/test/llm_test.jsonl \
        --half calibrate [--budget 0.012] [--out training/results/thresholds.json]

The LLM-style test set is split in two halves by id (`--half calibrate`: even hash, `--half report`:
odd hash). Thresholds are chosen on the calibration half only; the figures that go into the model
card are then measured on the other half (`--half report`, with `evaluate.py`-style policy figures),
so the reported numbers are not tuned on the pairs they are reported on.

Rule (`--mode joint`, default): start every unsafe category at 0.95 and repeatedly lower by one
0.05 step the threshold that buys the most unsafe recall (a reply counts as caught when any
category crosses its threshold) per unit of Safe-reply flag rate, while the total share of Safe
replies flagged stays within `--target` (and no threshold goes below 0.15).
`--mode per-category`: the lowest threshold at which at most `budget` of the Safe pairs have
P(c) >= t, independently per category.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from encoding import LABELS, SAFE, Contract  # noqa: E402
from evaluate import judge, onnx_runner  # noqa: E402


def half_of(row_id: str) -> str:
    return "calibrate" if int(hashlib.sha256(str(row_id).encode()).hexdigest(), 16) % 2 == 0 else "report"


def main():
    from tokenizers import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=HERE.parent / "models/carewall-safety")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--half", choices=["calibrate", "report", "all"], default="calibrate")
    ap.add_argument("--budget", type=float, default=0.012, help="share of Safe pairs one category may flag")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--mode", choices=["joint", "per-category"], default="joint")
    ap.add_argument("--target", type=float, default=0.08, help="joint: total Safe flag rate allowed")
    ap.add_argument("--floor", type=float, default=0.15)
    args = ap.parse_args()
    rows = [json.loads(l) for l in open(args.data, encoding="utf-8") if l.strip()]
    if args.half != "all":
        rows = [r for r in rows if half_of(r["id"]) == args.half]
    c = Contract.from_spec(args.model / "carewall-model.json")
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    probs = judge(onnx_runner(args.model), tok, c, rows)
    y = np.array([r["label"] for r in rows])
    safe = y == SAFE
    grid = np.round(np.arange(0.15, 0.951, 0.05), 2)
    out = {"data": str(args.data), "half": args.half, "n": len(rows), "budget": args.budget, "categories": {}}
    if args.mode == "joint":
        th = np.full(7, 0.95)

        def rates(t):
            flag = (probs[:, :7] >= t).any(1)
            return float(flag[~safe].mean()), float(flag[safe].mean())
        rec, fl = rates(th)
        while True:
            best, best_gain = None, 0.0
            for k in range(7):
                for t in grid[grid < th[k] - 1e-9]:
                    if t < args.floor - 1e-9:
                        continue
                    t2 = th.copy()
                    t2[k] = float(t)
                    r2, f2 = rates(t2)
                    if f2 > args.target + 1e-9:
                        continue
                    gain = (r2 - rec) / max(f2 - fl, 1e-3)
                    if r2 > rec and gain > best_gain:
                        best, best_gain = (k, t2, r2, f2), gain
            if best is None:
                break
            _, th, rec, fl = best
        out["mode"] = "joint"
        out["target"] = args.target
        out["unsafe_recall"], out["safe_flag_rate"] = rec, fl
        for k in range(7):
            own = y == k
            out["categories"][LABELS[k]] = {
                "threshold": float(th[k]), "n": int(own.sum()),
                "caught_any_category": float((probs[own, :7] >= th).any(1).mean()) if own.any() else None,
                "safe_flag_rate_own": float((probs[safe, k] >= th[k]).mean())}
        print(json.dumps(out, indent=1))
        if args.out:
            args.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
        return
    for k in range(7):
        best = None
        for t in grid:
            flag = float((probs[safe, k] >= t).mean()) if safe.any() else 0.0
            if flag <= args.budget:
                best = float(t)
                break
        best = best if best is not None else float(grid[-1])
        rec = float((probs[y == k, k] >= best).mean()) if (y == k).any() else None
        out["categories"][LABELS[k]] = {"threshold": best, "recall_own_category": rec,
                                        "safe_flag_rate": float((probs[safe, k] >= best).mean()),
                                        "n": int((y == k).sum())}
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
