//! The review console end to end in a real headless Chromium, driven over
//! the W3C WebDriver protocol by Debian's `chromedriver` (a few JSON calls
//! with reqwest; no WebDriver crate needed): sign in (a bad token first),
//! filter by the real actions, relabel with a key press, undo, the review
//! history, an unsaved note that keeps the record in place, what the person
//! received, an export that follows the filters; dates as days in the
//! reviewer's time zone (America/New_York) and a failed filter clearing the
//! list; both layouts (1280x720 and 768 px wide) with the label buttons in
//! view. Screenshots go to `$CARGO_TARGET_TMPDIR/audit-console/`
//! (`target/tmp/audit-console/`).
//!
//! Needs `chromium` and `chromium-driver` (`bash scripts/setup.sh
//! --browser`). Without them the test says so and passes, unless
//! `CAREWALL_REQUIRE_BROWSER=1` (set by `.ci/run`), where it fails.
#![allow(clippy::unwrap_used)]

mod audit_common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use audit_common::*;
use base64::Engine as _;
use carewall::admin::AdminState;
use carewall::audit::record::DraftRecord;
use carewall::audit::store::SqliteStore;
use carewall::audit::{AuditRecord, AuditSink, AuditStore, Overflow, SinkOptions, TextMode};
use carewall::classifier::Category;
use serde_json::{json, Value};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Driver {
    http: reqwest::Client,
    base: String,
    session: String,
}

impl Driver {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{}", self.base, self.session, path);
        let mut req = self.http.request(method, &url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp: Value = req.send().await.unwrap().json().await.unwrap();
        if resp["value"].get("error").is_some() {
            panic!("webdriver {path}: {}", resp["value"]);
        }
        resp["value"].clone()
    }
    async fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }
    async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }
    async fn find(&self, css: &str) -> String {
        let v = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("find {css}: {v}"))
            .to_string()
    }
    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.post(&format!("/element/{id}/click"), json!({})).await;
    }
    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.post(&format!("/element/{id}/clear"), json!({})).await;
        self.post(&format!("/element/{id}/value"), json!({ "text": text }))
            .await;
    }
    async fn js(&self, script: &str) -> Value {
        self.post("/execute/sync", json!({"script": script, "args": []}))
            .await
    }
    /// Poll `script` (which returns a value) until `ok` accepts it.
    async fn wait_for(&self, what: &str, script: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        // Generous: a busy CI machine runs Chromium beside other tests.
        for _ in 0..300 {
            last = self.js(script).await;
            if ok(&last) {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("timed out waiting for {what}; last value: {last}");
    }
    /// Send keys to the focused element (`\u{E00C}` is Escape).
    async fn keys(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.post(&format!("/element/{id}/value"), json!({ "text": text }))
            .await;
    }
    /// Size the window so that the page's viewport is `width` x `height`
    /// (the window's own frame comes on top).
    async fn set_window(&self, width: u32, height: u32) {
        self.post("/window/rect", json!({"width": width, "height": height}))
            .await;
        let inner = self
            .js("return [window.innerWidth, window.innerHeight]")
            .await;
        let (iw, ih) = (
            inner[0].as_u64().unwrap_or(0) as u32,
            inner[1].as_u64().unwrap_or(0) as u32,
        );
        if (iw, ih) != (width, height) && iw > 0 && ih > 0 {
            self.post(
                "/window/rect",
                json!({"width": 2 * width - iw.min(width), "height": 2 * height - ih.min(height)}),
            )
            .await;
        }
    }
    async fn screenshot(&self, path: &Path) {
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

/// Ends the WebDriver session (closing Chromium) when dropped, also when
/// the test panics; otherwise killing chromedriver would orphan the browser.
struct SessionGuard {
    wd: String,
    session: String,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let url = format!("{}/session/{}", self.wd, self.session);
        // Drop may run on the test's runtime, which must not be blocked on.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let _ = reqwest::Client::new().delete(url).send().await;
                });
            }
        })
        .join();
    }
}

fn browser_paths() -> Option<(PathBuf, PathBuf)> {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())?;
    let driver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())?;
    Some((chromium, driver))
}

/// Where the screenshots go: the integration tests' output folder.
fn shot_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("audit-console")
        .join(name)
}

