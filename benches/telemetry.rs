//! Cost of telemetry on the request path: metric recording, the per-request
//! span bundle with tracing off (the default), and `/metrics` rendering.
//!
//!   cargo bench --bench telemetry

use std::hint::black_box;
use std::time::Duration;

use carewall::classifier::Category;
use carewall::telemetry::{Metrics, RequestTelemetry, TelemetrySettings};
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, Method};

fn metrics(c: &mut Criterion) {
    let m = Metrics::new(&TelemetrySettings::default()).unwrap_or_else(|e| panic!("{e}"));
    let categories = Category::ALL;
    let mut i = 0usize;
    c.bench_function("record_response (3 labels)", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            m.record_response(black_box(categories[i % 8].key()), "allow", "enforce")
        })
    });
    c.bench_function("record_request (route, status)", |b| {
        b.iter(|| m.record_request(black_box("/v1/chat/completions"), black_box(200)))
    });
    c.bench_function("record_ttft (3 histograms)", |b| {
        b.iter(|| {
            m.record_ttft(
                "window",
                black_box(Duration::from_millis(130)),
                black_box(Duration::from_millis(100)),
            )
        })
    });
    c.bench_function(
        "request bundle, tracing off (start..finish, 2 classifications)",
        |b| {
            let headers = HeaderMap::new();
            b.iter(|| {
                let mut r = RequestTelemetry::start(
                    &m,
                    &Method::POST,
                    "/v1/chat/completions",
                    "0194f1e2-7c3b-7d4e-8f00-000000000000",
                    &headers,
                );
                r.set_request("gpt-4o-mini", true);
                r.set_streaming("window");
                let mut up = HeaderMap::new();
                let call = r.upstream_call(&mut up);
                r.upstream_first_token();
                r.classification("window").done(Category::SafeResponse, 0.9);
                r.client_first_token();
                r.classification("final").done(Category::SafeResponse, 0.9);
                r.set_verdict(Category::SafeResponse.key(), "allow", "enforce", "default");
                call.finish(Some(200), None);
                r.finish(200);
            })
        },
    );
    c.bench_function("render_prometheus (all series populated)", |b| {
        b.iter(|| black_box(m.render_prometheus()))
    });
}

criterion_group!(benches, metrics);
criterion_main!(benches);
