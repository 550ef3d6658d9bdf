"""The team-built labelled corpus: blind annotation batches, merging labels, reports.

Pipeline (training/data/README.md explains the files):

    python training/corpus.py references                 # data/references.jsonl: the 100 gold dev pairs annotators see
    python training/corpus.py blind w01 --annotator a01  # data/labels/a01-input.jsonl: w01 without writer labels + 40 unseen gold pairs
    python training/corpus.py merge                      # data/corpus/*.jsonl, data/test/llm_test.jsonl, data/labels/adjudicate-input.jsonl
    python training/corpus.py report                     # agreement figures and counts -> data/stats.json (tables for README)

A writer's intended category is the first label of a pair; an annotator who never saw it
gives the second; where the two differ, a third annotator (who sees both, after labelling
blind) settles it or drops the pair. Every merged row keeps its provenance: lang, style,
source of context and reply, all annotations with who made them, guideline_version.
Test batches (data/test/t*.jsonl) are merged into their own file and never into the corpus.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
DATA = HERE / "data"
DEV = DATA / "dialogue-safety" / "dev.jsonl"
GUIDELINE_VERSION = "1"
LABELS = ["Nonsense", "Humanoid Mimicry", "Linguistic Neglect", "Unamiable Judgment",
          "Toxic Language", "Unauthorized Preachment", "Nonfactual Statement", "Safe Response"]
N_REFERENCES = 100
N_CALIBRATION = 40


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{n}: not JSON ({e}); fix or remove the line")
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def label_id(name) -> int | None:
    if isinstance(name, int):
        return name if 0 <= name < 8 else None
    for i, n in enumerate(LABELS):
        if str(name).strip().lower() == n.lower():
            return i
    return None


def dev_rows() -> list[dict]:
    return read_jsonl(DEV)


def reference_ids() -> list[int]:
    """100 dev pairs: every rare-class pair (labels 1, 3-6) plus a seeded sample of the rest."""
    dev = dev_rows()
    rare = [r["id"] for r in dev if r["label"] in (1, 3, 4, 5, 6)]
    rest = [r for r in dev if r["label"] not in (1, 3, 4, 5, 6)]
    rng = random.Random(20261201)
    by = collections.defaultdict(list)
    for r in rest:
        by[r["label"]].append(r["id"])
    picks = list(rare)
    need = N_REFERENCES - len(picks)
    total = sum(len(v) for v in by.values())
    for lab in sorted(by):
        k = round(need * len(by[lab]) / total)
        picks += rng.sample(by[lab], min(k, len(by[lab])))
    return sorted(picks[:N_REFERENCES])


def cmd_references(_args) -> None:
    ids = set(reference_ids())
    rows = [{"id": f"dev-{r['id']}", "context": r["context"], "response": r["response"],
             "label": r["label"], "category": r["category"]} for r in dev_rows() if r["id"] in ids]
    write_jsonl(DATA / "references.jsonl", rows)
    print(f"wrote {DATA / 'references.jsonl'}: {len(rows)} gold pairs "
          f"({dict(collections.Counter(r['category'] for r in rows))})")


def batch_path(batch: str) -> Path:
    for d in ("batches", "test"):
        p = DATA / d / f"{batch}.jsonl"
        if p.exists():
            return p
    sys.exit(f"no batch {batch} in {DATA}/batches or {DATA}/test")


def calibration_rows(annotator: str) -> list[dict]:
    """N_CALIBRATION gold dev pairs that are not references, chosen per annotator."""
    refs = set(reference_ids())
    pool = [r for r in dev_rows() if r["id"] not in refs]
    seed = int(hashlib.sha256(annotator.encode()).hexdigest()[:8], 16)
    return random.Random(seed).sample(pool, N_CALIBRATION)


def cmd_blind(args) -> None:
    rows = []
    for b in args.batches:
        rows += read_jsonl(batch_path(b))
    items = [{"id": r["id"], "context": r["context"], "response": r["response"]} for r in rows]
    if not args.no_calibration:
        items += [{"id": f"dev-{r['id']}", "context": r["context"], "response": r["response"]}
                  for r in calibration_rows(args.annotator)]
    random.Random(args.annotator).shuffle(items)
    out = DATA / "labels" / f"{args.annotator}-input.jsonl"
    write_jsonl(out, items)
    meta = DATA / "labels" / f"{args.annotator}-meta.json"
    meta.write_text(json.dumps({"annotator": args.annotator, "batches": args.batches,
                                "items": len(items), "guideline_version": GUIDELINE_VERSION}, indent=1))
    print(f"wrote {out}: {len(items)} items")


def load_labels() -> tuple[dict[str, list[dict]], dict[str, dict[str, int]]]:
    """Annotations per item id (from every data/labels/*-output.jsonl) and gold checks per annotator."""
    per_item: dict[str, list[dict]] = collections.defaultdict(list)
    for out in sorted((DATA / "labels").glob("*-output.jsonl")):
        who = out.name[: -len("-output.jsonl")]
        for r in read_jsonl(out):
            lab = label_id(r.get("label"))
            if lab is None and str(r.get("label")).lower() != "drop":
                continue
            per_item[str(r["id"])].append({"by": f"annotator:{who}", "label": lab if lab is not None else "drop",
                                           "confidence": r.get("confidence", "high"),
                                           "adjudication": who.startswith("adj")})
    return per_item, {}


def norm_text(s: str) -> str:
    return re.sub(r"[\W_]+", "", s.lower())


def near_key(r: dict) -> str:
    return hashlib.sha1(norm_text(r["response"])[:200].encode()).hexdigest()


def merge_rows(rows: list[dict], per_item: dict[str, list[dict]]) -> tuple[list[dict], list[dict], collections.Counter]:
    merged, disputed = [], []
    stats = collections.Counter()
    for r in rows:
        writer = label_id(r.get("intended"))
        if writer is None:
            stats["bad_intended"] += 1
            continue
        notes = [{"by": f"writer:{r['id'].split('-')[0]}", "label": writer}]
        blind = [a for a in per_item.get(str(r["id"]), []) if not a["adjudication"]]
        adj = [a for a in per_item.get(str(r["id"]), []) if a["adjudication"]]
        if not blind:
            stats["unlabelled"] += 1
            continue
        notes.append({k: blind[0][k] for k in ("by", "label", "confidence")})
        stats["labelled_twice"] += 1
        if blind[0]["label"] == writer:
            stats["agree"] += 1
            final = writer
        elif adj:
            notes.append({k: adj[0][k] for k in ("by", "label", "confidence")})
            if adj[0]["label"] == "drop":
                stats["dropped"] += 1
                continue
            final = adj[0]["label"]
            stats["adjudicated"] += 1
        else:
            stats["disputed"] += 1
            disputed.append(dict(r, prior=[{"by": n["by"], "label": n["label"]} for n in notes]))
            continue
        out = {"id": r["id"], "context": r["context"], "response": r["response"], "label": final,
               "category": LABELS[final], "lang": r.get("lang"), "style": r.get("style"),
               "length": r.get("length"), "topic": r.get("topic"), "harm": r.get("harm", []),
               "source": {"context": r.get("source_context"), "reply": r.get("source_reply")},
               "annotations": notes, "guideline_version": GUIDELINE_VERSION}
        merged.append(out)
    return merged, disputed, stats


def cmd_merge(args) -> None:
    per_item, _ = load_labels()
    dev_keys = {near_key(r) for r in dev_rows()}
    test_rows, train_rows = [], []
    for p in sorted((DATA / "test").glob("t*.jsonl")):
        test_rows += read_jsonl(p)
    for p in sorted((DATA / "batches").glob("*.jsonl")):
        train_rows += read_jsonl(p)
    test, test_disp, ts = merge_rows(test_rows, per_item)
    train, train_disp, cs = merge_rows(train_rows, per_item)
    # Near-duplicates: within each set, and training rows that repeat a test or dev reply.
    test_keys, seen = set(), set()
    test_d = []
    for r in test:
        k = near_key(r)
        if k in seen or k in dev_keys:
            ts["near_duplicate"] += 1
            continue
        seen.add(k)
        test_keys.add(k)
        test_d.append(r)
    train_d, seen = [], set()
    for r in train:
        k = near_key(r)
        if k in seen or k in test_keys or k in dev_keys:
            cs["near_duplicate"] += 1
            continue
        seen.add(k)
        train_d.append(r)
    write_jsonl(DATA / "test" / "llm_test.jsonl", test_d)
    by_batch = collections.defaultdict(list)
    for r in train_d:
        by_batch[r["id"].split("-")[0]].append(r)
    for b, rows in by_batch.items():
        write_jsonl(DATA / "corpus" / f"{b}.jsonl", rows)
    done = {i for i, notes in per_item.items() if any(n["adjudication"] for n in notes)}
    disp = [{"id": r["id"], "context": r["context"], "response": r["response"], "prior_labels": r["prior"]}
            for r in test_disp + train_disp if str(r["id"]) not in done]
    write_jsonl(DATA / "labels" / "adjudicate-input.jsonl", disp)
    (DATA / "merge_stats.json").write_text(json.dumps({"test": dict(ts), "corpus": dict(cs)}, indent=1))
    print(f"test: {len(test_d)} rows {dict(ts)}")
    print(f"corpus: {len(train_d)} rows {dict(cs)}")
    print(f"to adjudicate: {len(disp)} -> {DATA / 'labels' / 'adjudicate-input.jsonl'}")


def cmd_report(_args) -> None:
    per_item, _ = load_labels()
    dev = {f"dev-{r['id']}": r["label"] for r in dev_rows()}
    gold = collections.defaultdict(lambda: [0, 0, 0, 0, 0])  # n, exact, binary, unsafe n, unsafe caught
    for item, notes in per_item.items():
        if item not in dev:
            continue
        for a in notes:
            if a["adjudication"] or a["label"] == "drop":
                continue
            g, p = dev[item], a["label"]
            s = gold[a["by"]]
            s[0] += 1
            s[1] += g == p
            s[2] += (g == 7) == (p == 7)
            if g != 7:
                s[3] += 1
                s[4] += p != 7
    out = {"gold_agreement": {k: {"n": v[0], "accuracy": v[1] / v[0], "binary": v[2] / v[0],
                                  "unsafe_recall": v[4] / v[3] if v[3] else None}
                              for k, v in sorted(gold.items())}}
    allg = [sum(v[i] for v in gold.values()) for i in range(5)]
    if allg[0]:
        out["gold_agreement_all"] = {"n": allg[0], "accuracy": allg[1] / allg[0], "binary": allg[2] / allg[0],
                                     "unsafe_recall": allg[4] / allg[3] if allg[3] else None}
    ms = json.loads((DATA / "merge_stats.json").read_text()) if (DATA / "merge_stats.json").exists() else {}
    out["writer_vs_blind_annotator"] = {
        k: {"pairs_labelled_twice": v.get("labelled_twice", 0), "agreed": v.get("agree", 0),
            "agreement": v.get("agree", 0) / v["labelled_twice"] if v.get("labelled_twice") else None,
            "adjudicated": v.get("adjudicated", 0), "dropped": v.get("dropped", 0),
            "awaiting_adjudication": v.get("disputed", 0), "near_duplicates_removed": v.get("near_duplicate", 0)}
        for k, v in ms.items()}
    counts = collections.Counter()
    agree = collections.Counter()
    for name, files in (("corpus", sorted((DATA / "corpus").glob("*.jsonl"))), ("test", [DATA / "test" / "llm_test.jsonl"])):
        for p in files:
            if not p.exists():
                continue
            for r in read_jsonl(p):
                counts[(name, r["lang"], r["style"], r["category"])] += 1
                counts[(name, "long")] += r.get("length") == "long"
                agree[(name, "pairs")] += 1
    out["counts"] = {" / ".join(map(str, k)): v for k, v in sorted(counts.items())}
    out["agreement"] = {" / ".join(k): v for k, v in sorted(agree.items())}
    (DATA / "stats.json").write_text(json.dumps(out, ensure_ascii=False, indent=1))
    print(json.dumps(out, ensure_ascii=False, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("references")
    b = sub.add_parser("blind")
    b.add_argument("batches", nargs="+")
    b.add_argument("--annotator", required=True)
    b.add_argument("--no-calibration", action="store_true")
    sub.add_parser("merge")
    sub.add_parser("report")
    args = ap.parse_args()
    {"references": cmd_references, "blind": cmd_blind, "merge": cmd_merge, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