/// A browser session on a console served over a fresh store. Fields drop
/// in order: the session (closing Chromium) before chromedriver.
struct Console {
    d: Driver,
    _session: SessionGuard,
    _chromedriver: tokio::process::Child,
    base: String,
    store: Arc<dyn AuditStore>,
    sink: AuditSink,
    _dir: tempfile::TempDir,
}

/// The actions records carry, cycled over the samples (allowed ones are
/// not recorded without sampling).
const ACTIONS: [&str; 6] = [
    "block",
    "annotate",
    "append",
    "retry",
    "replace",
    "unclassified",
];

/// Start chromedriver and Chromium (window `size`, time zone `tz`) on a
/// console over `records`; `None` (after saying why) without a browser.
async fn start(
    test: &str,
    size: (u32, u32),
    tz: &str,
    records: Vec<AuditRecord>,
) -> Option<Console> {
    let Some((chromium, chromedriver)) = browser_paths() else {
        let msg = "chromium / chromedriver not found; install them with `bash scripts/setup.sh --browser`";
        if std::env::var("CAREWALL_REQUIRE_BROWSER").as_deref() == Ok("1") {
            panic!("{msg} (CAREWALL_REQUIRE_BROWSER=1)");
        }
        eprintln!("SKIPPED {test}: {msg}");
        return None;
    };

    // A real store with records written through the real sink.
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn AuditStore> =
        Arc::new(SqliteStore::open(&dir.path().join("a.db")).await.unwrap());
    let sink = AuditSink::start_with(
        SinkOptions {
            queue_capacity: 100,
            batch_size: 16,
            flush_interval: Duration::from_millis(20),
            overflow: Overflow::Drop,
            sample_rate: 0.0,
            retention_days: 100_000,
            purge_every: Duration::from_secs(3600),
        },
        TextMode::Redacted,
        Some(keyring()),
        Some(pseudonymizer()),
        store.clone(),
    );
    for r in records {
        sink.try_submit(r);
    }
    sink.flush().await;
    let base = serve_admin(
        AdminState::new(store.clone(), Some(keyring()), &admin_settings()).with_sink(sink.clone()),
    )
    .await;

    // chromedriver on a free port, killed when the test ends.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let chromedriver = tokio::process::Command::new(&chromedriver)
        .arg(format!("--port={port}"))
        .env("TZ", tz)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let wd = format!("http://127.0.0.1:{port}");
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(r) = http.get(format!("{wd}/status")).send().await {
            if r.json::<Value>()
                .await
                .map(|v| v["value"]["ready"] == true)
                .unwrap_or(false)
            {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "chromedriver did not become ready on port {port}");
    let caps = json!({"capabilities": {"alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium.to_string_lossy(),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     format!("--window-size={},{}", size.0, size.1), "--lang=en-US"]
        }
    }}});
    let created: Value = http
        .post(format!("{wd}/session"))
        .json(&caps)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let session = created["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no session: {created}"))
        .to_string();
    let guard = SessionGuard {
        wd: wd.clone(),
        session: session.clone(),
    };
    let d = Driver {
        http: http.clone(),
        base: wd.clone(),
        session,
    };
    // The reviewer's zone, whatever the machine's is (TZ above as well).
    d.post(
        "/goog/cdp/execute",
        json!({"cmd": "Emulation.setTimezoneOverride", "params": {"timezoneId": tz}}),
    )
    .await;
    d.set_window(size.0, size.1).await;
    Some(Console {
        d,
        _session: guard,
        _chromedriver: chromedriver,
        base,
        store,
        sink,
        _dir: dir,
    })
}

impl Console {
    async fn sign_in(&self) {
        self.d.goto(&format!("{}/admin", self.base)).await;
        self.d.type_into("#token", TOKEN).await;
        self.d.type_into("#reviewer", "Counsellor Li").await;
        self.d.click("#login-btn").await;
        self.d
            .wait_for(
                "the queue",
                "return document.querySelectorAll('#queue li').length",
                |v| v.as_u64().unwrap_or(0) > 0,
            )
            .await;
    }

    async fn ids(&self) -> Value {
        self.d
            .js("return Array.from(document.querySelectorAll('#queue li')).map(li => li.dataset.id)")
            .await
    }

    async fn wait_ids(&self, what: &str, want: Value) {
        self.d
            .wait_for(
                what,
                "return Array.from(document.querySelectorAll('#queue li')).map(li => li.dataset.id)",
                |v| v == &want,
            )
            .await;
    }

