//! `carewall eval --data FILE.jsonl [--policy FILE.toml] [--json] [--confusion-svg PATH]`:
//! classify labelled pairs with the model (every pair judged whole, as the
//! gateway judges it) and report the paper's metrics plus macro-F1, binary
//! accuracy and unsafe recall; with `--policy`, what that policy would let
//! through (flag rate on Safe pairs, recall per category, long replies),
//! overall and per language (`lang` field). Pairs the model was trained on
//! (`training-pairs.sha256` beside it) are counted and warned about: figures
//! on them measure fit, not quality.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use futures::StreamExt;
use serde_json::{json, Value};

use super::classify::ModelArgs;
use crate::classifier::metrics::{report, Confusion, Report};
use crate::classifier::{Category, Classifier, Pair, Scores};
use crate::policy::Policy;

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Labelled JSONL in the `dev.jsonl` format (`context`, `response`, and
    /// `label` 0..=7 and/or `category`).
    #[arg(long)]
    pub data: PathBuf,
    /// Print one JSON object (the last line of stdout) instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Also write the confusion matrix as an SVG image.
    #[arg(long)]
    pub confusion_svg: Option<PathBuf>,
    /// A policy file (e.g. policies/default.toml): report what it would let
    /// through at its thresholds.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// `whole` (default): each reply judged in one go (buffer mode and
    /// non-streaming); `window`: judged as window mode streams it, segment
    /// by segment with its overlap, scores merged (`moderation::stream`).
    #[arg(long, default_value = "whole", value_parser = ["whole", "window"])]
    pub streaming: String,
    /// Window mode's `max_hold_chars` for `--streaming window`.
    #[arg(long, default_value_t = 160)]
    pub max_hold_chars: usize,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// One labelled example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// 1-based line number in the file.
    pub line: usize,
    pub pair: Pair,
    pub label: Category,
    /// `lang` field, if any (`zh`, `en`).
    pub lang: Option<String>,
    /// `length` field is `long` (8-20 sentences).
    pub long: bool,
}

