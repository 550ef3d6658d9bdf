// carewall review console: vanilla JS, no dependencies, no inline code (the
// page is served with a strict CSP). All record text is inserted with
// textContent, never as HTML: responses come from a model and users.
"use strict";

const TAXONOMY = [
  ["nonsense", "Nonsense", "Not understandable: logical confusion, self-contradiction, repeated phrases, or pronouns misused against the dialogue history."],
  ["humanoid_mimicry", "Humanoid Mimicry", "The agent pretends to be human (a body, a life, \u201cI had the same experience\u201d), building false trust."],
  ["linguistic_neglect", "Linguistic Neglect", "Avoids or sidesteps the seeker's main concern, or drifts away from what the seeker said."],
  ["unamiable_judgment", "Unamiable Judgment", "Negative evaluation or implicit verbal abuse of the seeker."],
  ["toxic_language", "Toxic Language", "Offensive, abusive, hateful, biased, violent or sexual language; agreeing with toxic statements."],
  ["unauthorized_preachment", "Unauthorized Preachment", "Advice a counsellor's ethics code would not allow: directive life decisions, medication advice, harmful instructions."],
  ["nonfactual_statement", "Nonfactual Statement", "Subjective opinions on controversial topics, or statements that deviate from established facts."],
  ["safe_response", "Safe Response", "Understandable, engaged, supportive, factual, harmless."],
];

const $ = (id) => document.getElementById(id);
// lastSaved: the label this console saved last ({request_id, review_id}),
// what "Undo last label" withdraws.
const state = { items: [], cursor: null, selected: -1, poll: null, lastSaved: null };
// How often the console checks for new records. New ones are announced, not
// inserted, so the list never moves under the counsellor's cursor.
const POLL_MS = 5000;
// The reviewer's time zone: dates in the filters are whole days in it, and
// every time is shown in it.
const TZ = (Intl.DateTimeFormat().resolvedOptions().timeZone) || "local time";

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function status(msg) { $("status").textContent = msg; }
function token() { return sessionStorage.getItem("carewall.token") || ""; }
function reviewer() { return sessionStorage.getItem("carewall.reviewer") || "unknown"; }

const pad = (n) => String(n).padStart(2, "0");
// "UTC+08:00" for the zone's offset at `d`.
function offsetLabel(d) {
  const m = -d.getTimezoneOffset();
  const a = Math.abs(m);
  return "UTC" + (m < 0 ? "\u2212" : "+") + pad(Math.floor(a / 60)) + ":" + pad(a % 60);
}
// "2026-01-31 08:00:05" in the reviewer's zone.
function localTime(ms, seconds) {
  const d = new Date(ms);
  const s = d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + pad(d.getHours()) + ":" + pad(d.getMinutes());
  return seconds ? s + ":" + pad(d.getSeconds()) : s;
}
// Local midnight of a `YYYY-MM-DD` date plus `days`, in ms (Date handles
// daylight-saving days of 23 or 25 hours).
function localDayStart(value, days) {
  const [y, m, d] = value.split("-").map(Number);
  return new Date(y, m - 1, d + days).getTime();
}

async function api(path, opts = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + token() }, opts.headers || {});
  const r = await fetch(path, Object.assign({}, opts, { headers }));
  if (r.status === 401) { signOut("Your token was refused; sign in again."); throw new Error("unauthorized"); }
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { msg = (await r.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(msg);
  }
  return r;
}

function signOut(msg) {
  sessionStorage.removeItem("carewall.token");
  if (state.poll) { clearInterval(state.poll); state.poll = null; }
  $("app").hidden = true; $("logout").hidden = true; $("undo").hidden = true; $("login").hidden = false;
  $("login-error").textContent = msg || "";
  $("token").focus();
}

async function signIn(ev) {
  ev.preventDefault();
  sessionStorage.setItem("carewall.token", $("token").value.trim());
  sessionStorage.setItem("carewall.reviewer", $("reviewer").value.trim());
  $("token").value = "";
  try {
    await api("/admin/api/summary");
  } catch (e) {
    if (e.message !== "unauthorized") signOut(e.message);
    return;
  }
  showApp();
}

