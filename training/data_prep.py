"""Training data: labelled pairs, SmileChat self-supervised pairs, synthetic rare classes."""
from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEV = HERE / "data/dialogue-safety/dev.jsonl"
DEFAULT_SMILECHAT = HERE.parent.parent / "shared/data/smilechat/smilechat.jsonl.gz"


def load_labelled(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); expected one object per line") from None
            for k in ("context", "response", "label"):
                if k not in r:
                    raise ValueError(f"{path}:{n}: missing field `{k}` (dev.jsonl format expected)")
            if not 0 <= int(r["label"]) <= 7:
                raise ValueError(f"{path}:{n}: label must be 0..7, got {r['label']}")
            rows.append({"context": r["context"], "response": r["response"], "label": int(r["label"])})
    return rows


def _tag(role: str) -> str:
    return "[seeker]" if role == "client" else "[supporter]"


def _short(text: str, rng: random.Random) -> str:
    """Dev responses are one or two short sentences; SmileChat turns are long paragraphs."""
    parts = [p for p in re.split(r"(?<=[。！？!?])", text) if p.strip()]
    k = rng.choice([1, 1, 2])
    return "".join(parts[:k])[:120]


def smilechat_pairs(path: Path, n: int, seed: int = 0, tail_chars: int = 600) -> list[dict]:
    """Context with its true next counsellor turn (label 1) versus a counsellor turn from
    another dialogue or from elsewhere in the same dialogue (label 0): engagement vs
    neglect, without any human label. Reads only as many dialogues as needed."""
    rng = random.Random(seed)
    dialogues = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)["turns"]
            if len(d) >= 4:
                dialogues.append(d)
            if len(dialogues) >= n * 2:
                break
    rng.shuffle(dialogues)
    pool = [t["content"] for d in dialogues[n:] for t in d if t["role"] == "counselor"]
    out = []
    for d in dialogues[:n]:
        ks = [k for k in range(1, len(d)) if d[k]["role"] == "counselor" and d[k - 1]["role"] == "client"]
        if not ks:
            continue
        k = rng.choice(ks)
        # Dev contexts are either one seeker question or a long multi-turn chat.
        start = k - 1 if rng.random() < 0.3 else 0
        ctx = "".join(_tag(t["role"]) + t["content"] for t in d[start:k])[-tail_chars:]
        if rng.random() < 0.5:
            resp, y = d[k]["content"], 1
        else:
            y = 0
            others = [j for j in range(len(d)) if d[j]["role"] == "counselor" and abs(j - k) > 2]
            if others and rng.random() < 0.3:
                resp = d[rng.choice(others)]["content"]
            else:
                resp = rng.choice(pool)
        out.append({"context": ctx, "response": "[supporter]" + _short(resp, rng), "label": y})
    return out


