"""Non-neural reference points on the 599 labelled pairs, with the same folds as train.py.

    python training/baselines.py [--oof training/results/oof_logits_shipped_recipe.npy]
        -> training/results/baselines.json

What it measures (stratified 5-fold CV, seed 0: the folds of `train.py --cv-only`):
 * a character 1-3-gram TF-IDF + logistic regression on the reply alone;
 * the same plus nine dense features (reply and last-seeker-turn length, single-turn
   context, number of turns, character overlap of the reply with the seeker's last turn
   and with the previous supporter turn, question endings, line breaks);
 * with --oof (the out-of-fold logits `train.py --cv-only` saves): the neural model, and
   the average of its probabilities with the lexical model's;
 * a learning curve of the lexical model (25/50/75/100% of each training fold, 3 fold
   seeds): how accuracy grows with labelled data, which is what limits this task.
Runs in a few minutes on 2 CPU cores; needs scikit-learn only (and numpy).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from data_prep import DEV, load_labelled  # noqa: E402

SAFE = 7
QUESTION_ENDS = ("?", "？", "吗", "呢")


def parse(ctx: str) -> list[tuple[str, str]]:
    return re.findall(r"\[(seeker|supporter)\]((?:(?!\[(?:seeker|supporter)\]).)*)", ctx, flags=re.S)


def untag(s: str) -> str:
    return s.replace("[supporter]", "").replace("[seeker]", "")


def dense_features(context: str, response: str) -> list[float]:
    turns = parse(context)
    r = untag(response)
    seeker = [t for role, t in turns if role == "seeker"]
    supporter = [t for role, t in turns if role == "supporter"]
    last_seeker = seeker[-1] if seeker else ""
    last_supporter = supporter[-1] if supporter else ""
    rs = set(r)
    return [np.log1p(len(r)), np.log1p(len(last_seeker)), float(len(turns) <= 1), np.log1p(len(turns)),
            len(set(last_seeker) & rs) / max(1, len(rs)), len(set(last_supporter) & rs) / max(1, len(rs)),
            float(r.rstrip("。").endswith(QUESTION_ENDS)), float(r.count("\\n") + r.count("\n")),
            float(last_seeker.rstrip("。").endswith(QUESTION_ENDS))]


def metrics(y, p) -> dict:
    y, p = np.asarray(y), np.asarray(p)
    unsafe = y != SAFE
    return {"accuracy": round(float((y == p).mean()), 4),
            "binary_accuracy": round(float(((y == SAFE) == (p == SAFE)).mean()), 4),
            "unsafe_recall": round(float((p[unsafe] != SAFE).mean()), 4)}


def main():
    from scipy.sparse import csr_matrix, hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEV)
    ap.add_argument("--oof", type=Path, default=None, help="out-of-fold logits saved by train.py --cv-only")
    ap.add_argument("--out", type=Path, default=HERE / "results/baselines.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    rows = load_labelled(args.data)
    y = np.array([r["label"] for r in rows])
    replies = [untag(r["response"]) for r in rows]
    dense = np.array([dense_features(r["context"], r["response"]) for r in rows])

    def features(tr, te, with_dense: bool):
        v = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2)
        xtr, xte = v.fit_transform([replies[i] for i in tr]), v.transform([replies[i] for i in te])
        if with_dense:
            s = StandardScaler().fit(dense[tr])
            xtr = hstack([xtr, csr_matrix(s.transform(dense[tr]))]).tocsr()
            xte = hstack([xte, csr_matrix(s.transform(dense[te]))]).tocsr()
        return xtr, xte

    def cv(with_dense: bool, c: float, seed: int = 0, frac: float = 1.0) -> np.ndarray:
        rng = np.random.RandomState(seed)
        oof = np.zeros((len(y), 8))
        for tr, te in StratifiedKFold(5, shuffle=True, random_state=seed).split(dense, y):
            tr = rng.permutation(tr)[: int(len(tr) * frac)]
            xtr, xte = features(tr, te, with_dense)
            m = LogisticRegression(C=c, max_iter=3000).fit(xtr, y[tr])
            oof[np.ix_(te, m.classes_)] = m.predict_proba(xte)
        return oof

    out: dict = {"n": int(len(y)), "folds": "StratifiedKFold(5, shuffle=True, random_state=0), as train.py"}
    lex_only = cv(False, 1.0)
    out["char_tfidf_lr_reply_only"] = metrics(y, lex_only.argmax(1))
    lex = cv(True, 3.0)
    out["char_tfidf_plus_dense_lr"] = metrics(y, lex.argmax(1))
    print("lexical:", out["char_tfidf_lr_reply_only"], "lexical+dense:", out["char_tfidf_plus_dense_lr"], flush=True)
    if args.oof:
        z = np.load(args.oof)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        out["neural_oof"] = metrics(y, p.argmax(1))
        out["average_neural_and_lexical"] = {str(w): metrics(y, (w * p + (1 - w) * lex).argmax(1))
                                             for w in (0.3, 0.5, 0.7)}
        print("neural:", out["neural_oof"], "averages:", out["average_neural_and_lexical"], flush=True)
    curve = {}
    for frac in (0.25, 0.5, 0.75, 1.0):
        accs = [metrics(y, cv(True, 3.0, seed, frac).argmax(1))["accuracy"] for seed in range(3)]
        curve[str(frac)] = {"train_pairs_per_fold": int(479 * frac), "accuracy_mean": round(float(np.mean(accs)), 4),
                            "accuracy_per_seed": accs}
        print("learning curve", frac, curve[str(frac)], flush=True)
    out["learning_curve_char_tfidf_plus_dense"] = curve
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