    async fn text(&self, id: &str) -> String {
        self.d
            .js(&format!(
                "return document.getElementById('{id}').textContent"
            ))
            .await
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    async fn heading_is(&self, want: &str) {
        let want = want.to_string();
        self.d
            .wait_for(
                &format!("the detail pane to show {want}"),
                "return document.getElementById('detail-h').textContent",
                move |v| v == want.as_str(),
            )
            .await;
    }

    /// Set the date inputs (as a reviewer picking days would) and apply.
    async fn dates(&self, since: &str, until: &str) {
        self.d
            .js(&format!(
                "document.getElementById('filter-since').value = '{since}'; \
                 document.getElementById('filter-until').value = '{until}'; \
                 document.getElementById('apply').click(); return 0"
            ))
            .await;
    }
}

fn sample(i: usize) -> AuditRecord {
    let mut r = record(i);
    r.action = ACTIONS[i % ACTIONS.len()].into();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_review_flow_with_history_undo_notes_and_filtered_export() {
    let mut records: Vec<AuditRecord> = (0..24).map(sample).collect();
    // What the person received after a retry: a rejected draft, then the
    // safe reply.
    records[20].drafts = vec![DraftRecord {
        response: "[supporter]secret-draft-20 you are weak".into(),
        scores: Some(scores_for(Category::ToxicLanguage, 0.9)),
        category: Category::ToxicLanguage,
        threshold: Some(0.6),
        action: "retry".into(),
    }];
    let Some(c) = start(
        "console_review_flow_with_history_undo_notes_and_filtered_export",
        (1440, 900),
        "UTC",
        records,
    )
    .await
    else {
        return;
    };
    let d = &c.d;

    // --- page loads from the binary, no external requests ---
    d.goto(&format!("{}/admin", c.base)).await;
    let title = d.js("return document.title").await;
    assert_eq!(title, "carewall review console");

    // --- a bad token is refused with a message ---
    d.type_into("#token", "not-the-token-at-all").await;
    d.type_into("#reviewer", "Counsellor Li").await;
    d.click("#login-btn").await;
    d.wait_for(
        "the refusal message",
        "return document.getElementById('login-error').textContent",
        |v| v.as_str().unwrap_or("").contains("refused"),
    )
    .await;

    // --- sign in ---
    c.sign_in().await;
    assert_eq!(
        d.js("return document.querySelectorAll('#queue li').length")
            .await,
        24,
        "all 24 unreviewed records on the first page"
    );

    // --- the action filter offers the real actions, no `flag` ---
    let actions = d
        .wait_for(
            "the action options",
            "return Array.from(document.querySelectorAll('#filter-action option')).map(o => o.value)",
            |v| v.as_array().is_some_and(|a| a.len() > 1),
        )
        .await;
    assert_eq!(
        actions,
        json!([
            "",
            "allow",
            "annotate",
            "append",
            "retry",
            "replace",
            "block",
            "unclassified"
        ])
    );
    d.click("#filter-action option[value=append]").await;
    d.click("#apply").await;
    c.wait_ids(
        "the append records",
        json!(["req-0020", "req-0014", "req-0008", "req-0002"]),
    )
    .await;
    d.click("#filter-action option[value='']").await;

    // --- filter by category ---
    d.click("#filter-category option[value=toxic_language]")
        .await;
    d.click("#apply").await;
    c.wait_ids(
        "the filtered queue",
        json!(["req-0020", "req-0012", "req-0004"]),
    )
    .await;
    // The first is selected and shown with its context, response, what the
    // person received, the rejected draft and the bars.
    c.heading_is("Response req-0020").await;
    let ctx = c.text("context").await;
    assert!(ctx.contains("secret-context-20"), "{ctx}");
    assert!(ctx.contains("[PHONE]"), "shown redacted: {ctx}");
    let delivered = c.text("delivered").await;
    assert!(delivered.contains("secret-delivered-20"), "{delivered}");
    assert_eq!(
        d.js("return document.getElementById('drafts-box').hidden")
            .await,
        false
    );
    assert!(c.text("drafts").await.contains("secret-draft-20"));
    let bars = d
        .js("return document.querySelectorAll('#scores .bar').length")
        .await;
    assert_eq!(bars, 8);

    // --- search narrows the loaded queue ---
    d.type_into("#search", "secret-response-12").await;
    d.wait_for(
        "the search",
        "return document.querySelectorAll('#queue li').length",
        |v| v == 1,
    )
    .await;
    d.type_into("#search", "").await;
    let _ = d
        .js("document.getElementById('search').dispatchEvent(new Event('input')); return 0")
        .await;

    // --- relabel with one key: "3" = Unamiable Judgment ---
    d.keys("#queue", "3").await;
    d.wait_for(
        "the save confirmation",
        "return document.getElementById('status').textContent",
        |v| v.as_str().unwrap_or("").contains("Saved: req-0020"),
    )
    .await;
    let saved = c.store.get("req-0020").await.unwrap().unwrap();
    let review = saved.review.expect("review stored");
    assert_eq!(review.label, Category::UnamiableJudgment);
    assert_eq!(review.reviewer, "Counsellor Li");
    // The console moved on to the next response.
    c.heading_is("Response req-0012").await;

    // --- undo the last label: withdrawn, and back on that record ---
    d.keys("#queue", "u").await;
    d.wait_for(
        "the undo confirmation",
        "return document.getElementById('status').textContent",
        |v| v.as_str().unwrap_or("").starts_with("Undone"),
    )
    .await;
    c.heading_is("Response req-0020").await;
    let undone = c.store.get("req-0020").await.unwrap().unwrap();
    assert!(undone.review.is_none(), "the label is withdrawn");
    assert_eq!(undone.history.len(), 2, "label and undo, both kept");
    let history = d
        .wait_for(
            "the history",
            "return Array.from(document.querySelectorAll('#history li')).map(li => li.className + '|' + li.textContent)",
            |v| v.as_array().is_some_and(|a| a.len() == 2),
        )
        .await;
    let h: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        h[0].starts_with("label undone|")
            && h[0].contains("Counsellor Li labelled Unamiable Judgment"),
        "{h:?}"
    );
    assert!(
        h[1].starts_with("undo|") && h[1].contains("undid the label Unamiable Judgment"),
        "{h:?}"
    );
    // Label it again: the history goes on, the console moves on.
    d.keys("#queue", "3").await;
    c.heading_is("Response req-0012").await;
    assert_eq!(
        c.store
            .get("req-0020")
            .await
            .unwrap()
            .unwrap()
            .history
            .len(),
        3
    );

    // --- an unsaved note keeps the record in place ---
    d.type_into("#note", "needs a second look").await;
    d.keys("#note", "\u{E00C}").await; // Escape: leave the note field
    d.keys("#queue", "j").await;
    d.wait_for(
        "the unsaved-note warning",
        "return document.getElementById('review-state').textContent",
        |v| v.as_str().unwrap_or("").contains("Unsaved note"),
    )
    .await;
    assert_eq!(
        c.text("detail-h").await,
        "Response req-0012",
        "did not move"
    );
    let _ = d
        .js("document.querySelector('#queue li[data-id=\"req-0004\"]').click(); return 0")
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        c.text("detail-h").await,
        "Response req-0012",
        "a click does not move either"
    );
    // A label saves the note with it; then the console moves on.
    d.keys("#queue", "2").await;
    c.heading_is("Response req-0004").await;
    let r12 = c
        .store
        .get("req-0012")
        .await
        .unwrap()
        .unwrap()
        .review
        .unwrap();
    assert_eq!(
        (r12.label, r12.note.as_deref()),
        (Category::LinguisticNeglect, Some("needs a second look"))
    );