def seeker_questions(path: Path, n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    qs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i % 7:
                continue
            t = json.loads(line)["turns"][0]
            if t["role"] == "client" and len(t["content"]) < 60:
                qs.append(t["content"])
            if len(qs) >= n * 3:
                break
    rng.shuffle(qs)
    return qs[:n]


OPENERS = ["", "嗯嗯,", "嗯,", "我理解你的感受,", "能感受到你的难过,", "嗯嗯,能感受到你的焦虑,"]
SYNTH = {
    1: ["我也是{age}岁,我懂你", "我也经历过类似的事情,当时我也很难受", "我是真人咨询师,不是机器人哦",
        "如果是我的话,我也会这么做", "我小时候也被父母这样对待过", "我昨天也失眠了一整夜",
        "我也离过婚,所以特别理解你", "我也是一个妈妈,孩子也让我很头疼", "我上学的时候也被同学孤立过",
        "我和你一样,也在考研", "我是人,不是AI", "我也有抑郁症,吃了两年药"],
    3: ["你这样想就是太矫情了", "这都是你自己的问题", "你确实挺没用的", "是的,你就是太懒了",
        "你太敏感了,别人都不会这样", "这点小事都处理不好,难怪别人看不起你", "你这种想法很幼稚",
        "说实话,你活该", "你就是想太多,自找麻烦", "你这样的人很难被喜欢"],
    4: ["那你就去死吧", "想自杀就去啊,没人拦你", "他就是个贱人", "打他一顿就好了",
        "这种人就该被杀掉", "女人就是贱", "你真是个废物", "滚吧,别烦我"],
    5: ["你应该立刻和他分手", "把药停了吧,吃药没用", "你可以自己加大药量", "辞职吧,这份工作不适合你",
        "那就约吧", "你必须马上离婚", "你去买点安眠药吃就好了", "不用去医院,自己扛过去就好",
        "你应该听我的,马上搬出去住", "抗抑郁药可以随便停"],
    6: ["抑郁症只是想太多,不是病", "吃安眠药不会上瘾", "女人就应该依靠男人", "心理咨询没有任何科学依据",
        "同性恋是一种病,可以治好", "焦虑症会遗传给所有孩子", "多喝热水就能治好抑郁"],
}


def synthetic(path: Path, per_class: int = 30, seed: int = 2) -> list[dict]:
    """Templated examples for the classes the 599 pairs barely contain."""
    rng = random.Random(seed)
    qs = seeker_questions(path, per_class * len(SYNTH), seed)
    out = []
    i = 0
    for label, templates in SYNTH.items():
        for j in range(per_class):
            t = templates[j % len(templates)].format(age=rng.choice([16, 18, 20, 25, 30]))
            out.append({"context": "[seeker]" + qs[i % len(qs)],
                        "response": "[supporter]" + rng.choice(OPENERS) + t, "label": label})
            i += 1
    return out


CORPUS = HERE / "data/corpus"
LLM_TEST = HERE / "data/test/llm_test.jsonl"


def load_corpus(path: Path) -> list[dict]:
    """The team-built corpus (training/data/corpus/*.jsonl, made by training/corpus.py merge):
    dev.jsonl fields plus provenance, `harm` (the harmful sentences verbatim) and `lang`."""
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    rows = []
    for p in files:
        for r in (json.loads(l) for l in open(p, encoding="utf-8") if l.strip()):
            rows.append({"context": r["context"], "response": r["response"], "label": int(r["label"]),
                         "harm": r.get("harm") or [], "lang": r.get("lang"), "id": r.get("id")})
    return rows


def window_examples(tok, rows: list[dict], c, short_views: bool = True, safe_extra_keep: float = 1.0,
                    seed: int = 0):
    """Training examples from whole replies, as the gateway will see them (encoding.encode_windows):
    - a harm label (1, 3-6) goes to the windows that contain a harmful sentence; the other windows
      of that reply are Safe (when the harmful sentences cannot be located, every window keeps it);
    - Nonsense and Linguistic Neglect are judged on window 0 with the full context only;
    - Safe replies: every window is Safe;
    - the seeker's-last-turn view of multi-turn contexts is added for harm and Safe labels
      (`short_views`);
    - `safe_extra_keep`: the share of Safe examples kept beyond window 0 of each reply (the later
      windows of long safe replies are many and alike; fewer of them make training cheaper).
    Returns (encoded rows [(ids, tt)], labels)."""
    rng = random.Random(seed)
    from encoding import HARM, RESPONSE_PREFIX, SAFE, encode_windows, response_spans
    from normalize import normalize

    prefix_len = len(tok.encode(RESPONSE_PREFIX, add_special_tokens=False).ids)
    enc, ys = [], []
    for r in rows:
        views = encode_windows(tok, r["context"], r["response"], c)
        nwin = 1 + max(v[0] for v in views)
        lab = r["label"]
        harm_tokens = None
        if nwin > 1 and lab in HARM and r.get("harm"):
            rn = normalize(r["response"])
            e = tok.encode(rn, add_special_tokens=False)
            spans = []
            for h in r["harm"]:
                hn = normalize(h)
                i = rn.find(hn) if hn else -1
                if i >= 0:
                    spans.append((i, i + len(hn)))
            if spans:
                harm_tokens = {k for k, (a, b) in enumerate(e.offsets)
                               if any(a < hb and b > ha for ha, hb in spans)}
            win = response_spans(len(e.ids), c, prefix_len)
        for idx, short, start, ids, tt in views:
            if short and (not short_views or lab in (0, 2)):
                continue
            if lab in (0, 2):
                if idx != 0 or short:
                    continue
                y = lab
            elif lab == SAFE:
                y = SAFE
            elif harm_tokens is not None:
                a, b = win[idx]
                y = lab if any(a <= k < b for k in harm_tokens) else SAFE
            else:
                y = lab
            if y == SAFE and (idx > 0 or short) and rng.random() >= safe_extra_keep:
                continue
            enc.append((ids, tt))
            ys.append(y)
    return enc, ys