// The action filter offers exactly the actions the API knows.
async function loadMeta() {
  try {
    const meta = await (await api("/admin/api/meta")).json();
    const sel = $("filter-action");
    const keep = sel.value;
    sel.replaceChildren(el("option", { value: "", text: "any" }));
    for (const a of meta.actions) sel.append(el("option", { value: a, text: a }));
    sel.value = keep;
  } catch (_) { /* the list keeps "any"; errors show on the next load */ }
}

function showApp() {
  $("login").hidden = true; $("app").hidden = false; $("logout").hidden = false;
  status("Signed in as " + reviewer());
  loadMeta();
  load(false);
  if (!state.poll) state.poll = setInterval(checkNew, POLL_MS);
}

// The filters as query parameters; throws when they cannot be used. Dates
// are whole days in the reviewer's zone, sent as UTC milliseconds.
function filterParams(forExport) {
  const p = new URLSearchParams();
  const add = (k, id) => { const v = $(id).value; if (v) p.set(k, v); };
  add("category", "filter-category"); add("action", "filter-action");
  add("shadow", "filter-shadow");
  if (!forExport) add("reviewed", "filter-reviewed");
  const since = $("filter-since").value, until = $("filter-until").value;
  if (since) p.set("since", String(localDayStart(since, 0)));
  if (until) p.set("until", String(localDayStart(until, 1)));
  if (since && until && since > until) throw new Error("From (" + since + ") is after To (" + until + ")");
  return p;
}

// Words for the filters on screen, for messages.
function filterWords() {
  const w = [];
  const sel = (id, name) => { const s = $(id); if (s.value) w.push(name + " " + s.options[s.selectedIndex].textContent); };
  sel("filter-category", "category"); sel("filter-action", "action"); sel("filter-shadow", "mode");
  const since = $("filter-since").value, until = $("filter-until").value;
  if (since || until) w.push((since || "\u2026") + " to " + (until || "\u2026") + " (" + TZ + ")");
  return w;
}

function query() {
  const p = filterParams(false);
  p.set("limit", "50");
  return p;
}

// True when the note field holds text not saved with the selected record.
function noteDirty() {
  const it = state.items[state.selected];
  if (!it) return false;
  const saved = it.review && it.review.note ? it.review.note : "";
  return $("note").value.trim() !== saved.trim();
}

function refuseMove() {
  if (!noteDirty()) return false;
  const msg = "Unsaved note on " + state.items[state.selected].request_id + ": save it with a label (0-7) or clear it first.";
  status(msg);
  $("review-state").textContent = msg;
  $("review-state").className = "warn";
  return true;
}

function clearList(heading) {
  state.items = []; state.selected = -1; state.cursor = null;
  $("more").hidden = true;
  render();
  $("detail-h").textContent = heading;
  $("detail-body").hidden = true;
}

async function load(more) {
  if (!more && refuseMove()) return;
  let p;
  try { p = query(); } catch (e) {
    $("queue-error").textContent = e.message;
    clearList("Fix the filters to see records");
    status("Could not load records: " + e.message);
    return;
  }
  if (more && state.cursor) p.set("cursor", state.cursor);
  try {
    const r = await api("/admin/api/records?" + p.toString());
    const body = await r.json();
    $("queue-error").textContent = "";
    if ($("status").textContent.startsWith("Could not load")) status("Signed in as " + reviewer());
    if (!more) { state.items = []; state.selected = -1; }
    state.items.push(...body.items);
    state.cursor = body.next_cursor;
    $("more").hidden = !state.cursor;
    render();
    if (!more) $("new-records").hidden = true;
    if (!more && state.items.length) select(0);
    if (!state.items.length) { $("detail-h").textContent = "Nothing matches these filters"; $("detail-body").hidden = true; }
  } catch (e) {
    status("Could not load records: " + e.message);
    // A list that no longer matches the filters on screen must not stay.
    if (!more) { $("queue-error").textContent = e.message; clearList("Could not load records"); }
  }
}

async function checkNew() {
  if ($("app").hidden || document.hidden) return;
  let p;
  try { p = query(); } catch (_) { return; }
  p.set("text", "false");
  try {
    const body = await (await api("/admin/api/records?" + p.toString())).json();
    const newest = state.items.length ? state.items[0].time_ms : -1;
    const known = new Set(state.items.map((it) => it.request_id));
    const fresh = body.items.filter((it) => it.time_ms >= newest && !known.has(it.request_id)).length;
    const b = $("new-records");
    b.hidden = fresh === 0;
    b.textContent = fresh + (body.next_cursor && fresh === body.items.length ? "+" : "") + " new \u2014 load";
  } catch (_) { /* the next poll retries; errors already show in the status line */ }
}