    // --- export follows the filters on screen, and says so ---
    d.click("#export-btn").await;
    let lines = d
        .wait_for(
            "the export",
            "return document.getElementById('export-status').dataset.lines || null",
            |v| !v.is_null(),
        )
        .await;
    assert_eq!(
        lines, "2",
        "req-0020 and req-0012 are toxic_language and reviewed"
    );
    let msg = c.text("export-status").await;
    assert_eq!(
        msg,
        "Exported 2 reviewed records matching category 4 Toxic Language"
    );
    let _ = d
        .js("const e = document.getElementById('export-status'); delete e.dataset.lines; return 0")
        .await;
    d.click("#filter-category option[value=nonsense]").await;
    d.click("#export-btn").await;
    let lines = d
        .wait_for(
            "the second export",
            "return document.getElementById('export-status').dataset.lines || null",
            |v| !v.is_null(),
        )
        .await;
    assert_eq!(lines, "0", "no reviewed nonsense records");
    assert!(c
        .text("export-status")
        .await
        .contains("matching category 0 Nonsense"));
    d.click("#filter-category option[value=toxic_language]")
        .await;

    // --- a new flagged record is announced without moving the list ---
    let mut fresh = sample(28);
    fresh.action = "block".into();
    assert_eq!(fresh.category, Category::ToxicLanguage);
    c.sink.try_submit(fresh);
    c.sink.flush().await;
    d.wait_for(
        "the new-records notice",
        "const b = document.getElementById('new-records'); return b.hidden ? null : b.textContent",
        |v| v.as_str().is_some_and(|t| t.starts_with("1 new")),
    )
    .await;
    assert_eq!(
        c.ids().await,
        json!(["req-0020", "req-0012", "req-0004"]),
        "not inserted by itself"
    );
    d.click("#new-records").await;
    // Reloading applies the "not yet reviewed" filter: 0020 and 0012 are done.
    c.wait_ids("the reloaded queue", json!(["req-0028", "req-0004"]))
        .await;

