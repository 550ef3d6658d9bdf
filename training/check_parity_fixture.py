"""Independent check of models/carewall-safety/parity.json against the shipped files.

Re-implements the input contract from carewall-model.json alone (no torch, no training
code), as the Rust side must, and compares ids and onnxruntime logits with the fixture.

    python training/check_parity_fixture.py [--model models/carewall-safety]
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def encode(tok, meta, context, response):
    ctx = tok.encode(context, add_special_tokens=False).ids if context else []
    rsp = (tok.encode(response, add_special_tokens=False).ids if response else [])[: meta["max_response_tokens"]]
    room = max(0, meta["max_length"] - 4 - len(rsp))
    ctx = ctx[max(0, len(ctx) - room):] if room else []
    ids = [meta["cls_id"]] + ctx + [meta["sep_id"]] * 2 + rsp + [meta["sep_id"]]
    return ids, [0] * (len(ctx) + 3) + [1] * (len(rsp) + 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path(__file__).resolve().parent.parent / "models/carewall-safety")
    args = ap.parse_args()
    meta = json.loads((args.model / "carewall-model.json").read_text())
    fx = json.loads((args.model / "parity.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(args.model / "model.onnx"), so, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == meta["inputs"], [i.name for i in sess.get_inputs()]
    worst = 0.0
    mid = 0  # cases whose whole context fits but is longer than half the room
    for case in fx["cases"]:
        n_ctx = len(tok.encode(case["context"], add_special_tokens=False).ids) if case["context"] else 0
        n_rsp = case["token_type_ids"].count(1) - 1
        room = meta["max_length"] - 4 - n_rsp
        mid += room / 2 < n_ctx < room
        ids, tt = encode(tok, meta, case["context"], case["response"])
        if ids != case["input_ids"] or tt != case["token_type_ids"]:
            sys.exit(f"case {case['id']}: ids differ from the fixture")
        feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
                "token_type_ids": np.array([tt], np.int64)}
        out = sess.run(["logits"], feed)[0][0]
        worst = max(worst, float(np.abs(out - np.array(case["logits"])).max()))
    print(f"{len(fx['cases'])} cases: ids identical, max |logit diff| {worst:.2e} (tolerance {fx['tolerance']}), "
          f"{mid} with room/2 < len(ctx) < room")
    if mid == 0:
        sys.exit("no case with room/2 < len(ctx) < room: the fixture does not cover a whole, mid-length context")
    if worst > fx["tolerance"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
