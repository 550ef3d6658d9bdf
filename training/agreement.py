"""Agreement of two exported models on a labelled JSONL file (a sanity figure, not quality).

Both models are run through onnxruntime, each pair alone (batch 1), on the input contract of
models/README.md (`carewall_model.encode_pair`). Prints argmax agreement and |delta p|. When
both models were trained on DATA, neither's accuracy there measures quality.

    python training/agreement.py --a OLD_MODEL_DIR --b NEW_MODEL_DIR [--data dev.jsonl]
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from carewall_model import Contract, encode_pairs  # noqa: E402
from export_onnx import run_onnx, session  # noqa: E402


def probs(model_dir: Path, rows):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    c = Contract()
    enc = encode_pairs(tok, [(r["context"], r["response"]) for r in rows], c)
    sess = session(model_dir / "model.onnx", 2)
    logits = np.concatenate([run_onnx(sess, [e], c.pad_id) for e in enc]).astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", type=Path, required=True)
    ap.add_argument("--b", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=HERE / "data/dialogue-safety/dev.jsonl")
    args = ap.parse_args()
    rows = [json.loads(l) for l in args.data.read_text(encoding="utf-8").splitlines() if l.strip()]
    pa, pb = probs(args.a, rows), probs(args.b, rows)
    d = np.abs(pa - pb)
    safe = 7
    print(json.dumps({"n": len(rows), "argmax_agreement": float((pa.argmax(1) == pb.argmax(1)).mean()),
                      "safe_vs_unsafe_agreement": float(((pa.argmax(1) == safe) == (pb.argmax(1) == safe)).mean()),
                      "mean_abs_prob_diff": float(d.mean()), "max_abs_prob_diff": float(d.max())}))


if __name__ == "__main__":
    main()
