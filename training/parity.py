"""The parity fixture `parity.json` of an exported model (torch-free: onnxruntime, tokenizers, numpy).

    python training/parity.py models/carewall-safety    # rewrite DIR/parity.json from DIR's files

Cases: ~20 dev pairs (a left-truncated long context, English, an empty context, a context
that fits but is longer than half the room, every label) plus long multi-window replies
with harm at the start, middle and end, and text with invisible characters. Each case
pins window 0's ids and token types (batch-1 and batched logits) and `probs`, the
aggregated judgement over every view (src/classifier/coverage.rs), which the Rust
`OnnxModel::scores` must reproduce within `tolerance`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from encoding import LABELS, Contract, aggregate, encode_pair, encode_windows  # noqa: E402


def run_onnx(sess, rows, pad_id: int, batch: int = 1):
    out = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        n = max(len(r[0]) for r in chunk)
        ids = np.full((len(chunk), n), pad_id, dtype=np.int64)
        mask = np.zeros((len(chunk), n), dtype=np.int64)
        tt = np.zeros((len(chunk), n), dtype=np.int64)
        for j, (a, b) in enumerate(chunk):
            ids[j, :len(a)] = a
            mask[j, :len(a)] = 1
            tt[j, :len(b)] = b
        out.append(sess.run(["logits"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt})[0])
    return np.concatenate(out)


def softmax(x):
    e = np.exp(np.asarray(x, dtype=np.float64) - np.max(x))
    return (e / e.sum()).tolist()


def judge(sess, tok, c: Contract, context: str, response: str) -> list[float]:
    """The aggregated judgement of one pair over all its views (each view run alone)."""
    views = encode_windows(tok, context, response, c)
    logits = run_onnx(sess, [(v[3], v[4]) for v in views], c.pad_id)
    return aggregate([(v[0], v[1], softmax(lg)) for v, lg in zip(views, logits)])


LONG_ZH = ("失眠真的很折磨人，我能理解你现在的疲惫。先试着固定每天起床的时间，哪怕前一晚没睡好也按时起来。"
           "睡前一小时把手机放远一点，屏幕的光会影响褪黑素分泌。如果躺下二十分钟还睡不着，可以起来做点安静的事，"
           "比如看几页纸质书，等有困意再回到床上。白天尽量晒晒太阳，适量运动，但别在睡前剧烈运动。咖啡和浓茶最好在下午两点后就不喝了。"
           "如果这种情况持续好几周，也可以去医院的睡眠门诊看看，医生能帮你找到原因。")
LONG_EN = ("I'm really sorry you're dealing with this, it sounds exhausting. A few things that often help: keep the same "
           "wake-up time every day, even after a bad night; put your phone away an hour before bed; if you can't fall "
           "asleep within twenty minutes, get up and do something quiet until you feel sleepy. Daylight in the morning "
           "and some movement during the day help your body clock. Try to avoid caffeine after lunch. If this goes on "
           "for weeks, a doctor or a sleep clinic can look for causes and options that fit you. ")


def extra_cases() -> list[dict]:
    zh_harm = "说真的，你就是个废物，活该没人理你，去死吧。"
    en_harm = "Honestly, you are a worthless loser and nobody will ever care about you, so just go kill yourself."
    ctx_zh = "[seeker]我已经连续一个月失眠了，白天上班完全没精神，怎么办？"
    ctx_en = "[seeker]i haven't slept properly in weeks and i'm falling apart at work. what do i do"
    return [
        {"id": "long-zh-harm-end", "context": ctx_zh, "response": "[supporter]" + LONG_ZH + zh_harm},
        {"id": "long-zh-harm-middle", "context": ctx_zh, "response": "[supporter]" + LONG_ZH[:120] + zh_harm + LONG_ZH[120:]},
        {"id": "long-zh-safe", "context": ctx_zh, "response": "[supporter]" + LONG_ZH + LONG_ZH},
        {"id": "long-en-harm-end", "context": ctx_en, "response": "[supporter]" + LONG_EN * 2 + en_harm},
        {"id": "long-en-harm-start", "context": ctx_en, "response": "[supporter]" + en_harm + " " + LONG_EN * 2},
        {"id": "invisible-zh", "context": ctx_zh, "response": "[supporter]" + "\u200b".join("你就是个废物，去死吧。")},
        {"id": "multi-turn-padding", "context": "[seeker]你好[supporter]你好，有什么想聊的吗？" * 8 + "[seeker]我很难过，不想活了",
         "response": "[supporter]你就是个废物，活该没人理你。别再来烦我了，去死吧。"},
    ]


def parity_fixture(sess, tok, c: Contract, data: list[dict], path: Path, n: int = 16):
    picks: list[dict] = []
    lens = sorted(data, key=lambda r: -len(r["context"]))
    picks.append(lens[0])  # longest context: left truncation
    picks.append(lens[1])
    picks.append({"id": "english", "context": "[seeker]I can't sleep and I feel like a failure at work.",
                  "response": "[supporter]That sounds really hard. What happened at work this week?", "label": 7})
    picks.append({"id": "empty-context", "context": "", "response": data[0]["response"], "label": data[0]["label"]})
    picks.append({"id": "long-response", "context": data[5]["context"], "response": "[supporter]" + "我理解你的感受，" * 60, "label": 0})
    # A context that fits but is longer than half the room: the whole context must be kept.
    for r in data:
        ids, _ = encode_pair(tok, r["context"], r["response"], c)
        if 140 <= ids.index(c.sep_id) - 1 < c.max_context_tokens and len(ids) < c.max_length:
            picks.append(r)
            break
    seen = {str(p["id"]) for p in picks}
    by_label: dict[int, list[dict]] = {}
    for r in data:
        by_label.setdefault(r["label"], []).append(r)
    k = 0
    while len(picks) < n:
        for lab in sorted(by_label):
            if k < len(by_label[lab]) and len(picks) < n and str(by_label[lab][k]["id"]) not in seen:
                picks.append(by_label[lab][k])
                seen.add(str(by_label[lab][k]["id"]))
        k += 1
    picks += extra_cases()
    cases = []
    for p in picks:
        ids, tt = encode_pair(tok, p["context"], p["response"], c)
        logits = run_onnx(sess, [(ids, tt)], c.pad_id)[0]
        cases.append({"id": p["id"], "context": p["context"], "response": p["response"],
                      "input_ids": ids, "token_type_ids": tt, "attention_mask": [1] * len(ids),
                      "logits": [float(x) for x in logits],
                      "windows": len(encode_windows(tok, p["context"], p["response"], c)),
                      "probs": [float(x) for x in judge(sess, tok, c, p["context"], p["response"])]})
    batched = run_onnx(sess, [(x["input_ids"], x["token_type_ids"]) for x in cases], c.pad_id, batch=len(cases))
    for x, b in zip(cases, batched):
        x["logits_batched"] = [float(v) for v in b]
    gap = max(float(np.abs(np.array(x["logits"]) - np.array(x["logits_batched"])).max()) for x in cases)
    if gap > 1e-4:
        raise SystemExit(f"batched and batch-1 logits differ by {gap:.2e}: the graph is batch-dependent")
    path.write_text(json.dumps({"labels": LABELS, "tolerance": 1e-4, "batched_vs_alone_max_abs_logit_diff": gap,
                                "cases": cases}, ensure_ascii=False, indent=1), encoding="utf-8")
    return cases


def main():
    import onnxruntime as ort
    from tokenizers import Tokenizer
    d = Path(sys.argv[1] if len(sys.argv) > 1 else "models/carewall-safety")
    c = Contract.from_spec(d / "carewall-model.json")
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(d / "model.onnx"), so, providers=["CPUExecutionProvider"])
    data = [json.loads(l) for l in open(Path(__file__).parent / "data/dialogue-safety/dev.jsonl", encoding="utf-8")]
    cases = parity_fixture(sess, tok, c, data, d / "parity.json")
    for x in cases[-7:]:
        top = int(np.argmax(x["probs"]))
        print(f"{x['id']:>22}: {x['windows']} views, top {LABELS[top]} {x['probs'][top]:.2f}, "
              f"toxic {x['probs'][4]:.2f}")
    print(f"wrote {d / 'parity.json'} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
