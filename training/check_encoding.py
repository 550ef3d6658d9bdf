"""Checks `carewall_model.encode_pair`/`encode_pairs` against the input contract.

The contract (models/README.md, step 4) keeps the last `room = max_length - 4 -
len(response)` context tokens, i.e. the WHOLE context when it fits. An earlier slice
`ctx[len(ctx) - room:]` went negative when room/2 < len(ctx) < room and kept only the
last `room - len(ctx)` tokens, so training saw different inputs than the Rust side
serves. This check fails on that bug (the ~150-token case below) and compares both
encoders with an independent re-statement of the contract on every dev pair.

    python training/check_encoding.py [--tokenizer models/carewall-safety/tokenizer.json]
"""
import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from carewall_model import Contract, encode_pair, encode_pairs  # noqa: E402


def reference(tok, context: str, response: str, c: Contract):
    """The contract written out step by step, without slicing tricks."""
    ctx = tok.encode(context, add_special_tokens=False).ids if context else []
    rsp = (tok.encode(response, add_special_tokens=False).ids if response else [])[: c.max_response_tokens]
    room = max(0, c.max_length - 4 - len(rsp))
    keep = min(len(ctx), room)
    ctx = ctx[len(ctx) - keep:] if keep > 0 else []
    ids = [c.cls_id] + ctx + [c.sep_id, c.sep_id] + rsp + [c.sep_id]
    return ids, [0] * (len(ctx) + 3) + [1] * (len(rsp) + 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, default=HERE.parent / "models/carewall-safety/tokenizer.json")
    ap.add_argument("--data", type=Path, default=HERE / "data/dialogue-safety/dev.jsonl")
    args = ap.parse_args()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(args.tokenizer))
    c = Contract()
    fails = []

    # 1. A context of ~150 tokens with a short response: room/2 < len(ctx) < room, so
    #    every context token must survive (this is the case the old slice got wrong).
    context = "[seeker]" + "我最近睡不好，总是想很多事情。" * 15
    response = "[supporter]听起来你很累。"
    n_ctx = len(tok.encode(context, add_special_tokens=False).ids)
    n_rsp = len(tok.encode(response, add_special_tokens=False).ids)
    room = c.max_length - 4 - n_rsp
    if not room / 2 < n_ctx < room:
        fails.append(f"test case not in the bug range: len(ctx)={n_ctx}, room={room}")
    ids, tt = encode_pair(tok, context, response, c)
    if len(ids) != n_ctx + n_rsp + 4 or tt.count(0) != n_ctx + 3:
        fails.append(f"~150-token context cut: {len(ids)} ids, expected {n_ctx + n_rsp + 4} (len(ctx)={n_ctx}, room={room})")
    if encode_pairs(tok, [(context, response)], c)[0] != (ids, tt):
        fails.append("encode_pairs differs from encode_pair on the ~150-token case")

    # 2. A context longer than room keeps exactly its last `room` tokens; a full pair is max_length ids.
    long_ctx = context * 3
    ids, tt = encode_pair(tok, long_ctx, response, c)
    full = tok.encode(long_ctx, add_special_tokens=False).ids
    if len(ids) != c.max_length or ids[1:1 + room] != full[-room:]:
        fails.append(f"long context: {len(ids)} ids (expected {c.max_length}) or wrong tokens kept")

    # 3. Edge cases from models/README.md.
    rsp_ids = tok.encode(response, add_special_tokens=False).ids
    if encode_pair(tok, "", response, c)[0] != [c.cls_id, c.sep_id, c.sep_id] + rsp_ids + [c.sep_id]:
        fails.append("empty context")
    e_ids, e_tt = encode_pair(tok, context, "", c)
    if e_ids[-3:] != [c.sep_id] * 3 or e_tt[-1] != 1 or e_tt.count(1) != 1:
        fails.append("empty response")

    # 4. Every dev pair: both encoders equal the reference.
    rows = [json.loads(l) for l in args.data.read_text(encoding="utf-8").splitlines() if l.strip()]
    batch = encode_pairs(tok, [(r["context"], r["response"]) for r in rows], c)
    in_range = 0
    for r, b in zip(rows, batch):
        ref = reference(tok, r["context"], r["response"], c)
        if encode_pair(tok, r["context"], r["response"], c) != ref or b != ref:
            fails.append(f"dev id {r.get('id')}: encoding differs from the contract")
        n = len(tok.encode(r["context"], add_special_tokens=False).ids) if r["context"] else 0
        rm = c.max_length - 4 - ref[1].count(1) + 1  # count(1) = len(rsp) + the closing [sep]
        in_range += rm / 2 < n < rm
    if fails:
        print("\n".join(fails[:20]))
        sys.exit(f"{len(fails)} encoding check(s) failed")
    print(f"encoding OK: ~150-token case ({n_ctx} ctx tokens, room {room}) kept whole; "
          f"{len(rows)} dev pairs match the contract ({in_range} with room/2 < len(ctx) < room)")


if __name__ == "__main__":
    main()
