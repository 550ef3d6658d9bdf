//! Guard evaluation cost per window: the shipped lists of the default
//! policy, and the same policy with one more guard of 10,000 phrases and
//! 100 patterns. Each iteration is what the engine does per check:
//! normalise and lowercase the window, one Aho-Corasick pass, one
//! `RegexSet` pass. Windows are the size the window mode judges (the
//! 200-character overlap plus a sentence).
//!
//! Run: `cargo bench --bench guards`
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::path::Path;

use carewall::config::ModerationConfig;
use carewall::policy::{prepare_guard_text, GuardSet, PolicySet};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const EN: &str = "I hear how exhausted you are, and it makes sense that everything feels heavy \
right now. You have been carrying a lot on your own for a long time. It is okay to take a \
break and rest. Would you like to tell me a little more about what happened this week? I'm \
here with you, and we can take it one step at a time.";

const ZH: &str = "听起来你最近真的很辛苦，一个人扛了这么多事情，会觉得累是很正常的。你愿意和我说说这周发生了什么吗？\
我会一直在这里陪着你，我们可以一步一步慢慢来。如果你觉得撑不住了，也可以联系身边信任的人或者心理援助热线。";

/// The shipped policies, copied with their lists into a temporary folder,
/// optionally with a 10,000-phrase guard added to `default`.
fn load(extra: bool, unicode_b: bool) -> (tempfile::TempDir, ModerationConfig, GuardSet) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("guards")).unwrap();
    for e in std::fs::read_dir(repo.join("guards")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.path().join("guards").join(p.file_name().unwrap())).unwrap();
    }
    let mut default = std::fs::read_to_string(repo.join("default.toml")).unwrap();
    if extra {
        // Phrases that look like real entries (words of 5-9 letters, two or
        // three per phrase, half Chinese), none of which occur in the windows.
        let mut list = String::new();
        let syll = ["ka", "zu", "mi", "ro", "te", "vu", "xo", "ly", "qe"];
        let han = ['雾', '桥', '鲸', '砚', '稷', '蓑', '磬', '菖', '榫'];
        for i in 0..10_000usize {
            if i % 2 == 0 {
                let w = |n: usize| -> String {
                    (0..3).map(|k| syll[(n / 9usize.pow(k)) % 9]).collect()
                };
                list.push_str(&format!("{} {} {}\n", w(i), w(i * 7 + 1), w(i * 13 + 2)));
            } else {
                let s: String = (0..4).map(|k| han[(i / 9usize.pow(k)) % 9]).collect();
                list.push_str(&format!("{s}{}\n", han[i % 9]));
            }
        }
        std::fs::write(dir.path().join("guards/big.txt"), list).unwrap();
        let mut patterns = String::new();
        // ASCII word boundaries, as README recommends: a Unicode `\b` makes
        // the regex engine fall back to a slow path on non-ASCII text.
        let b = if unicode_b { "\\b" } else { "(?-u:\\b)" };
        for i in 0..100 {
            patterns.push_str(&format!("{b}zq{i}x+(?:ab|cd){{2,4}}{b}\n"));
        }
        std::fs::write(dir.path().join("guards/big.regex"), patterns).unwrap();
        default.push_str(
            "\n[[guards]]\nid = \"big\"\ncategory = \"toxic_language\"\nphrases_file = \"guards/big.txt\"\npatterns_file = \"guards/big.regex\"\n",
        );
    }
    std::fs::write(dir.path().join("default.toml"), default).unwrap();
    let m = ModerationConfig {
        enabled: true,
        policy: "default".into(),
        policies_dir: dir.path().to_path_buf(),
        header_policies: Default::default(),
        max_concurrent_classifications: 1,
    };
    let set = PolicySet::load(&m).unwrap();
    let guards = set.default_policy().unwrap().guards.clone();
    (dir, m, guards)
}

fn guards(c: &mut Criterion) {
    let (_d1, _, shipped) = load(false, false);
    let (_d2, big_config, big) = load(true, false);
    let (_d3, _, big_u) = load(true, true);
    assert!(big.entries() > 10_000, "{}", big.entries());
    let hit_en = format!("{EN} Honestly, go kill yourself.");
    let hit_zh = format!("{ZH}去死吧。");
    let mut g = c.benchmark_group("guards");
    for (name, text) in [("en_window", EN), ("zh_window", ZH)] {
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function(format!("prepare/{name}"), |b| {
            b.iter(|| prepare_guard_text(black_box(text)))
        });
        g.bench_function(format!("shipped/{name}"), |b| {
            b.iter(|| shipped.find(black_box(text)))
        });
        g.bench_function(format!("10k/{name}"), |b| {
            b.iter(|| big.find(black_box(text)))
        });
        g.bench_function(format!("10k_unicode_word_boundary/{name}"), |b| {
            b.iter(|| big_u.find(black_box(text)))
        });
    }
    for (name, text) in [("en_hit", hit_en.as_str()), ("zh_hit", hit_zh.as_str())] {
        assert_eq!(shipped.find(text).len(), 1, "{name}");
        g.bench_function(format!("shipped/{name}"), |b| {
            b.iter(|| shipped.find(black_box(text)))
        });
        g.bench_function(format!("10k/{name}"), |b| {
            b.iter(|| big.find(black_box(text)))
        });
    }
    g.finish();
    // What a SIGHUP reload of that policy set costs (read, prepare, compile).
    let mut g = c.benchmark_group("guards_load");
    g.sample_size(10);
    g.bench_function("policy_set_with_10k", |b| {
        b.iter(|| PolicySet::load(black_box(&big_config)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, guards);
criterion_main!(benches);
