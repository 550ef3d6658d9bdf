"""Latency of candidate encoder depths (int8 ONNX, 2 intra-op threads); chooses the depth.

Usage: python training/bench_depth.py --ckpt training/.work/e5-pruned --depths 2 3 4 6
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from carewall_model import Classifier, Contract, Head, encode_pair, load_encoder, pad_batch  # noqa: E402
from export_onnx import export_fp32, quantize_int8, session  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4, 6])
    ap.add_argument("--work", type=Path, default=Path("training/.work/bench"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(args.ckpt / "tokenizer.json"))
    c = Contract()
    data = [json.loads(l) for l in open(Path(__file__).resolve().parent / "data/dialogue-safety/dev.jsonl", encoding="utf-8")]
    rows = [encode_pair(tok, r["context"], r["response"], c) for r in data]
    lens = np.array([len(r[0]) for r in rows])
    print(f"dev pair lengths: p50 {np.percentile(lens,50):.0f} p90 {np.percentile(lens,90):.0f} max {lens.max()}")
    full = [r for r in rows if len(r[0]) == c.max_length][:20]
    print(f"{len(full)} dev pairs hit the 256-token cap")
    res = {}
    for d in args.depths:
        enc = load_encoder(args.ckpt, d)
        model = Classifier(enc, Head(384, enc.word.num_embeddings)).eval()
        f32, i8 = args.work / f"d{d}.onnx", args.work / f"d{d}.int8.onnx"
        export_fp32(model, f32, enc.word.num_embeddings)
        quantize_int8(f32, i8)
        sess = session(i8, 2)
        ids, mask, tt = pad_batch([full[0]], c.pad_id)
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": tt.numpy()}
        for _ in range(5):
            sess.run(None, feed)
        t = []
        for _ in range(30):
            s = time.perf_counter(); sess.run(None, feed); t.append(time.perf_counter() - s)
        t256 = float(np.median(t) * 1000)
        t = []
        for r in rows[::4]:
            ids, mask, tt = pad_batch([r], c.pad_id)
            s = time.perf_counter()
            sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": tt.numpy()})
            t.append(time.perf_counter() - s)
        res[d] = {"p50_ms_256tok": t256, "p50_ms_dev": float(np.median(t) * 1000),
                  "mb_int8": i8.stat().st_size / 1e6}
        print(d, res[d], flush=True)
    (args.work / "depth.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
