"""The judged form of a text: the Python mirror of `src/classifier/normalize.rs`.

Applied to every context and response before encoding, in training and in
evaluation, exactly as the gateway does before every judgement. Steps:
remove invisible characters (format characters, variation selectors, fillers),
NFKC, then whitespace: removed between two CJK characters, removed inside runs of
>= 3 single letters/digits separated by single spaces ("k i l l" -> "kill"),
otherwise one space (one newline if the run had a line break), trimmed.
`training/normalize_cases.json` pins both implementations to the same outputs
(`python training/check_normalize.py`, and the Rust unit test).
"""
import string
import unicodedata

INVISIBLE = [
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x0600, 0x0605), (0x061C, 0x061C),
    (0x06DD, 0x06DD), (0x070F, 0x070F), (0x0890, 0x0891), (0x08E2, 0x08E2),
    (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F),
    (0x202A, 0x202E), (0x2060, 0x2064), (0x2066, 0x206F), (0x2800, 0x2800),
    (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0),
    (0xFFF9, 0xFFFB), (0x110BD, 0x110BD), (0x110CD, 0x110CD), (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0000, 0xE007F), (0xE0100, 0xE01EF),
]

CJK = [
    (0x2E80, 0x2FDF), (0x3000, 0x303F), (0x3040, 0x30FF), (0x3100, 0x312F),
    (0x3130, 0x318F), (0x31F0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF),
    (0xAC00, 0xD7AF), (0xF900, 0xFAFF), (0xFE30, 0xFE4F), (0xFF00, 0xFFEF),
    (0x20000, 0x3134F),
]


def _in(c: str, ranges) -> bool:
    u = ord(c)
    return any(lo <= u <= hi for lo, hi in ranges)


def is_invisible(c: str) -> bool:
    return _in(c, INVISIBLE)


def is_cjk(c: str) -> bool:
    return _in(c, CJK)


def _is_ws(c: str) -> bool:
    # Rust's char::is_whitespace (White_Space property).
    return c in "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"


def _is_alnum(c: str) -> bool:
    # Rust's char::is_alphanumeric: Alphabetic or Numeric (Nd, Nl, No).
    cat = unicodedata.category(c)
    return c.isalpha() or cat in ("Nd", "Nl", "No") or cat in ("Lm", "Lo", "Lt", "Lu", "Ll")


def _tight(a: str, b: str) -> bool:
    # No space between two CJK characters, or a CJK character and ASCII punctuation.
    def cp(c):
        return is_cjk(c) or c in string.punctuation
    return cp(a) and cp(b) and (is_cjk(a) or is_cjk(b))


def normalize(text: str) -> str:
    visible = "".join(c for c in text if not is_invisible(c))
    chars = [("\n" if c == "\r" else c) for c in unicodedata.normalize("NFKC", visible)
             if not is_invisible(c)]
    words, gaps = [], []
    i, gap_start, n = 0, 0, len(chars)
    while i < n:
        if _is_ws(chars[i]):
            i += 1
            continue
        start = i
        while i < n and not _is_ws(chars[i]):
            i += 1
        gaps.append(chars[gap_start:start])
        words.append(chars[start:i])
        gap_start = i

    def single(w):
        return len(w) == 1 and _is_alnum(w[0]) and not is_cjk(w[0])

    join = [False] * len(words)
    k = 0
    while k < len(words):
        if not single(words[k]):
            k += 1
            continue
        end = k + 1
        while end < len(words) and single(words[end]) and len(gaps[end]) == 1 and gaps[end][0] != "\n":
            end += 1
        if end - k >= 3:
            for j in range(k + 1, end):
                join[j] = True
        k = end
    out = []
    for idx, w in enumerate(words):
        if idx > 0 and not join[idx]:
            prev, nxt = words[idx - 1][-1], w[0]
            if not _tight(prev, nxt):
                out.append("\n" if "\n" in gaps[idx] else " ")
        out.extend(w)
    return "".join(out)
