#!/usr/bin/env python3
"""Rust vs Python probabilities on a whole JSONL file (a wider net than parity.json).

    carewall classify --model-dir M --max-batch 1 --threads 1 < DATA > /tmp/rust.jsonl
    python3 benches/python_parity.py --model-dir M --data DATA --rust /tmp/rust.jsonl

Python side: `tokenizers` + `onnxruntime`, batch 1, the input contract of models/README.md
(see `assemble` in python_baseline.py). Exits non-zero if any probability differs by more
than --tolerance.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from python_baseline import assemble  # noqa: E402

KEYS = ["nonsense", "humanoid_mimicry", "linguistic_neglect", "unamiable_judgment",
        "toxic_language", "unauthorized_preachment", "nonfactual_statement", "safe_response"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--rust", type=Path, required=True, help="output of `carewall classify`")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    a = ap.parse_args()
    c = json.loads((a.model_dir / "carewall-model.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_file(str(a.model_dir / "tokenizer.json"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(a.model_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
    rows = [json.loads(l) for l in a.data.read_text(encoding="utf-8").splitlines() if l.strip()]
    rust = [json.loads(l) for l in a.rust.read_text(encoding="utf-8").splitlines() if l.strip()]
    assert len(rows) == len(rust), f"{len(rows)} data lines but {len(rust)} Rust verdicts"
    worst, agree = 0.0, 0
    for r, v in zip(rows, rust):
        ctx = tok.encode(r.get("context", ""), add_special_tokens=False).ids
        rsp = tok.encode(r["response"], add_special_tokens=False).ids
        ids, tt = assemble(ctx, rsp, c, c["max_length"], c["max_response_tokens"])
        feed = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}
        if "token_type_ids" in c["inputs"]:
            feed["token_type_ids"] = np.array([tt])
        logits = sess.run([c["output"]], feed)[0][0].astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        worst = max(worst, max(abs(v["scores"][k] - p[i]) for i, k in enumerate(KEYS)))
        agree += KEYS.index(v["category"]) == int(p.argmax())
    print(json.dumps({"n": len(rows), "max_abs_prob_diff": worst, "top_category_agree": agree}))
    sys.exit(0 if worst <= a.tolerance else 1)


if __name__ == "__main__":
    main()
