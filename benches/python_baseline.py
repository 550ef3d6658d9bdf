#!/usr/bin/env python3
"""Python baselines for the classifier benchmarks (compare with `cargo bench --bench classifier`).

1. The same ONNX model through Python `onnxruntime` (same inputs, same thread counts):
   latency per call at 64/128/256 tokens, batch 1 and 8, 1 and 2 intra-op threads, plus
   tokenisation with the `tokenizers` package and end-to-end pairs/s.
2. If `torch` and `transformers` are importable and --hf-dir names a Hugging Face BertModel
   folder (e.g. the converted, vocabulary-pruned multilingual-e5-small), the encoder a user
   would otherwise run: `transformers.BertModel` in fp32 PyTorch on CPU, cut to the ONNX
   model's layer count, plus a linear 8-way head (random weights: the head is negligible
   next to the encoder, so the timing is representative, the outputs are not).

Peak memory: run each part in its own process under `/usr/bin/time -v` (--only onnx|torch)
and read "Maximum resident set size".

    python3 benches/python_baseline.py --model-dir models/carewall-safety [--hf-dir DIR] [--only onnx|torch]
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

TOKENS = (64, 128, 256)
BATCHES = (1, 8)
THREADS = (1, 2)

SEEKER = "[seeker]最近工作压力很大，晚上总是睡不着，感觉自己什么都做不好，和家人说了他们也不理解我。"
SUPPORTER = "[supporter]听起来你这段时间真的很辛苦，一个人扛着这么多压力。"
RESPONSE = "[supporter]能和我说说最近让你最难受的一件事吗？我们可以一起慢慢理一理。"


def contract(model_dir: Path) -> dict:
    return json.loads((model_dir / "carewall-model.json").read_text(encoding="utf-8"))


def assemble(ctx: list[int], rsp: list[int], c: dict, max_length: int, max_resp: int):
    """The input contract of models/README.md (mirrors src/classifier/tokenize.rs)."""
    rsp = rsp[:max_resp]
    room = max(0, max_length - 4 - len(rsp))
    ctx = ctx[max(0, len(ctx) - room):] if room else []
    ids = [c["cls_id"]] + ctx + [c["sep_id"], c["sep_id"]] + rsp + [c["sep_id"]]
    tt = [0] * (len(ctx) + 3) + [1] * (len(rsp) + 1)
    return ids, tt


def inputs_of(tok, c: dict, tokens: int):
    ctx = tok.encode((SEEKER + SUPPORTER) * 8, add_special_tokens=False).ids
    rsp = tok.encode(RESPONSE * 4, add_special_tokens=False).ids
    ids, tt = assemble(ctx, rsp, c, tokens, tokens // 3)
    assert len(ids) == tokens, (len(ids), tokens)
    return ids, tt


def time_it(fn, min_seconds: float = 2.0, min_reps: int = 10) -> list[float]:
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def summary(times: list[float], batch: int) -> dict:
    p50 = statistics.median(times) * 1000
    return {"p50_ms": round(p50, 3), "per_pair_ms": round(p50 / batch, 3),
            "pairs_per_s": round(batch * 1000 / p50, 1), "reps": len(times)}


def bench_onnx(model_dir: Path, seconds: float) -> dict:
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    c = contract(model_dir)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    out = {"onnxruntime": ort.__version__, "model": f'{c["name"]}@{c.get("version", "")}'}
    for threads in THREADS:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(model_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
        for tokens in TOKENS:
            ids, tt = inputs_of(tok, c, tokens)
            for batch in BATCHES:
                feed = {"input_ids": np.array([ids] * batch, dtype=np.int64),
                        "attention_mask": np.ones((batch, tokens), dtype=np.int64)}
                if "token_type_ids" in c["inputs"]:
                    feed["token_type_ids"] = np.array([tt] * batch, dtype=np.int64)
                times = time_it(lambda: sess.run([c["output"]], feed), seconds)
                out[f"onnx/{threads}t/b{batch}/{tokens}"] = summary(times, batch)
    pair_ctx, pair_rsp = (SEEKER + SUPPORTER) * 8, RESPONSE * 4
    times = time_it(lambda: (tok.encode(pair_ctx, add_special_tokens=False),
                             tok.encode(pair_rsp, add_special_tokens=False)), seconds)
    out["tokenise/long_pair"] = summary(times, 1)
    return out


def onnx_layer_count(model_dir: Path) -> int | None:
    """Encoder depth, read from initializer names like `enc.layers.2.q.bias`."""
    try:
        import onnx
    except ImportError:
        return None
    m = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    layers = {int(x.group(1)) for i in m.graph.initializer if (x := re.search(r"layers\.(\d+)\.", i.name))}
    return max(layers) + 1 if layers else None


def bench_torch(model_dir: Path, hf_dir: Path, layers: int | None, seconds: float) -> dict:
    import torch
    import transformers
    from transformers import BertConfig, BertModel
    from tokenizers import Tokenizer

    c = contract(model_dir)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    config = BertConfig.from_pretrained(str(hf_dir))
    if layers:
        config.num_hidden_layers = layers
    encoder = BertModel.from_pretrained(str(hf_dir), config=config, add_pooling_layer=False).eval()
    head = torch.nn.Linear(config.hidden_size, 8).eval()
    out = {"torch": torch.__version__, "transformers": transformers.__version__,
           "layers": config.num_hidden_layers, "hf_dir": str(hf_dir)}
    for threads in THREADS:
        torch.set_num_threads(threads)
        for tokens in TOKENS:
            ids, tt = inputs_of(tok, c, tokens)
            for batch in BATCHES:
                x = torch.tensor([ids] * batch)
                m = torch.ones_like(x)
                t = torch.tensor([tt] * batch)

                def run():
                    with torch.inference_mode():
                        h = encoder(input_ids=x, attention_mask=m, token_type_ids=t).last_hidden_state
                        return torch.softmax(head(h[:, 0]), -1)

                out[f"torch/{threads}t/b{batch}/{tokens}"] = summary(time_it(run, seconds), batch)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=Path("models/carewall-safety"))
    ap.add_argument("--hf-dir", type=Path, help="Hugging Face BertModel folder for the PyTorch baseline")
    ap.add_argument("--layers", type=int, help="encoder layers for the PyTorch baseline (default: the ONNX model's)")
    ap.add_argument("--only", choices=["onnx", "torch"], help="run one part (for a clean peak-RSS reading)")
    ap.add_argument("--seconds", type=float, default=2.0, help="measuring time per configuration")
    args = ap.parse_args()
    results = {}
    if args.only in (None, "onnx"):
        results.update(bench_onnx(args.model_dir, args.seconds))
    if args.only in (None, "torch"):
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            results["torch"] = f"skipped: {e}"
        else:
            if args.hf_dir is None:
                results["torch"] = "skipped: no --hf-dir"
            else:
                layers = args.layers or onnx_layer_count(args.model_dir)
                results.update(bench_torch(args.model_dir, args.hf_dir, layers, args.seconds))
    for k, v in results.items():
        print(f"{k:28} {v}")
    print(json.dumps(results, ensure_ascii=False))


if __name__ == "__main__":
    main()
