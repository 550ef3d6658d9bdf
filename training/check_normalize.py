"""Check training/normalize.py against the shared cases (the Rust unit test reads the same file).

    python training/check_normalize.py            # check
    python training/check_normalize.py --write    # regenerate expected outputs (then review the diff)
"""
import json, sys, pathlib
sys.path.insert(0, str(pathlib.Path(__file__).parent))
from normalize import normalize

path = pathlib.Path(__file__).parent / "normalize_cases.json"
cases = json.loads(path.read_text(encoding="utf-8"))
if "--write" in sys.argv:
    for c in cases:
        c["expected"] = normalize(c["input"])
    path.write_text(json.dumps(cases, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases")
    sys.exit(0)
bad = [c for c in cases if normalize(c["input"]) != c["expected"]]
for c in bad:
    print("MISMATCH", repr(c["input"]), repr(normalize(c["input"])), "!=", repr(c["expected"]))
print(f"{len(cases) - len(bad)}/{len(cases)} cases match")
sys.exit(1 if bad else 0)