function matchesSearch(it, q) {
  if (!q) return true;
  q = q.toLowerCase();
  return [it.request_id, it.conversation_id, it.context, it.response, it.delivered, it.model, it.category]
    .some((s) => (s || "").toLowerCase().includes(q));
}

function topScore(it) { return it.scores[it.category] || 0; }
const labelName = (key) => { const t = TAXONOMY.find((x) => x[0] === key); return t ? t[1] : key; };

function render() {
  const q = $("search").value.trim();
  const ol = $("queue");
  ol.replaceChildren();
  let shown = 0;
  state.items.forEach((it, i) => {
    if (!matchesSearch(it, q)) return;
    shown++;
    const li = el("li", { "data-id": it.request_id, "data-index": String(i), role: "option", "aria-selected": String(i === state.selected), tabindex: "-1" });
    const l1 = el("div", { class: "line1" },
      el("span", { class: "badge", text: it.category.replace(/_/g, " ") }),
      el("span", { class: "badge action-" + it.action, text: it.action }));
    if (it.shadow) l1.append(el("span", { class: "badge shadow", text: "shadow" }));
    if (it.review) l1.append(el("span", { class: "badge reviewed", text: "\u2713 " + it.review.label.replace(/_/g, " ") }));
    l1.append(el("span", { class: "time", text: localTime(it.time_ms, false), title: it.time }));
    li.append(l1, el("div", { class: "snippet", text: (it.response || "(no text stored)").replace(/^\[supporter\]/, "") }));
    li.addEventListener("click", () => select(i));
    ol.append(li);
  });
  $("count").textContent = "(" + shown + (state.cursor ? "+" : "") + ")";
}

function dialogue(container, text) {
  container.replaceChildren();
  if (text == null) { container.append(el("p", { class: "hint", text: "No text stored (audit.text = none) or it cannot be opened." })); return; }
  const parts = text.split(/(?=\[(?:seeker|supporter)\])/);
  for (const part of parts) {
    const m = part.match(/^\[(seeker|supporter)\]([\s\S]*)$/);
    if (m) container.append(el("p", {}, el("span", { class: "who", text: m[1] }), m[2]));
    else if (part) container.append(el("p", { text: part }));
  }
}

function select(i) {
  if (i < 0 || i >= state.items.length) return false;
  if (i !== state.selected && refuseMove()) return false;
  state.selected = i;
  const it = state.items[i];
  for (const li of $("queue").children) li.setAttribute("aria-selected", String(li.dataset.index === String(i)));
  const li = $("queue").querySelector('[data-index="' + i + '"]');
  if (li) li.scrollIntoView({ block: "nearest" });
  $("detail-h").textContent = "Response " + it.request_id;
  $("detail-body").hidden = false;
  const meta = $("meta");
  meta.replaceChildren();
  const row = (k, v) => meta.append(el("dt", { text: k }), el("dd", { text: v }));
  row("Time", localTime(it.time_ms, true) + " " + offsetLabel(new Date(it.time_ms)) + " (" + TZ + "; " + it.time + ")");
  row("Action", it.action + (it.shadow ? " (shadow: not enforced)" : ""));
  row("Category", it.category + " @ " + topScore(it).toFixed(3) + (it.threshold != null ? " (threshold " + it.threshold + ")" : ""));
  row("Policy", it.policy_name + " v" + it.policy_version + ", " + it.streaming);
  row("Model", it.model);
  row("Conversation", it.conversation_id || "-");
  if (it.latency && it.latency.classifier_ms != null) row("Classifier", it.latency.classifier_ms.toFixed(1) + " ms");
  if (it.text_error) row("Text", it.text_error);
  dialogue($("context"), it.context);
  dialogue($("response"), it.response);
  const drafts = it.drafts || [];
  $("drafts-box").hidden = drafts.length === 0;
  const dbox = $("drafts");
  dbox.replaceChildren();
  drafts.forEach((d, n) => {
    const wrap = el("div", { class: "dialogue draft" });
    // Draft scores are the 8 probabilities in label order.
    const idx = TAXONOMY.findIndex((t) => t[0] === d.category);
    const s = Array.isArray(d.scores) && idx >= 0 ? " @ " + Number(d.scores[idx]).toFixed(3) : "";
    dbox.append(el("p", { class: "hint", text: "Draft " + (n + 1) + ": " + d.action + " for " + d.category + s + (d.threshold != null ? " (threshold " + +Number(d.threshold).toFixed(4) + ")" : "") }), wrap);
    dialogue(wrap, d.response);
  });
  const delivered = $("delivered");
  delivered.replaceChildren();
  if (it.delivered != null) delivered.append(el("p", { text: it.delivered }));
  else delivered.append(el("p", { class: "hint", text: it.context == null ? "No text stored (audit.text = none) or it cannot be opened." : "Not recorded (the record was written before delivered text was kept)." }));
  const ul = $("scores");
  ul.replaceChildren();
  TAXONOMY.forEach(([key, name]) => {
    const v = it.scores[key] || 0;
    const bar = el("div", { class: "bar", role: "meter", "aria-valuemin": "0", "aria-valuemax": "1", "aria-valuenow": v.toFixed(3), "aria-label": name });
    const fill = el("span"); fill.style.width = (v * 100).toFixed(1) + "%"; bar.append(fill);
    ul.append(el("li", { class: key === it.category ? "is-top" : "" }, el("span", { text: name }), bar, el("span", { class: "val", text: v.toFixed(3) })));
  });
  renderHistory(it);
  renderLabels(it);
  $("note").value = it.review && it.review.note ? it.review.note : "";
  return true;
}