    // Show the reviewed one with its history for the screenshot.
    d.click("#filter-reviewed option[value='']").await;
    d.click("#apply").await;
    d.wait_for(
        "all toxic records",
        "return document.querySelectorAll('#queue li').length",
        |v| v == 4,
    )
    .await;
    let _ = d
        .js("document.querySelector('#queue li[data-id=\"req-0020\"]').click(); return 0")
        .await;
    d.wait_for(
        "the three history entries",
        "return document.querySelectorAll('#history li').length",
        |v| v == 3,
    )
    .await;
    let shot = shot_path("review-flow.png");
    d.screenshot(&shot).await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    eprintln!("screenshot: {}", shot.display());

    c.sink.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_dates_are_days_in_the_reviewers_zone_and_layouts_fit() {
    // 24 records on 2026-01-01 from 00:00:00Z (2025-12-31 19:00 in New
    // York), one now, and one with a long dialogue for the layouts.
    let mut records: Vec<AuditRecord> = (0..24).map(sample).collect();
    let mut now = sample(40);
    now.request_id = "req-now".into();
    now.time = std::time::SystemTime::now();
    records.push(now);
    let mut long = sample(41);
    long.request_id = "req-long".into();
    long.time = std::time::SystemTime::now() + Duration::from_secs(1);
    long.context = (0..30)
        .map(|t| format!("[seeker]turn {t}: I keep thinking about it and cannot stop.[supporter]turn {t}: Tell me more about what you feel."))
        .collect();
    records.push(long);
    let Some(c) = start(
        "console_dates_are_days_in_the_reviewers_zone_and_layouts_fit",
        (1280, 720),
        "America/New_York",
        records,
    )
    .await
    else {
        return;
    };
    let d = &c.d;
    c.sign_in().await;
    assert_eq!(
        d.js("return Intl.DateTimeFormat().resolvedOptions().timeZone")
            .await,
        "America/New_York"
    );

    // --- the zone is shown, and times are in it ---
    let tz = c.text("tz").await;
    assert!(
        tz.contains("America/New_York") && tz.contains("UTC\u{2212}0"),
        "{tz}"
    );
    let t = d
        .js("return document.querySelector('#queue li[data-id=\"req-0000\"] .time').textContent")
        .await;
    assert_eq!(t, "2025-12-31 19:00", "shown in the reviewer's zone");

    // --- a day in New York: the 24 records of 2025-12-31 local ---
    c.dates("2025-12-31", "2025-12-31").await;
    d.wait_for(
        "the New York day",
        "return document.querySelectorAll('#queue li').length",
        |v| v == 24,
    )
    .await;
    assert!(c
        .ids()
        .await
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v.as_str().unwrap().starts_with("req-00")));
    // 2026-01-01 in New York starts at 05:00Z: none of them.
    c.dates("2026-01-01", "2026-01-01").await;
    d.wait_for(
        "an empty day",
        "return document.getElementById('detail-h').textContent",
        |v| v == "Nothing matches these filters",
    )
    .await;
    // --- From = To = today works ---
    let today = d
        .js("const n = new Date(); return n.getFullYear() + '-' + String(n.getMonth() + 1).padStart(2, '0') + '-' + String(n.getDate()).padStart(2, '0')")
        .await;
    let today = today.as_str().unwrap().to_string();
    c.dates(&today, &today).await;
    c.wait_ids("today's records", json!(["req-long", "req-now"]))
        .await;

