"""Compare quantisations of the exported fp32 graph (how the shipped one was chosen).

    python training/quant_compare.py [fp32 dynamic embedding static] [--no-latency]

For each variant, on the 599 dev pairs: (a) batch independence, max |p_batched - p_alone|
with the pairs run alone and in shuffled (mixed-length) batches of 16; (b) argmax
agreement and |Δp| vs the fp32 PyTorch model, each pair alone; (c) p50/p90 batch-1
latency, p50 at 256 ids, batches-of-16 throughput (onnxruntime, 2 threads); (d) size.
Needs training/.work/d2_aux_long.pt (the shipped weights) and the pruned base checkpoint.
`dynamic` is the previous export (onnxruntime quantize_dynamic on MatMul/Gemm/Gather).
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train as T  # noqa: E402
from carewall_model import Contract, encode_pairs  # noqa: E402
from export_onnx import (batch_independence, export_fp32, latency, quantize_int8,  # noqa: E402
                         quantize_matmul_nbits, quantize_static_int8, run_onnx, session)

W = T.WORK / "quant"


def softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="*", default=["fp32", "dynamic", "embedding", "static"])
    ap.add_argument("--weights", type=Path, default=T.WORK / "d2_aux_long.pt")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "results/quant_compare.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    W.mkdir(parents=True, exist_ok=True)
    c = Contract()
    tok = Tokenizer.from_file(str(T.WORK / "e5-pruned/tokenizer.json"))
    data = [json.loads(l) for l in open(HERE / "data/dialogue-safety/dev.jsonl", encoding="utf-8")]
    rows = encode_pairs(tok, [(r["context"], r["response"]) for r in data], c)
    f32 = W / "fp32.onnx"
    saved = torch.load(args.weights, map_location="cpu")
    a = argparse.Namespace(ckpt=T.WORK / "e5-pruned", depth=saved["depth"], hidden=saved["hidden"], dropout=0.1,
                           lex_bigrams=saved.get("lex_bigrams", 0))
    m = T.build_model(a, tok.get_vocab_size())
    m.load_state_dict(saved["state_dict"], strict=False)
    temp = json.loads((HERE / "results/cv.json").read_text())["temperature"]
    m.head.inv_temperature.fill_(1.0 / temp)
    m.float().eval()
    export_fp32(m, f32, tok.get_vocab_size())
    ref = softmax(T.predict(m, rows, torch.device("cpu"), bs=1))
    out = {}
    for v in args.variants:
        p = W / f"{v}.onnx"
        if v == "fp32":
            p = f32
        elif v == "dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic
            quantize_dynamic(str(f32), str(p), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm", "Gather"])
        elif v == "embedding":
            quantize_int8(f32, p)
        elif v == "nbits8":
            quantize_int8(f32, W / "emb.onnx")
            quantize_matmul_nbits(W / "emb.onnx", p)
        elif v == "static":
            quantize_static_int8(f32, p, rows, c.pad_id)
        else:
            raise SystemExit(f"unknown variant {v}")
        s = session(p)
        alone = softmax(np.concatenate([run_onnx(s, [r], c.pad_id) for r in rows]))
        r = {"size_bytes": p.stat().st_size,
             "batch_independence_max_prob_diff": batch_independence(s, rows, c.pad_id),
             "argmax_agreement_vs_fp32": float((alone.argmax(1) == ref.argmax(1)).mean()),
             "max_prob_diff_vs_fp32": float(np.abs(alone - ref).max()),
             "mean_prob_diff_vs_fp32": float(np.abs(alone - ref).mean())}
        if not args.no_latency:
            run_onnx(s, rows[:32], c.pad_id)
            r.update(latency(s, rows, c.pad_id))
            full = [x for x in rows if len(x[0]) == c.max_length]
            r["p50_ms_256_tokens"] = latency(s, full[:1] * 50, c.pad_id)["p50_ms"]
            r["loadavg"] = os.getloadavg()
        print(v, json.dumps(r), flush=True)
        out[v] = r
    args.out.write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