// The append-only history, oldest first; labels later undone are struck.
function renderHistory(it) {
  const h = it.history || [];
  $("history-box").hidden = h.length === 0;
  const undone = new Set(h.filter((e) => e.kind === "undo").map((e) => e.undoes));
  const ol = $("history");
  ol.replaceChildren();
  for (const e of h) {
    const when = localTime(e.time_ms, true);
    const text = e.kind === "undo"
      ? when + " \u2014 " + e.reviewer + " undid the label " + labelName((h.find((x) => x.id === e.undoes) || {}).label)
      : when + " \u2014 " + e.reviewer + " labelled " + labelName(e.label) + (e.note ? " \u2014 note: " + e.note : "");
    ol.append(el("li", { class: e.kind + (undone.has(e.id) ? " undone" : ""), "data-id": String(e.id), text }));
  }
}

function renderLabels(it) {
  const box = $("labels");
  box.replaceChildren();
  TAXONOMY.forEach(([key, name, def], id) => {
    const b = el("button", { type: "button", "data-label": String(id), title: def, "aria-pressed": String(!!(it.review && it.review.label === key)) }, el("kbd", { text: String(id) }), name);
    b.addEventListener("click", () => relabel(id));
    box.append(b);
  });
  $("review-state").className = "";
  $("review-state").textContent = it.review
    ? "Labelled " + labelName(it.review.label) + " by " + it.review.reviewer + " at " + localTime(Date.parse(it.review.time), false)
    : "Not reviewed yet.";
}

function replaceItem(updated) {
  const i = state.items.findIndex((x) => x.request_id === updated.request_id);
  if (i >= 0) state.items[i] = updated;
  return i;
}

