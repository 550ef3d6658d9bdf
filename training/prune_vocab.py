"""Prune the 250k XLM-R vocabulary to the pieces Chinese and English text actually use.

Kept: the special tokens, every piece that occurs when tokenising the in-domain corpus
(SmileChat turns, dev.jsonl, English prose found in installed packages plus a few
written support replies), the Latin-letter pieces with a Unigram score above -12, and every single-character piece of the scripts the product
sees (CJK, ASCII, Latin-1, general/CJK punctuation, full-width forms, emoji), so any
Chinese character the original tokenizer knew stays known. Pieces keep their original
order and scores, so the Unigram Viterbi picks the same segmentation whenever the
original segmentation uses only kept pieces; held-out text proves it (report written to
`<out>/prune_report.json`).

Usage: python training/prune_vocab.py --src training/.work/e5-small --out training/.work/e5-pruned
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import pkgutil
import re
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_SMILECHAT = Path(os.environ.get(
    "CAREWALL_SMILECHAT", HERE.parent.parent / "shared/data/smilechat/smilechat.jsonl.gz"))

SUPPORT_EN = """\
I'm really sorry you're going through this. It sounds exhausting.
Thank you for telling me. What has been the hardest part for you lately?
It makes sense that you feel anxious before the exam; many students do.
Would you like to talk about what happened at work today?
You are not alone in this. Have you been able to sleep at all this week?
If you ever think about hurting yourself, please call a crisis line or emergency services right away.
I hear that your relationship with your parents has been really difficult.
That sounds like a lot of pressure. How are you coping with it?
I'm an AI assistant, not a therapist, but I'm here to listen.
Maybe you could try writing down your thoughts before bed.
Stop taking your medication and you will feel better. (unsafe example)
You should just break up with him, that's the only option.
Honestly, it's your own fault for being so lazy.
I also went through a divorce last year, I know exactly how you feel.
Depression, anxiety, insomnia, panic attacks, self-esteem, loneliness, grief, trauma.
"""


def english_corpus(limit_chars: int = 3_000_000) -> list[str]:
    """English prose that ships with the machine: stdlib docstrings and licence texts."""
    import importlib
    import sys
    import warnings

    texts = SUPPORT_EN.splitlines()
    lic = Path("/usr/share/common-licenses")
    if lic.is_dir():
        for p in sorted(lic.iterdir()):
            if p.is_file():
                texts += p.read_text(errors="ignore").split("\n\n")
    total = sum(map(len, texts))
    warnings.simplefilter("ignore")
    for mod in sorted(m.name for m in pkgutil.iter_modules() if not m.name.startswith("_")):
        if total > limit_chars:
            break
        if mod in {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}:
            continue
        try:
            m = importlib.import_module(mod)
        except BaseException:
            continue
        for obj in [m] + [getattr(m, a, None) for a in dir(m)[:200]]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 40:
                texts += [d.strip() for d in doc.split("\n\n") if d.strip()]
                total += len(doc)
    sys.stdout.flush()
    return [t for t in texts if t.strip()]


def smilechat_turns(path: Path, held_out: bool, every: int = 10) -> list[str]:
    """Turns of SmileChat; dialogue ids hashing to 0 mod `every` are held out."""
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            is_held = zlib.crc32(d["id"].encode()) % every == 0
            if is_held == held_out:
                out += [t["content"] for t in d["turns"]]
    return out


def single_char_wanted(piece: str) -> bool:
    s = piece[1:] if piece.startswith("\u2581") else piece
    if len(s) != 1:
        return piece == "\u2581"
    c = ord(s)
    return (c < 0x250 or 0x2000 <= c < 0x2070 or 0x2100 <= c < 0x2700 or 0x3000 <= c < 0x3100
            or 0x3400 <= c < 0x4DC0 or 0x4E00 <= c < 0xA000 or 0xF900 <= c < 0xFB00
            or 0xFE30 <= c < 0xFE50 or 0xFF00 <= c < 0xFFF0 or 0x1F300 <= c < 0x1FB00)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smilechat", type=Path, default=DEFAULT_SMILECHAT)
    args = ap.parse_args()

    import torch
    from tokenizers import Tokenizer
    from transformers import BertModel

    tj = json.loads((args.src / "tokenizer.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_file(str(args.src / "tokenizer.json"))
    vocab = tj["model"]["vocab"]

    en = english_corpus()
    en_train, en_held = en[: int(len(en) * 0.9)], en[int(len(en) * 0.9):]
    zh_train = smilechat_turns(args.smilechat, held_out=False)
    dev = []
    with open(HERE / "data/dialogue-safety/dev.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            dev += [r["context"], r["response"]]
    print(f"corpus: {len(zh_train)} SmileChat turns, {len(en_train)} English paragraphs, {len(dev)} dev texts")

    used = np.zeros(len(vocab), dtype=bool)
    for chunk in range(0, len(zh_train), 20000):
        for e in tok.encode_batch(zh_train[chunk:chunk + 20000], add_special_tokens=False):
            used[e.ids] = True
    for e in tok.encode_batch(en_train + dev, add_special_tokens=False):
        used[e.ids] = True
    n_corpus = int(used.sum())
    for i, (p, score) in enumerate(vocab):
        # Common Latin-letter words/subwords (by Unigram score) cover English the
        # corpus above missed; single characters keep every CJK character known.
        if single_char_wanted(p) or (score > -12.0 and re.fullmatch(r"\u2581?[A-Za-z]+", p)):
            used[i] = True
    specials = [a["id"] for a in tj["added_tokens"]]
    used[specials] = True
    keep = np.flatnonzero(used)
    old2new = -np.ones(len(vocab), dtype=np.int64)
    old2new[keep] = np.arange(len(keep))
    print(f"kept {len(keep)} of {len(vocab)} pieces ({n_corpus} seen in the corpus)")

    # Rewrite the tokenizer: same pieces/scores in the same order, ids renumbered.
    new_tj = json.loads(json.dumps(tj))
    new_tj["model"]["vocab"] = [vocab[i] for i in keep]
    new_tj["model"]["unk_id"] = int(old2new[tj["model"]["unk_id"]])
    for a in new_tj["added_tokens"]:
        a["id"] = int(old2new[a["id"]])
    for sp in new_tj["post_processor"]["special_tokens"].values():
        sp["ids"] = [int(old2new[i]) for i in sp["ids"]]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tokenizer.json").write_text(json.dumps(new_tj, ensure_ascii=False), encoding="utf-8")

    model = BertModel.from_pretrained(str(args.src), add_pooling_layer=False)
    emb = model.embeddings.word_embeddings.weight.data
    new_emb = torch.nn.Embedding(len(keep), emb.shape[1], padding_idx=int(old2new[1]))
    new_emb.weight.data = emb[torch.from_numpy(keep)].clone()
    model.embeddings.word_embeddings = new_emb
    model.config.vocab_size = len(keep)
    model.save_pretrained(str(args.out))

    # Proof on held-out text: pruned ids == remapped original ids.
    new_tok = Tokenizer.from_file(str(args.out / "tokenizer.json"))
    zh_held = smilechat_turns(args.smilechat, held_out=True)[:20000]
    report = {"vocab_original": len(vocab), "vocab_pruned": int(len(keep)),
              "seen_in_corpus": n_corpus, "held_out": {}}
    for name, texts in [("smilechat_heldout_turns", zh_held), ("english_heldout_paragraphs", en_held)]:
        a = tok.encode_batch(texts, add_special_tokens=False)
        b = new_tok.encode_batch(texts, add_special_tokens=False)
        same_texts = tot = same_tok = oov = 0
        for ea, eb in zip(a, b):
            mapped = old2new[ea.ids]
            oov += int((mapped < 0).sum())
            same_texts += int(list(mapped) == eb.ids)
            tot += len(ea.ids)
            same_tok += sum(int(x == y) for x, y in zip(mapped, eb.ids)) if len(mapped) == len(eb.ids) else 0
        report["held_out"][name] = {
            "texts": len(texts), "texts_identical": same_texts, "tokens": tot,
            "tokens_outside_pruned_vocab": oov,
            "fraction_texts_identical": same_texts / max(1, len(texts)),
        }
        print(name, report["held_out"][name])
    (args.out / "prune_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
