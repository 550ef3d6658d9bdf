"""The input contract, torch-free: what the Rust side (src/classifier/tokenize.rs,
coverage.rs, normalize.rs) does, line for line. Used by training, export, parity and
evaluation; `carewall_model` re-exports it.

- Both texts are normalised (`normalize.normalize`).
- Window 0: [cls] + context[-k:] + [sep, sep] + response[:r] + [sep] with
  r = max_response_tokens, k = min(max_context_tokens, max_length - 4 - len(response)).
- Later windows (a response longer than r tokens): ids("[supporter]") + the next
  r - len(prefix) response tokens, starting `window_overlap_tokens` before the previous
  window ended; same context rule.
- Every window is also scored with only the seeker's last turn as context when the
  context holds more than that turn.
- `aggregate`: max over views for the five harm categories, Nonsense and Linguistic
  Neglect from window 0 with the full context, Safe = min over views.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from normalize import normalize

LABELS = ["Nonsense", "Humanoid Mimicry", "Linguistic Neglect", "Unamiable Judgment",
          "Toxic Language", "Unauthorized Preachment", "Nonfactual Statement", "Safe Response"]
SAFE = 7
HARM = [1, 3, 4, 5, 6]
RESPONSE_PREFIX = "[supporter]"
CHARS_PER_TOKEN_MARGIN = 32
MAX_WINDOWS_PER_PAIR = 256


@dataclass
class Contract:
    max_length: int = 256
    max_response_tokens: int = 128
    max_context_tokens: int = 252
    window_overlap_tokens: int = 32
    cls_id: int = 0
    pad_id: int = 1
    sep_id: int = 2

    @staticmethod
    def from_spec(path: Path) -> "Contract":
        s = json.loads(Path(path).read_text())
        return Contract(max_length=s["max_length"], max_response_tokens=s["max_response_tokens"],
                        max_context_tokens=s.get("max_context_tokens", s["max_length"] - 4),
                        window_overlap_tokens=s.get("window_overlap_tokens", 32),
                        cls_id=s["cls_id"], pad_id=s["pad_id"], sep_id=s["sep_id"])


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids if text else []


def assemble(ctx: list[int], rsp: list[int], c: Contract) -> tuple[list[int], list[int]]:
    rsp = rsp[: c.max_response_tokens]
    room = min(max(0, c.max_length - 4 - len(rsp)), c.max_context_tokens)
    ctx = ctx[max(0, len(ctx) - room):] if room else []
    ids = [c.cls_id] + ctx + [c.sep_id, c.sep_id] + rsp + [c.sep_id]
    tt = [0] * (len(ctx) + 3) + [1] * (len(rsp) + 1)
    return ids, tt


def last_seeker_turn(context: str) -> str:
    i = context.rfind("[seeker]")
    return context[i:] if i >= 0 else context


def response_spans(n: int, c: Contract, prefix_len: int) -> list[tuple[int, int]]:
    r = max(1, c.max_response_tokens)
    spans = [(0, min(n, r))]
    room = max(1, r - prefix_len)
    overlap = min(c.window_overlap_tokens, room // 2)
    end = min(n, r)
    while end < n:
        start = end - overlap
        end = min(start + room, n)
        spans.append((start, end))
    return spans


def _tail_chars(s: str, n: int) -> str:
    return s[-n:] if n > 0 else ""


def encode_pair(tok, context: str, response: str, c: Contract) -> tuple[list[int], list[int]]:
    """Window 0 with the full context: ids and token type ids."""
    ctx = normalize(_tail_chars(context, c.max_length * CHARS_PER_TOKEN_MARGIN))
    return assemble(_ids(tok, ctx), _ids(tok, normalize(response)), c)


def encode_pairs(tok, pairs: list[tuple[str, str]], c: Contract) -> list[tuple[list[int], list[int]]]:
    """Batch version of `encode_pair` (same result)."""
    return [encode_pair(tok, a, b, c) for a, b in pairs]


def encode_windows(tok, context: str, response: str, c: Contract):
    """Every view of a pair: a list of (window index, short_context, start_token, ids, tt)."""
    ctx_text = normalize(_tail_chars(context, c.max_length * CHARS_PER_TOKEN_MARGIN))
    ctx = _ids(tok, ctx_text)
    short = last_seeker_turn(ctx_text)
    short_ids = _ids(tok, short) if len(short) < len(ctx_text) else None
    rsp = _ids(tok, normalize(response))
    prefix = _ids(tok, RESPONSE_PREFIX)
    out = []
    for index, (a, b) in enumerate(response_spans(len(rsp), c, len(prefix))):
        body = rsp[a:b] if index == 0 else prefix + rsp[a:b]
        ids, tt = assemble(ctx, body, c)
        out.append((index, False, a, ids, tt))
        if short_ids is not None:
            ids, tt = assemble(short_ids, body, c)
            out.append((index, True, a, ids, tt))
    return out


def aggregate(views: list[tuple[int, bool, list[float]]]) -> list[float]:
    """One judgement from (window index, short_context, probs) views."""
    first = next((p for i, s, p in views if i == 0 and not s), views[0][2])
    out = list(first)
    for _, _, p in views:
        for k in HARM:
            out[k] = max(out[k], p[k])
        out[SAFE] = min(out[SAFE], p[SAFE])
    return out