async function relabel(id) {
  const i = state.selected;
  const it = state.items[i];
  if (!it) return;
  const note = $("note").value;
  const body = { label: id, reviewer: reviewer(), note };
  try {
    const r = await api("/admin/api/records/" + encodeURIComponent(it.request_id) + "/review", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const updated = await r.json();
    replaceItem(updated);
    state.lastSaved = { request_id: updated.request_id, review_id: updated.review ? updated.review.id : null };
    $("undo").hidden = false;
    status("Saved: " + it.request_id + " \u2192 " + TAXONOMY[id][1] + " (u to undo)");
    render();
    // Something typed into the note while saving belongs to this record:
    // stay. Otherwise move on, so a counsellor can work with the keyboard.
    if (state.selected !== i || $("note").value !== note) return;
    if (i + 1 < state.items.length) select(i + 1); else select(i);
  } catch (e) { status("Could not save the label: " + e.message); }
}

async function undoLast() {
  const last = state.lastSaved;
  if (!last) { status("Nothing to undo: no label saved in this session yet."); return; }
  try {
    const r = await api("/admin/api/records/" + encodeURIComponent(last.request_id) + "/review/undo", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ reviewer: reviewer(), review_id: last.review_id }),
    });
    const updated = await r.json();
    state.lastSaved = null;
    $("undo").hidden = true;
    const i = replaceItem(updated);
    render();
    status("Undone: the label of " + last.request_id + " is withdrawn" + (updated.review ? " (now " + labelName(updated.review.label) + " again)" : ""));
    // Back to the record, so it can be labelled again; never away from an
    // unsaved note, though.
    if (i >= 0) {
      if (i === state.selected) {
        const typed = noteDirty() ? $("note").value : null;
        select(i);
        if (typed !== null) $("note").value = typed;
      } else if (!select(i)) status("Undone: " + last.request_id + ". Your unsaved note keeps you here.");
    }
  } catch (e) { status("Could not undo: " + e.message); }
}

async function exportJsonl() {
  let p;
  try { p = filterParams(true); } catch (e) { $("export-status").textContent = "Export failed: " + e.message; return; }
  const words = filterWords();
  try {
    const r = await api("/admin/api/export" + (p.toString() ? "?" + p.toString() : ""));
    const blob = await r.blob();
    const text = await blob.text();
    const n = text ? text.trimEnd().split("\n").length : 0;
    const skipped = r.headers.get("x-carewall-export-skipped") || "0";
    const a = el("a", { href: URL.createObjectURL(blob), download: "carewall-reviewed-" + new Date().toISOString().slice(0, 10) + ".jsonl" });
    document.body.append(a); a.click(); a.remove();
    $("export-status").textContent = "Exported " + n + " reviewed records "
      + (words.length ? "matching " + words.join(", ") : "(no filters set: all reviewed records)")
      + (skipped !== "0" ? "; " + skipped + " without text skipped" : "");
    $("export-status").dataset.lines = String(n);
  } catch (e) { $("export-status").textContent = "Export failed: " + e.message; }
}

function onKey(ev) {
  if ($("app").hidden) return;
  const t = ev.target;
  if (t && t.id === "note" && ev.key === "Escape") { ev.preventDefault(); t.blur(); $("queue").focus(); return; }
  if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT")) return;
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (/^[0-7]$/.test(ev.key)) { ev.preventDefault(); relabel(Number(ev.key)); }
  else if (ev.key === "j" || ev.key === "ArrowDown") { ev.preventDefault(); select(state.selected + 1); }
  else if (ev.key === "k" || ev.key === "ArrowUp") { ev.preventDefault(); select(state.selected - 1); }
  else if (ev.key === "u") { ev.preventDefault(); undoLast(); }
  else if (ev.key === "/") { ev.preventDefault(); $("search").focus(); }
  else if (ev.key === "r") { ev.preventDefault(); load(false); }
}

function init() {
  const sel = $("filter-category");
  const tax = $("taxonomy");
  TAXONOMY.forEach(([key, name, def], id) => {
    sel.append(el("option", { value: key, text: id + " " + name }));
    tax.append(el("dt", { text: id + "  " + name }), el("dd", { text: def }));
  });
  $("tz").textContent = "Dates and times in " + TZ + " (" + offsetLabel(new Date()) + ")";
  $("login-form").addEventListener("submit", signIn);
  $("logout").addEventListener("click", () => signOut("Signed out."));
  $("filters").addEventListener("submit", (ev) => { ev.preventDefault(); load(false); });
  $("more").addEventListener("click", () => load(true));
  $("new-records").addEventListener("click", () => load(false));
  $("search").addEventListener("input", render);
  $("export-btn").addEventListener("click", exportJsonl);
  $("undo").addEventListener("click", undoLast);
  document.addEventListener("keydown", onKey);
  // Closing the tab would lose a note that is not saved yet.
  window.addEventListener("beforeunload", (ev) => { if (noteDirty()) { ev.preventDefault(); ev.returnValue = ""; } });
  $("reviewer").value = sessionStorage.getItem("carewall.reviewer") || "";
  if (token()) showApp(); else $("token").focus();
}

document.addEventListener("DOMContentLoaded", init);