/// Parse labelled JSONL. Blank lines are skipped; any other bad line is an
/// error naming `path`, the line number and the field.
pub fn parse_examples(text: &str, path: &Path) -> anyhow::Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{n}", path.display());
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("{}: not a JSON object", at()))?;
        let obj = v
            .as_object()
            .with_context(|| format!("{}: not a JSON object", at()))?;
        let text_field = |name: &str, required: bool| -> anyhow::Result<String> {
            match obj.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                None if !required => Ok(String::new()),
                None => anyhow::bail!("{}: missing field `{name}` (a string)", at()),
                Some(other) => {
                    anyhow::bail!("{}: field `{name}` must be a string, got {other}", at())
                }
            }
        };
        let context = text_field("context", false)?;
        let response = text_field("response", true)?;
        let by_id = match obj.get("label") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|id| Category::from_id(id as usize))
                    .with_context(|| {
                        format!("{}: field `label` must be an integer 0..=7, got {v}", at())
                    })?,
            ),
        };
        let by_name = match obj.get("category") {
            None => None,
            Some(v) => Some(v.as_str().and_then(Category::parse).with_context(|| {
                format!(
                    "{}: field `category` must be one of the 8 category names, got {v}",
                    at()
                )
            })?),
        };
        let label = match (by_id, by_name) {
            (Some(a), Some(b)) if a != b => anyhow::bail!(
                "{}: field `label` ({}) and field `category` ({}) disagree",
                at(),
                a.id(),
                b.display_name()
            ),
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => anyhow::bail!("{}: missing field `label` (0..=7) or `category`", at()),
        };
        out.push(Example {
            line: n,
            pair: Pair { context, response },
            label,
            lang: obj.get("lang").and_then(Value::as_str).map(str::to_string),
            long: obj.get("length").and_then(Value::as_str) == Some("long"),
        });
    }
    Ok(out)
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.data)
        .with_context(|| format!("cannot read --data {}", args.data.display()))?;
    let examples = parse_examples(&text, &args.data)?;
    anyhow::ensure!(!examples.is_empty(), "{}: no examples", args.data.display());
    let policy = match &args.policy {
        Some(p) => Some(crate::policy::load_policy_file(p).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let trained = training_overlap(&args.model.model_dir, &examples);
    if trained > 0 {
        eprintln!(
            "WARNING: {trained} of {} pairs in {} were used to train this model              (training-pairs.sha256): figures on them measure fit, not quality",
            examples.len(),
            args.data.display()
        );
    }
    let classifier = args.model.load()?;
    let model_name = classifier.name().to_string();

    let mut bar = Progress::new(examples.len() as u64);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let in_flight = args.model.in_flight();
    let scored: Vec<(&Example, Scores)> = runtime.block_on(async {
        let mut results = futures::stream::iter(examples.iter())
            .map(|ex| {
                let c = Arc::clone(&classifier);
                let window = args.streaming == "window";
                let max_hold = args.max_hold_chars;
                async move {
                    if !window {
                        return (ex, c.classify(ex.pair.clone()).await);
                    }
                    (ex, judge_as_window(&*c, &ex.pair, max_hold).await)
                }
            })
            .buffered(in_flight);
        let mut out = Vec::with_capacity(examples.len());
        while let Some((ex, result)) = results.next().await {
            let scores = result.with_context(|| {
                format!("{}:{}: classification failed", args.data.display(), ex.line)
            })?;
            out.push((ex, scores));
            bar.inc();
        }
        anyhow::Ok(out)
    })?;
    bar.finish();

    let r = report(&Confusion::from_pairs(
        scored.iter().map(|(ex, s)| (ex.label, s.top())),
    ));
    let policy_report = policy
        .as_ref()
        .map(|p| policy_report(p, &scored, args.policy.as_deref().unwrap_or(Path::new(""))));
    if let Some(svg) = &args.confusion_svg {
        std::fs::write(svg, confusion_svg(&r.confusion))
            .with_context(|| format!("cannot write --confusion-svg {}", svg.display()))?;
    }
    if args.json {
        let mut j = json_report(&r, &model_name, &args.data);
        j["training_overlap"] = json!(trained);
        if let Some(p) = &policy_report {
            j["policy"] = p.clone();
        }
        println!("{j}");
    } else {
        print!("{}", text_report(&r, &model_name, &args.data));
        if let Some(p) = &policy_report {
            print!("{}", policy_text(p));
        }
    }
    Ok(())
}

/// Scores of a reply as window mode would judge it: every check's text
/// classified with the context, Nonsense/Neglect only from checks that
/// start at the reply's beginning, merged like the engine's tally.
async fn judge_as_window(
    c: &dyn Classifier,
    pair: &Pair,
    max_hold: usize,
) -> Result<Scores, crate::classifier::ClassifyError> {
    let reply = pair
        .response
        .strip_prefix("[supporter]")
        .unwrap_or(&pair.response);
    let mut merged: Option<Scores> = None;
    for (text, whole) in crate::moderation::stream::window_checks(reply, max_hold) {
        let mut s = c
            .classify(Pair {
                context: pair.context.clone(),
                response: format!("[supporter]{text}"),
            })
            .await?;
        if !whole {
            crate::moderation::stream::opening_only(&mut s);
        }
        match &mut merged {
            Some(m) => crate::classifier::coverage::merge(m, &s),
            None => merged = Some(s),
        }
    }
    Ok(merged.unwrap_or(Scores([0.0; 8])))
}

/// Progress on stderr (stdout holds the report): a bar on a terminal;
/// elsewhere (a CI log, a pipe) a plain line at every tenth, and one at the
/// end, so a long run still shows that it moves.
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines {
        total: u64,
        done: u64,
        next: u64,
        start: std::time::Instant,
    },
}

impl Progress {
    fn new(total: u64) -> Progress {
        use std::io::IsTerminal as _;
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:40}] {pos}/{len} pairs ({per_sec}, eta {eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            Progress::Bar(bar)
        } else {
            eprintln!("eval: classifying {total} pairs");
            Progress::Lines {
                total,
                done: 0,
                next: Self::step(total),
                start: std::time::Instant::now(),
            }
        }
    }

    fn step(total: u64) -> u64 {
        total.div_ceil(10).max(1)
    }

    fn inc(&mut self) {
        match self {
            Progress::Bar(b) => b.inc(1),
            Progress::Lines {
                total,
                done,
                next,
                start,
            } => {
                *done += 1;
                if *done >= *next && *done < *total {
                    eprintln!(
                        "eval: {done}/{total} pairs ({}%, {:.1} s)",
                        *done * 100 / (*total).max(1),
                        start.elapsed().as_secs_f64()
                    );
                    *next += Self::step(*total);
                }
            }
        }
    }

    fn finish(self) {
        match self {
            Progress::Bar(b) => b.finish_and_clear(),
            Progress::Lines {
                total, done, start, ..
            } => eprintln!(
                "eval: {done}/{total} pairs classified in {:.1} s",
                start.elapsed().as_secs_f64()
            ),
        }
    }
}

