"""Cross-validate several configurations in parallel (one process each), pick the best by
mean CV accuracy, then train the final model with it.

    python training/sweep.py --out DIR [--configs NAME ...] [--final-out models/carewall-safety]

Every configuration's CV result lands in DIR/<name>/cv.json and DIR/sweep.json lists
them all: the choice among them is a hyper-parameter chosen by CV, reported as such.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CONFIGS = {
    "d4_aux": ["--depth", "4"],
    "d4_noaux": ["--depth", "4", "--aux-pairs", "0"],
    "d3_aux": ["--depth", "3"],
    "d2_aux": ["--depth", "2"],
    "d6_aux": ["--depth", "6"],
    "d4_aux_cw": ["--depth", "4", "--class-weight-power", "0.5"],
    "d4_aux_long": ["--depth", "4", "--epochs", "20", "--lr", "3e-5", "--label-smoothing", "0.1"],
    "d4_aux_big": ["--depth", "4", "--aux-batch", "64", "--aux-weight", "1.0"],
    "d2_cw_long": ["--depth", "2", "--epochs", "20", "--lr", "3e-5", "--label-smoothing", "0.1",
                   "--class-weight-power", "0.5"],
    "d2_lr_long": ["--depth", "2", "--epochs", "20", "--lr", "1e-4", "--label-smoothing", "0.1"],
    "d2_bigram_long": ["--depth", "2", "--epochs", "20", "--lr", "3e-5", "--label-smoothing", "0.1",
                       "--lex-bigrams", "50000"],
    "d2_auxw_long": ["--depth", "2", "--epochs", "20", "--lr", "3e-5", "--label-smoothing", "0.1",
                     "--aux-weight", "1.5", "--aux-batch", "48"],
    "d2_noaux_long": ["--depth", "2", "--epochs", "20", "--lr", "3e-5", "--label-smoothing", "0.1",
                      "--aux-pairs", "0"],
    "d2_aux_long": ["--depth", "2", "--epochs", "20", "--lr", "3e-5", "--label-smoothing", "0.1"],
    "d3_aux_long": ["--depth", "3", "--epochs", "20", "--lr", "3e-5", "--label-smoothing", "0.1"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--max-depth", type=int, default=4, help="only configs this shallow may be shipped (latency)")
    ap.add_argument("--final-out", type=Path, default=None)
    ap.add_argument("--also-final", nargs="*", default=[], help="configs to train a final model for as well")
    ap.add_argument("--early-final", nargs="*", default=[],
                    help="configs whose final model is trained right away, alongside the CV runs")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="arguments passed to every train.py run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    procs = {}
    finals = {}

    def start_final(name):
        d = args.out / name
        d.mkdir(exist_ok=True)
        cmd = [sys.executable, str(HERE / "train.py"), "--out", str(args.final_out), "--results", str(d),
               "--no-cv", "--no-export"] + CONFIGS[name] + args.extra
        finals[name] = subprocess.Popen(cmd, stdout=open(d / "final_log.txt", "w"), stderr=subprocess.STDOUT,
                                        env=dict(os.environ, OMP_NUM_THREADS="2"))

    for name in args.early_final:
        start_final(name)
    for name in args.configs:
        d = args.out / name
        d.mkdir(exist_ok=True)
        cmd = [sys.executable, str(HERE / "train.py"), "--out", str(d / "model"), "--results", str(d),
               "--cv-only"] + CONFIGS[name] + args.extra
        procs[name] = subprocess.Popen(cmd, stdout=open(d / "log.txt", "w"), stderr=subprocess.STDOUT, env=env)
        time.sleep(1)
    for name, p in procs.items():
        p.wait()
        print(name, "exit", p.returncode, flush=True)
    table = {}
    full = {}
    for name in args.configs:
        f = args.out / name / "cv.json"
        if f.exists():
            full[name] = json.loads(f.read_text())
            s = full[name]["summary"]
            table[name] = {k: [round(v["mean"], 4), round(v["sd"], 4)] for k, v in s.items()}
            print(f"{name:14s} acc {s['accuracy']['mean']:.3f}±{s['accuracy']['sd']:.3f} "
                  f"bin {s['binary_accuracy']['mean']:.3f} unsafe_rec {s['unsafe_recall']['mean']:.3f} "
                  f"wF1 {s['weighted_f1']['mean']:.3f} mF1 {s['macro_f1']['mean']:.3f}", flush=True)
    ok = {n: t for n, t in table.items() if int(CONFIGS[n][CONFIGS[n].index("--depth") + 1]) <= args.max_depth}
    best = max(ok, key=lambda n: (ok[n]["accuracy"][0], ok[n]["binary_accuracy"][0])) if ok else None
    (args.out / "sweep.json").write_text(json.dumps({"table": table, "chosen": best, "cv": full,
                                                     "configs": {n: CONFIGS[n] for n in args.configs},
                                                     "rule": f"max mean CV accuracy among depth <= {args.max_depth}"},
                                                    indent=1))
    print("chosen:", best, flush=True)
    if best and args.final_out:
        for name in dict.fromkeys([best] + [n for n in args.also_final if n in table]):
            if name not in finals:
                start_final(name)
    for name, p in finals.items():
        print("final", name, "exit", p.wait(), flush=True)


if __name__ == "__main__":
    main()
