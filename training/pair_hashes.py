"""Write the hash list of a model's training pairs (`training-pairs.sha256` beside the model).

    python training/pair_hashes.py --out models/carewall-safety/training-pairs.sha256 \
        --holdout-fold 0 --batches w01 w02 ... [--synthetic-per-class 30]

One SHA-256 per line of normalise(context) + U+001F + normalise(response) (`evaluate.pair_hash`,
`carewall eval`'s `pair_hash`): the gold dev pairs the model was trained on (all, or all but
`--holdout-fold`, with the same folds as train.py), the synthetic rows, and the team-corpus rows
of the given batches. `carewall eval` and `training/evaluate.py` warn when evaluation data
overlaps it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from data_prep import CORPUS, DEFAULT_SMILECHAT, DEV, load_corpus, load_labelled, synthetic  # noqa: E402
from evaluate import pair_hash  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--holdout-fold", type=int, default=None)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", nargs="*", default=None, help="team batches used (default: every corpus file)")
    ap.add_argument("--synthetic-per-class", type=int, default=30)
    ap.add_argument("--smilechat", type=Path, default=Path(os.environ.get("CAREWALL_SMILECHAT", DEFAULT_SMILECHAT)))
    args = ap.parse_args()
    gold = load_labelled(DEV)
    if args.holdout_fold is not None:
        from sklearn.model_selection import StratifiedKFold

        y = np.array([r["label"] for r in gold])
        tr, _ = list(StratifiedKFold(n_splits=args.folds, shuffle=True, random_state=args.seed)
                     .split(np.zeros(len(y)), y))[args.holdout_fold]
        gold = [gold[i] for i in tr]
    rows = gold + (synthetic(args.smilechat, args.synthetic_per_class) if args.synthetic_per_class else [])
    team = load_corpus(CORPUS)
    if args.batches is not None:
        team = [r for r in team if str(r["id"]).split("-")[0] in set(args.batches)]
    rows += team
    hashes = sorted({pair_hash(r["context"], r["response"]) for r in rows})
    args.out.write_text("\n".join(hashes) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(hashes)} pairs ({len(gold)} gold, {len(team)} team)")


if __name__ == "__main__":
    main()
