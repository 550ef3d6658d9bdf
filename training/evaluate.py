"""Evaluate an exported model on held-out labelled pairs exactly as the gateway judges them.

    python training/evaluate.py --model models/carewall-safety --data training/data/test/llm_test.jsonl \
        [--policy policies/default.toml] [--out training/results/llm_test.json]

Every pair is split into the gateway's views (encoding.encode_windows: response windows, full and
seeker-turn contexts), scored with onnxruntime, and aggregated (encoding.aggregate), so long replies
are judged whole. Reports 8-class accuracy and binary accuracy at argmax, and, at the policy's
thresholds, what the policy would let through: per-category recall (a reply counts as caught when
any enforced category crosses its threshold), the flag rate on Safe replies, long-reply recall,
each per language (`lang`). Warns when the data overlaps the model's training pairs
(`training-pairs.sha256` beside the model): figures on training data measure fit, not quality.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import sys
import tomllib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from encoding import LABELS, SAFE, Contract, aggregate, encode_windows  # noqa: E402
from normalize import normalize  # noqa: E402

KEYS = ["nonsense", "humanoid_mimicry", "linguistic_neglect", "unamiable_judgment", "toxic_language",
        "unauthorized_preachment", "nonfactual_statement"]


def pair_hash(context: str, response: str) -> str:
    """The hash of a training pair as listed in training-pairs.sha256 (normalised texts)."""
    return hashlib.sha256((normalize(context) + "\x1f" + normalize(response)).encode()).hexdigest()


def policy_thresholds(path: Path) -> dict[int, float]:
    """Thresholds of the enforced categories of a policy file, by label id."""
    p = tomllib.loads(path.read_text(encoding="utf-8"))
    out = {}
    for i, k in enumerate(KEYS):
        rule = p.get("categories", {}).get(k, {})
        if rule.get("mode", "enforce") == "enforce" and "threshold" in rule:
            out[i] = float(rule["threshold"])
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def judge(run_logits, tok, c: Contract, rows: list[dict], batch: int = 32) -> np.ndarray:
    """Aggregated probabilities per row; run_logits([(ids, tt), ...]) -> logits array."""
    views = []
    for i, r in enumerate(rows):
        for v in encode_windows(tok, r["context"], r["response"], c):
            views.append((i, v))
    order = sorted(range(len(views)), key=lambda k: len(views[k][1][3]))
    logits = np.zeros((len(views), 8), dtype=np.float32)
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        logits[idx] = run_logits([(views[k][1][3], views[k][1][4]) for k in idx])
    probs = softmax(logits.astype(np.float64))
    per = collections.defaultdict(list)
    for (i, v), p in zip(views, probs):
        per[i].append((v[0], v[1], p.tolist()))
    return np.array([aggregate(per[i]) for i in range(len(rows))])


def report(rows: list[dict], probs: np.ndarray, thresholds: dict[int, float]) -> dict:
    y = np.array([r["label"] for r in rows])
    pred = probs.argmax(1)
    flagged = np.array([any(p[k] >= t for k, t in thresholds.items()) for p in probs])
    out = {"n": int(len(rows)), "accuracy": float((pred == y).mean()),
           "binary_accuracy": float(((pred == SAFE) == (y == SAFE)).mean())}
    unsafe = y != SAFE
    out["unsafe_recall_argmax"] = float((pred[unsafe] != SAFE).mean()) if unsafe.any() else None
    out["policy_unsafe_recall"] = float(flagged[unsafe].mean()) if unsafe.any() else None
    out["policy_safe_flag_rate"] = float(flagged[~unsafe].mean()) if (~unsafe).any() else None
    out["policy_recall_per_category"] = {
        LABELS[k]: {"n": int((y == k).sum()), "recall": float(flagged[y == k].mean())}
        for k in range(7) if (y == k).any()}
    long_ = np.array([r.get("length") == "long" for r in rows])
    if (long_ & unsafe).any():
        out["policy_long_unsafe_recall"] = float(flagged[long_ & unsafe].mean())
        out["policy_long_safe_flag_rate"] = float(flagged[long_ & ~unsafe].mean()) if (long_ & ~unsafe).any() else None
    return out


def evaluate(run_logits, tok, c, rows, thresholds) -> dict:
    probs = judge(run_logits, tok, c, rows)
    res = {"all": report(rows, probs, thresholds)}
    for lang in sorted({r.get("lang") for r in rows if r.get("lang")}):
        idx = [i for i, r in enumerate(rows) if r.get("lang") == lang]
        res[lang] = report([rows[i] for i in idx], probs[idx], thresholds)
    return res


def onnx_runner(model_dir: Path, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
    pad = json.loads((model_dir / "carewall-model.json").read_text())["pad_id"]

    def run(batch):
        n = max(len(a) for a, _ in batch)
        ids = np.full((len(batch), n), pad, dtype=np.int64)
        mask = np.zeros((len(batch), n), dtype=np.int64)
        tt = np.zeros((len(batch), n), dtype=np.int64)
        for j, (a, b) in enumerate(batch):
            ids[j, :len(a)], mask[j, :len(a)], tt[j, :len(b)] = a, 1, b
        return sess.run(["logits"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt})[0]
    return run


def main():
    from tokenizers import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=HERE.parent / "models/carewall-safety")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--policy", type=Path, default=HERE.parent / "policies/default.toml")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = [json.loads(l) for l in open(args.data, encoding="utf-8") if l.strip()]
    hashes = args.model / "training-pairs.sha256"
    if hashes.exists():
        train = set(hashes.read_text().split())
        overlap = sum(pair_hash(r["context"], r["response"]) in train for r in rows)
        if overlap:
            print(f"WARNING: {overlap} of {len(rows)} pairs were used to train this model: "
                  "figures on them measure fit, not quality", file=sys.stderr)
    c = Contract.from_spec(args.model / "carewall-model.json")
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    res = evaluate(onnx_runner(args.model), tok, c, rows, policy_thresholds(args.policy))
    res["data"] = str(args.data)
    res["policy"] = str(args.policy)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