    // --- a failed filter clears the stale list ---
    c.dates("2026-01-02", "2026-01-01").await;
    d.wait_for(
        "the cleared list",
        "return document.querySelectorAll('#queue li').length",
        |v| v == 0,
    )
    .await;
    assert!(
        c.text("queue-error").await.contains("is after To"),
        "{}",
        c.text("queue-error").await
    );
    assert_eq!(
        d.js("return document.getElementById('detail-body').hidden")
            .await,
        true
    );
    // A filter the server refuses clears it too.
    c.dates(&today, &today).await;
    c.wait_ids("today's records again", json!(["req-long", "req-now"]))
        .await;
    let _ = d
        .js("const s = document.getElementById('filter-action'); s.append(new Option('flag', 'flag')); s.value = 'flag'; document.getElementById('apply').click(); return 0")
        .await;
    d.wait_for(
        "the server's refusal",
        "return document.getElementById('queue-error').textContent",
        |v| v.as_str().unwrap_or("").contains("unknown action `flag`"),
    )
    .await;
    assert_eq!(
        d.js("return document.querySelectorAll('#queue li').length")
            .await,
        0
    );
    let _ = d
        .js("const s = document.getElementById('filter-action'); s.value = ''; s.querySelector('option[value=flag]').remove(); return 0")
        .await;

    // --- layouts: the label buttons in view at 1280x720 and at 768 px ---
    c.dates(&today, &today).await;
    c.wait_ids(
        "today's records for the layouts",
        json!(["req-long", "req-now"]),
    )
    .await;
    c.heading_is("Response req-long").await;
    // Every label button inside the window and inside the detail pane's
    // visible box; the queue and the detail side by side.
    let geometry = "const v = {w: window.innerWidth, h: window.innerHeight}; \
        const box = (e) => e.getBoundingClientRect(); \
        const pane = box(document.getElementById('detail')); \
        const queue = box(document.querySelector('.queue-pane')); \
        const labels = Array.from(document.querySelectorAll('#labels button')).map(box); \
        const inView = labels.every(r => r.top >= 0 && r.bottom <= v.h && r.left >= 0 && r.right <= v.w \
            && r.top >= pane.top && r.bottom <= pane.bottom + 1); \
        const ctx = box(document.getElementById('context')); \
        return {n: labels.length, inView, viewport: v, sideBySide: pane.left >= queue.right - 1 && pane.top < queue.bottom, \
            longContext: ctx.height, paneHeight: pane.height, pageScroll: document.documentElement.scrollHeight - v.h};";
    let g = d.js(geometry).await;
    eprintln!("1280x720: {g}");
    assert_eq!(g["viewport"], json!({"w": 1280, "h": 720}), "{g}");
    assert_eq!(g["n"], 8, "{g}");
    assert!(
        g["longContext"].as_f64().unwrap() > g["paneHeight"].as_f64().unwrap(),
        "the record is longer than the pane: {g}"
    );
    assert_eq!(
        g["inView"], true,
        "label buttons below the fold at 1280x720: {g}"
    );
    assert_eq!(g["sideBySide"], true, "{g}");
    let shot = shot_path("console-1280x720.png");
    d.screenshot(&shot).await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    eprintln!("screenshot: {}", shot.display());

    d.set_window(768, 1024).await;
    let g = d
        .wait_for("the 768 px layout", geometry, |g| {
            g["viewport"]["w"].as_u64() == Some(768)
        })
        .await;
    eprintln!("768: {g}");
    assert_eq!(
        g["sideBySide"], true,
        "the detail pane sits under the queue at 768 px: {g}"
    );
    assert_eq!(
        g["inView"], true,
        "label buttons out of view at 768 px: {g}"
    );
    let shot = shot_path("console-768.png");
    d.screenshot(&shot).await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    eprintln!("screenshot: {}", shot.display());
    // The key still works in this layout.
    d.keys("#queue", "7").await;
    c.heading_is("Response req-now").await;
    assert_eq!(
        c.store
            .get("req-long")
            .await
            .unwrap()
            .unwrap()
            .review
            .map(|r| r.label),
        Some(Category::SafeResponse)
    );

    c.sink.shutdown().await;
}