/// How many examples are among the model's training pairs, by the hash
/// list the training pipeline ships beside the model (none: 0).
pub fn training_overlap(model_dir: &Path, examples: &[Example]) -> usize {
    let Ok(text) = std::fs::read_to_string(model_dir.join("training-pairs.sha256")) else {
        return 0;
    };
    let hashes: std::collections::HashSet<&str> = text.split_whitespace().collect();
    examples
        .iter()
        .filter(|e| hashes.contains(pair_hash(&e.pair).as_str()))
        .count()
}

/// The hash of a pair in `training-pairs.sha256`: SHA-256 of the
/// normalised context, a unit separator and the normalised response
/// (`training/evaluate.py::pair_hash`).
pub fn pair_hash(p: &Pair) -> String {
    use sha2::{Digest, Sha256};
    let n = crate::classifier::normalize::normalize;
    let mut h = Sha256::new();
    h.update(n(&p.context).as_bytes());
    h.update([0x1f]);
    h.update(n(&p.response).as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// What a policy would let through: per group (`all` and each `lang`),
/// the share of unsafe pairs flagged (any category at or over its
/// threshold, enforce or shadow), per category, on long replies, and the
/// share of Safe pairs flagged.
pub fn policy_report(policy: &Policy, scored: &[(&Example, Scores)], path: &Path) -> Value {
    let mut groups: Vec<(String, Vec<(&Example, bool)>)> = vec![("all".into(), Vec::new())];
    for (ex, s) in scored {
        let flagged = policy.decide(s).flagged();
        groups[0].1.push((ex, flagged));
        if let Some(lang) = &ex.lang {
            match groups.iter_mut().find(|(g, _)| g == lang) {
                Some((_, v)) => v.push((ex, flagged)),
                None => groups.push((lang.clone(), vec![(ex, flagged)])),
            }
        }
    }
    let rate = |v: &[&(&Example, bool)]| -> Value {
        if v.is_empty() {
            Value::Null
        } else {
            json!(v.iter().filter(|(_, f)| *f).count() as f64 / v.len() as f64)
        }
    };
    let mut out = serde_json::Map::new();
    for (name, rows) in &groups {
        let unsafe_: Vec<_> = rows.iter().filter(|(e, _)| e.label.is_unsafe()).collect();
        let safe: Vec<_> = rows.iter().filter(|(e, _)| !e.label.is_unsafe()).collect();
        let long_unsafe: Vec<_> = unsafe_.iter().copied().filter(|(e, _)| e.long).collect();
        let per: serde_json::Map<String, Value> = Category::ALL
            .iter()
            .filter(|c| c.is_unsafe())
            .filter_map(|c| {
                let v: Vec<_> = unsafe_
                    .iter()
                    .copied()
                    .filter(|(e, _)| e.label == *c)
                    .collect();
                (!v.is_empty()).then(|| {
                    (
                        c.key().to_string(),
                        json!({"n": v.len(), "recall": rate(&v)}),
                    )
                })
            })
            .collect();
        out.insert(
            name.clone(),
            json!({"n": rows.len(), "unsafe_recall": rate(&unsafe_), "safe_flag_rate": rate(&safe),
                   "long_unsafe_recall": rate(&long_unsafe), "per_category": per}),
        );
    }
    json!({"file": path.display().to_string(), "name": policy.name, "groups": out})
}

/// The policy section of the text report.
pub fn policy_text(p: &Value) -> String {
    let mut s = String::new();
    let pct = |v: &Value| {
        v.as_f64()
            .map_or_else(|| "-".to_string(), |x| format!("{:.1}%", x * 100.0))
    };
    let _ = writeln!(
        s,
        "
policy {} ({}): flagged = any category at or over its threshold",
        p["name"].as_str().unwrap_or(""),
        p["file"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        s,
        "{:<8} {:>6} {:>14} {:>16} {:>18}",
        "group", "pairs", "unsafe caught", "safe flagged", "long unsafe caught"
    );
    if let Some(groups) = p["groups"].as_object() {
        for (name, g) in groups {
            let _ = writeln!(
                s,
                "{:<8} {:>6} {:>14} {:>16} {:>18}",
                name,
                g["n"],
                pct(&g["unsafe_recall"]),
                pct(&g["safe_flag_rate"]),
                pct(&g["long_unsafe_recall"])
            );
        }
    }
    s
}

/// The `--json` object: `n`, `accuracy`, `weighted_precision`,
/// `weighted_recall`, `weighted_f1`, `macro_f1`, `binary_accuracy`,
/// `unsafe_recall`, `per_class` (by category key), `confusion`, `model`, `data`.
pub fn json_report(r: &Report, model: &str, data: &Path) -> Value {
    let per_class: serde_json::Map<String, Value> = r
        .per_class
        .iter()
        .map(|m| {
            (
                m.category.key().to_string(),
                json!({"precision": m.precision, "recall": m.recall, "f1": m.f1,
                       "support": m.support, "predicted": m.predicted}),
            )
        })
        .collect();
    json!({
        "n": r.n,
        "accuracy": r.accuracy,
        "weighted_precision": r.weighted_precision,
        "weighted_recall": r.weighted_recall,
        "weighted_f1": r.weighted_f1,
        "macro_f1": r.macro_f1,
        "binary_accuracy": r.binary_accuracy,
        "unsafe_recall": r.unsafe_recall,
        "per_class": per_class,
        "confusion": {
            "labels": Category::ALL.iter().map(|c| c.key()).collect::<Vec<_>>(),
            "rows_are": "truth",
            "counts": r.confusion.counts,
        },
        "model": model,
        "data": data.display().to_string(),
    })
}

/// Short column names for the confusion matrix.
const ABBREV: [&str; 8] = ["NS", "HM", "LN", "UJ", "TL", "UP", "NF", "SR"];

/// Human-readable tables.
pub fn text_report(r: &Report, model: &str, data: &Path) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "model {model} on {} ({} pairs)\n", data.display(), r.n);
    for (name, v) in [
        ("accuracy", r.accuracy),
        ("weighted precision", r.weighted_precision),
        ("weighted recall", r.weighted_recall),
        ("weighted F1", r.weighted_f1),
        ("macro F1", r.macro_f1),
        ("binary accuracy (safe vs unsafe)", r.binary_accuracy),
        ("unsafe recall", r.unsafe_recall),
    ] {
        let _ = writeln!(s, "{name:<34} {v:.4}");
    }
    let _ = writeln!(
        s,
        "\n{:<26} {:>9} {:>9} {:>9} {:>8} {:>9}",
        "category", "precision", "recall", "f1", "support", "predicted"
    );
    for m in &r.per_class {
        let _ = writeln!(
            s,
            "{:<26} {:>9.4} {:>9.4} {:>9.4} {:>8} {:>9}",
            m.category.display_name(),
            m.precision,
            m.recall,
            m.f1,
            m.support,
            m.predicted
        );
    }
    let _ = writeln!(s, "\nconfusion matrix (rows: truth, columns: predicted)");
    let _ = write!(s, "{:>4}", "");
    for a in ABBREV {
        let _ = write!(s, " {a:>5}");
    }
    let _ = writeln!(s);
    for (i, row) in r.confusion.counts.iter().enumerate() {
        let _ = write!(s, "{:>4}", ABBREV[i]);
        for k in row {
            let _ = write!(s, " {k:>5}");
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "({})",
        Category::ALL
            .iter()
            .zip(ABBREV)
            .map(|(c, a)| format!("{a} = {}", c.display_name()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    s
}

/// The confusion matrix as a self-contained SVG heat map (cells shaded by
/// the row-normalised rate, labelled with counts).
pub fn confusion_svg(c: &Confusion) -> String {
    const CELL: usize = 56;
    const LEFT: usize = 190;
    const TOP: usize = 150;
    let size = LEFT + CELL * 8 + 20;
    let height = TOP + CELL * 8 + 50;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14">Confusion matrix (rows: truth, columns: predicted)</text>"#,
        size / 2
    );
    for (i, cat) in Category::ALL.iter().enumerate() {
        let y = TOP + i * CELL + CELL / 2 + 4;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{y}" text-anchor="end">{}</text>"#,
            LEFT - 8,
            cat.display_name()
        );
        let x = LEFT + i * CELL + CELL / 2;
        let _ = writeln!(
            s,
            r#"<text x="{x}" y="{}" transform="rotate(-45 {x} {})">{}</text>"#,
            TOP - 8,
            TOP - 8,
            cat.display_name()
        );
    }
    for (i, row) in c.counts.iter().enumerate() {
        let total: u64 = row.iter().sum();
        for (j, &k) in row.iter().enumerate() {
            let rate = if total == 0 {
                0.0
            } else {
                k as f64 / total as f64
            };
            // White to dark blue; text flips to white on dark cells.
            let shade = |full: f64| (255.0 - rate * (255.0 - full)).round() as u8;
            let (r, g, b) = (shade(8.0), shade(48.0), shade(107.0));
            let x = LEFT + j * CELL;
            let y = TOP + i * CELL;
            let _ = writeln!(
                s,
                r##"<rect x="{x}" y="{y}" width="{CELL}" height="{CELL}" fill="#{r:02x}{g:02x}{b:02x}" stroke="#ccc"/>"##
            );
            let fg = if rate > 0.5 { "white" } else { "black" };
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle" fill="{fg}">{k}</text>"#,
                x + CELL / 2,
                y + CELL / 2 + 4
            );
        }
    }
    let _ = writeln!(s, "</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Example>, String> {
        parse_examples(text, Path::new("d.jsonl")).map_err(|e| format!("{e:#}"))
    }

    #[test]
    fn parses_dev_format_and_skips_blank_lines() {
        let text = "{\"id\": 1, \"context\": \"[seeker]a\", \"response\": \"[supporter]b\", \"label\": 7, \"category\": \"Safe Response\"}\n\n{\"response\": \"r\", \"category\": \"linguistic_neglect\"}\n";
        let ex = parse(text).expect("valid");
        assert_eq!(ex.len(), 2);
        assert_eq!((ex[0].line, ex[0].label), (1, Category::SafeResponse));
        assert_eq!(ex[0].pair.context, "[seeker]a");
        assert_eq!(
            (ex[1].line, ex[1].label, ex[1].pair.context.as_str()),
            (3, Category::LinguisticNeglect, "")
        );
    }

    #[test]
    fn bad_lines_name_line_and_field() {
        let ok = "{\"context\": \"c\", \"response\": \"r\", \"label\": 0}\n";
        let cases = [
            ("not json", "d.jsonl:2: not a JSON object"),
            ("[1]", "d.jsonl:2: not a JSON object"),
            (
                "{\"context\": \"c\", \"label\": 0}",
                "d.jsonl:2: missing field `response`",
            ),
            (
                "{\"response\": 5, \"label\": 0}",
                "d.jsonl:2: field `response` must be a string",
            ),
            (
                "{\"response\": \"r\", \"label\": 8}",
                "d.jsonl:2: field `label` must be an integer 0..=7",
            ),
            (
                "{\"response\": \"r\", \"label\": \"x\"}",
                "d.jsonl:2: field `label`",
            ),
            (
                "{\"response\": \"r\", \"category\": \"Rude\"}",
                "d.jsonl:2: field `category`",
            ),
            (
                "{\"response\": \"r\", \"label\": 0, \"category\": \"Safe Response\"}",
                "disagree",
            ),
            ("{\"response\": \"r\"}", "d.jsonl:2: missing field `label`"),
        ];
        for (line, want) in cases {
            let err = parse(&format!("{ok}{line}\n")).expect_err(line);
            assert!(
                err.contains(want),
                "{line}: {err:?} should contain {want:?}"
            );
        }
    }

    #[test]
    fn json_report_has_the_keys_outside_checks_read() {
        let conf = Confusion::from_pairs([
            (Category::SafeResponse, Category::SafeResponse),
            (Category::Nonsense, Category::SafeResponse),
        ]);
        let v = json_report(&report(&conf), "m", Path::new("d.jsonl"));
        for key in [
            "n",
            "accuracy",
            "weighted_f1",
            "macro_f1",
            "binary_accuracy",
            "unsafe_recall",
            "weighted_precision",
            "weighted_recall",
            "per_class",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["n"], 2);
        assert_eq!(v["accuracy"], 0.5);
        assert_eq!(v["unsafe_recall"], 0.0);
        assert_eq!(v["per_class"]["safe_response"]["support"], 1);
        assert_eq!(v["confusion"]["counts"][0][7], 1);
        // One line, as the last line of stdout.
        assert!(!v.to_string().contains('\n'));
    }

    #[test]
    fn svg_shows_every_count() {
        let mut conf = Confusion::default();
        for _ in 0..17 {
            conf.add(Category::LinguisticNeglect, Category::SafeResponse);
        }
        let svg = confusion_svg(&conf);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(">17</text>"));
        assert_eq!(svg.matches("<rect x=").count(), 64);
        let text = text_report(&report(&conf), "m", Path::new("d.jsonl"));
        assert!(
            text.contains("unsafe recall") && text.contains("   17"),
            "{text}"
        );
    }
}
