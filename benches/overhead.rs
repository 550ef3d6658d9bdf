//! Gateway overhead: the same mock upstream called directly and through
//! carewall (moderation off = pass-through, and on with the keyword
//! classifier), closed loop at concurrency 1 and 32, and open loop at a
//! fixed rate. Prints a Markdown table for BENCHMARKS.md.
//!
//!   cargo bench --bench overhead            (BENCH_SECS=5 by default)
//!
//! Everything runs on this machine: the load generator, the mock upstream
//! and the gateway share its cores, so absolute numbers include that
//! contention. Only loopback addresses are used; every loop is bounded.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

struct Stats {
    n: usize,
    errors: usize,
    secs: f64,
    p50: f64,
    p99: f64,
}

fn stats(mut lat: Vec<f64>, errors: usize, secs: f64) -> Stats {
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        if lat.is_empty() {
            f64::NAN
        } else {
            lat[((lat.len() as f64 - 1.0) * p).round() as usize]
        }
    };
    Stats {
        n: lat.len(),
        errors,
        secs,
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

async fn one(client: &reqwest::Client, url: &str, body: &Value) -> Result<f64, ()> {
    let t = Instant::now();
    let r = client.post(url).json(body).send().await.map_err(|_| ())?;
    if !r.status().is_success() {
        return Err(());
    }
    r.bytes().await.map_err(|_| ())?;
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

/// `conc` workers each sending back-to-back requests for `secs`.
async fn closed_loop(url: &str, body: &Value, conc: usize, secs: f64) -> Stats {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client");
    // Warm the connection pool and caches.
    for _ in 0..(conc * 4) {
        let _ = one(&client, url, body).await;
    }
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (client, url, body) = (client.clone(), url.to_string(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            while Instant::now() < end {
                match one(&client, &url, &body).await {
                    Ok(ms) => lat.push(ms),
                    Err(()) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("worker");
        lat.extend(l);
        errors += e;
    }
    stats(lat, errors, secs)
}

/// Requests started at a fixed rate regardless of responses (open loop),
/// with `Authorization: Bearer <key>` when `key` is given.
async fn open_loop(url: &str, body: &Value, rate: u64, secs: f64, key: Option<&str>) -> Stats {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(k) = key {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {k}").parse().expect("header"),
        );
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .default_headers(headers)
        .build()
        .expect("client");
    for _ in 0..64 {
        let _ = one(&client, url, body).await;
    }
    let total = (rate as f64 * secs) as usize;
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..total {
        tick.tick().await;
        let (client, url, body, tx) = (client.clone(), url.to_string(), body.clone(), tx.clone());
        tokio::spawn(async move {
            let _ = tx.send(one(&client, &url, &body).await);
        });
    }
    drop(tx);
    let mut lat = Vec::new();
    let mut errors = 0;
    while let Some(r) = rx.recv().await {
        match r {
            Ok(ms) => lat.push(ms),
            Err(()) => errors += 1,
        }
    }
    stats(lat, errors, secs)
}

fn row(name: &str, s: &Stats, base: Option<&Stats>) -> String {
    let added = |a: f64, b: Option<f64>| match b {
        Some(b) => format!("{:+.3}", a - b),
        None => "-".into(),
    };
    format!(
        "| {name} | {:.0} | {:.3} | {:.3} | {} | {} | {} |",
        s.n as f64 / s.secs,
        s.p50,
        s.p99,
        added(s.p50, base.map(|b| b.p50)),
        added(s.p99, base.map(|b| b.p99)),
        s.errors
    )
}

fn main() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let rate: u64 = std::env::var("BENCH_RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let reply: &'static [&'static str] = &[
            "I hear you. ",
            "That sounds really hard. ",
            "I'm here with you.",
        ];
        let mock = MockUpstream::start(move |_, _| MockReply::Text {
            pieces: reply.iter().map(|s| s.to_string()).collect(),
            delay: Duration::ZERO,
            end: StreamEnd::Done,
        })
        .await;
        // Both gateways log one JSON access line per request (the default).
        let off = Gateway::start(
            GatewayOptions::new(Some(mock.base_url()))
                .env("CAREWALL__MODERATION__ENABLED", "false"),
        );
        let on = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
        // Pass-through behind eight client keys (the check hashes the
        // presented key and compares it with every digest).
        let mut keyed_opts = GatewayOptions::new(Some(mock.base_url()))
            .env("CAREWALL__MODERATION__ENABLED", "false");
        keyed_opts.server_extra = format!(
            "client_keys = [{}]\n",
            (0..8)
                .map(|i| format!("\"bench-client-key-{i:04}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let keyed = Gateway::start(keyed_opts);
        let keyed_url = format!("{}/chat/completions", keyed.base_url());
        let direct_url = format!("{}/chat/completions", mock.base_url());
        let off_url = format!("{}/chat/completions", off.base_url());
        let on_url = format!("{}/chat/completions", on.base_url());
        let body = chat_body("I can't sleep and I feel anxious.", false);
        let stream_body = chat_body("I can't sleep and I feel anxious.", true);

        println!("bench: {secs} s per cell, open loop at {rate} req/s, mock replies with no delay");
        println!("| path | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | errors |");
        println!("|---|---|---|---|---|---|---|");
        for conc in [1usize, 32] {
            let d = closed_loop(&direct_url, &body, conc, secs).await;
            println!("{}", row(&format!("direct, c={conc}"), &d, None));
            let o = closed_loop(&off_url, &body, conc, secs).await;
            println!(
                "{}",
                row(&format!("gateway, moderation off, c={conc}"), &o, Some(&d))
            );
            let m = closed_loop(&on_url, &body, conc, secs).await;
            println!(
                "{}",
                row(
                    &format!("gateway, moderation on (keyword), c={conc}"),
                    &m,
                    Some(&d)
                )
            );
            let ds = closed_loop(&direct_url, &stream_body, conc, secs).await;
            println!("{}", row(&format!("direct, stream, c={conc}"), &ds, None));
            let ms = closed_loop(&on_url, &stream_body, conc, secs).await;
            println!(
                "{}",
                row(
                    &format!("gateway, stream, window mode (keyword), c={conc}"),
                    &ms,
                    Some(&ds)
                )
            );
        }
        let d = open_loop(&direct_url, &body, rate, secs * 2.0, None).await;
        println!(
            "{}",
            row(&format!("direct, open loop {rate} req/s"), &d, None)
        );
        let o = open_loop(&off_url, &body, rate, secs * 2.0, None).await;
        println!(
            "{}",
            row(
                &format!("gateway, moderation off, open loop {rate} req/s"),
                &o,
                Some(&d)
            )
        );
        let k = open_loop(
            &keyed_url,
            &body,
            rate,
            secs * 2.0,
            Some("bench-client-key-0007"),
        )
        .await;
        println!(
            "{}",
            row(
                &format!("gateway, moderation off, 8 client keys, open loop {rate} req/s"),
                &k,
                Some(&d)
            )
        );
        drop((off, on, keyed));
    });
}
