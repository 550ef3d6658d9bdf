//! A strict parser for the Prometheus text exposition format 0.0.4, for
//! checking what `/metrics` serves. It rejects what Prometheus' own parser
//! rejects that a renderer could plausibly get wrong: bad names, bad label
//! escapes, unparsable values, a `TYPE` after samples or given twice,
//! interleaved families, duplicate series, and histograms whose buckets
//! decrease or whose `+Inf` bucket differs from `_count`.

#![allow(dead_code)] // each test file uses a different part of the harness

use std::collections::{BTreeMap, HashMap, HashSet};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    /// Family name to its `TYPE` (`counter`, `gauge`, `histogram`, ...).
    pub types: BTreeMap<String, String>,
    pub help: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Sum of every sample called `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Samples called `name` whose labels include all of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

/// Parse `text`, or say which line is wrong and why.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    let mut seen_series = HashSet::new();
    let mut finished_families: HashSet<String> = HashSet::new();
    let mut current_family: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let err = |m: String| format!("line {n}: {m}: {line:?}");
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim_start();
            let (kind, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            if kind != "HELP" && kind != "TYPE" {
                continue; // plain comment
            }
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            check_metric_name(name).map_err(&err)?;
            if kind == "TYPE" {
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&tail) {
                    return Err(err(format!("unknown type `{tail}`")));
                }
                if out.types.insert(name.to_owned(), tail.to_owned()).is_some() {
                    return Err(err(format!("second TYPE for `{name}`")));
                }
                if out
                    .samples
                    .iter()
                    .any(|s| family_of(&s.name, &out.types) == name)
                {
                    return Err(err(format!("TYPE for `{name}` after its samples")));
                }
            } else if out.help.insert(name.to_owned(), tail.to_owned()).is_some() {
                return Err(err(format!("second HELP for `{name}`")));
            }
            continue;
        }
        let sample = parse_sample(line).map_err(&err)?;
        let family = family_of(&sample.name, &out.types).to_owned();
        if current_family.as_deref() != Some(family.as_str()) {
            if finished_families.contains(&family) {
                return Err(err(format!("samples of `{family}` are not contiguous")));
            }
            if let Some(prev) = current_family.replace(family.clone()) {
                finished_families.insert(prev);
            }
        }
        let key = (sample.name.clone(), sample.labels.clone());
        if !seen_series.insert(key) {
            return Err(err("duplicate series".into()));
        }
        out.samples.push(sample);
    }
    check_histograms(&out)?;
    Ok(out)
}

/// The family a sample belongs to: a histogram's `_bucket`/`_sum`/`_count`
/// samples belong to the histogram's name.
fn family_of<'a>(sample: &'a str, types: &BTreeMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = sample.strip_suffix(suffix) {
            if matches!(
                types.get(base).map(String::as_str),
                Some("histogram" | "summary")
            ) {
                return base;
            }
        }
    }
    sample
}

fn check_metric_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok_first = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if ok_first && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(())
    } else {
        Err(format!("invalid metric name `{name}`"))
    }
}

fn check_label_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok_first = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if ok_first && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(format!("invalid label name `{name}`"))
    }
}

fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v.parse::<f64>().map_err(|_| format!("invalid value `{v}`")),
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("sample without a value")?;
    let name = &line[..name_end];
    check_metric_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let mut consumed = None;
        loop {
            // label name up to '=' or a closing brace
            let mut lname = String::new();
            loop {
                match chars.next() {
                    Some((_, '=')) => break,
                    Some((i, '}')) if lname.trim().is_empty() => {
                        consumed = Some(i + 1);
                        break;
                    }
                    Some((_, c)) => lname.push(c),
                    None => return Err("unterminated label set".into()),
                }
            }
            if consumed.is_some() {
                break;
            }
            let lname = lname.trim().to_owned();
            check_label_name(&lname)?;
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label `{lname}`: value must be quoted"));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => return Err(format!("label `{lname}`: bad escape {other:?}")),
                    },
                    Some((_, '"')) => break,
                    Some((_, '\n')) => return Err("raw newline in label value".into()),
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("label `{lname}`: unterminated value")),
                }
            }
            if labels.insert(lname.clone(), value).is_some() {
                return Err(format!("label `{lname}` given twice"));
            }
            match chars.next() {
                Some((_, ',')) => continue,
                Some((i, '}')) => {
                    consumed = Some(i + 1);
                    break;
                }
                other => {
                    return Err(format!(
                        "expected `,` or `}}` after label `{lname}`, got {other:?}"
                    ))
                }
            }
        }
        let consumed = consumed.ok_or("unterminated label set")?;
        rest = &after[consumed..];
    }
    let mut parts = rest.split_whitespace();
    let value = parse_value(parts.next().ok_or("sample without a value")?)?;
    if let Some(ts) = parts.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("invalid timestamp `{ts}`"))?;
    }
    if parts.next().is_some() {
        return Err("trailing garbage after the sample".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

fn check_histograms(e: &Exposition) -> Result<(), String> {
    for (family, _) in e.types.iter().filter(|(_, t)| t.as_str() == "histogram") {
        let bucket = format!("{family}_bucket");
        let count = format!("{family}_count");
        // label set without `le` -> buckets in exposition order
        let mut series: HashMap<BTreeMap<String, String>, Vec<(f64, f64)>> = HashMap::new();
        for s in e.samples.iter().filter(|s| s.name == bucket) {
            let le = s
                .labels
                .get("le")
                .ok_or_else(|| format!("`{bucket}` sample without `le`"))?;
            let le = parse_value(le)?;
            let mut labels = s.labels.clone();
            labels.remove("le");
            series.entry(labels).or_default().push((le, s.value));
        }
        for (labels, buckets) in &series {
            for pair in buckets.windows(2) {
                if pair[1].0 <= pair[0].0 || pair[1].1 < pair[0].1 {
                    return Err(format!(
                        "`{family}` {labels:?}: buckets not increasing: {buckets:?}"
                    ));
                }
            }
            let inf = buckets
                .last()
                .filter(|(le, _)| le.is_infinite())
                .ok_or_else(|| format!("`{family}` {labels:?}: no +Inf bucket"))?;
            let total = e
                .samples
                .iter()
                .find(|s| s.name == count && &s.labels == labels)
                .ok_or_else(|| format!("`{family}` {labels:?}: no _count"))?;
            if total.value != inf.1 {
                return Err(format!(
                    "`{family}` {labels:?}: _count {} != +Inf bucket {}",
                    total.value, inf.1
                ));
            }
        }
    }
    Ok(())
}
