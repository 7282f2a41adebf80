// The inspector's script: plain DOM, no framework, no network but this listener's admin API.
// Every text that comes from the data (bodies, headers, names, errors) reaches the page
// through text nodes only: captured bodies are hostile input.
"use strict";

(() => {
  const API = "/admin";
  const KEY_SLOT = "gateway-inspector.admin-key";
  const REFRESH_MS = 5000;
  const PAGE = 100;

  const state = {
    key: sessionStorage.getItem(KEY_SLOT) || "",
    rows: [],
    cursor: null,
    query: "",
    selected: null,
    loading: false,
    again: false,
    view: "requests",
    timer: null,
  };

  const $ = (id) => document.getElementById(id);

  // --- building nodes: strings always become text nodes ------------------------------------

  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") el.className = value;
      else if (name === "on") for (const [ev, fn] of Object.entries(value)) el.addEventListener(ev, fn);
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    return put(el, kids);
  }

  function put(el, kids) {
    for (const kid of kids.flat(Infinity)) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.append(kid instanceof Node ? kid : String(kid)); // a string is appended as text
    }
    return el;
  }

  function fill(el, ...kids) {
    el.replaceChildren();
    return put(el, kids);
  }

  // --- formatting --------------------------------------------------------------------------

  const dash = "—";
  const pad = (n, w = 2) => String(n).padStart(w, "0");

  function clock(unixSeconds, withMs = false) {
    const d = new Date(unixSeconds * 1000);
    const t = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    return withMs ? `${t}.${pad(d.getMilliseconds(), 3)}` : t;
  }

  function dateTime(unixSeconds) {
    const d = new Date(unixSeconds * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${clock(unixSeconds, true)}`;
  }

  function ms(value) {
    if (value === null || value === undefined || Number.isNaN(value)) return dash;
    if (value >= 10000) return `${(value / 1000).toFixed(1)} s`;
    if (value >= 1000) return `${(value / 1000).toFixed(2)} s`;
    return `${value >= 100 ? Math.round(value) : value.toFixed(1)} ms`;
  }

  function int(value) {
    return value === null || value === undefined ? dash : Number(value).toLocaleString("en-US");
  }

  function usd(value) {
    if (value === null || value === undefined) return dash;
    if (value >= 100) return `$${value.toFixed(2)}`;
    // to the micro-dollar, as the API rounds it, without trailing zeros: $0.000036, $0.002
    const text = value.toFixed(6).replace(/\.?0+$/, "");
    return `$${text}`;
  }

  function bytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
    return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  }

  function amount(unit, value) {
    if (unit === "usd") return usd(value);
    return `${int(value)} ${unit}`;
  }

  function ago(unixSeconds) {
    const s = Math.max(0, unixSeconds - Date.now() / 1000);
    if (s < 90) return `${Math.round(s)} s`;
    if (s < 5400) return `${Math.round(s / 60)} min`;
    if (s < 172800) return `${Math.round(s / 3600)} h`;
    return `${Math.round(s / 86400)} d`;
  }

  function statusClass(status) {
    if (status >= 500) return "s5";
    if (status >= 400) return "s4";
    if (status >= 300) return "s3";
    return "s2";
  }

  const badge = (text, cls = "") => h("span", { class: `badge ${cls}` }, text);
  const statusBadge = (status) => badge(String(status), `status ${statusClass(status)}`);

  function pretty(text) {
    if (typeof text !== "string") return "";
    try {
      return JSON.stringify(JSON.parse(text), null, 2);
    } catch {
      return text;
    }
  }

  // the text a client reads from a whole (non-streamed) answer: Responses or Chat Completions
  function outputText(body) {
    let obj;
    try {
      obj = JSON.parse(body);
    } catch {
      return null;
    }
    if (!obj || typeof obj !== "object") return null;
    const parts = [];
    if (Array.isArray(obj.output)) {
      for (const item of obj.output) {
        for (const c of (item && Array.isArray(item.content) ? item.content : [])) {
          if (c && typeof c.text === "string") parts.push(c.text);
        }
      }
      return parts.join("");
    }
    if (Array.isArray(obj.choices)) {
      for (const choice of obj.choices) {
        const m = choice && choice.message;
        if (m && typeof m.content === "string") parts.push(m.content);
      }
      return parts.join("");
    }
    return null;
  }

  // --- the admin API -----------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(path, method = "GET") {
    let res;
    try {
      res = await fetch(API + path, {
        method,
        headers: { Authorization: `Bearer ${state.key}`, Accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
        referrerPolicy: "no-referrer",
      });
    } catch (e) {
      throw new ApiError(0, "unreachable", `The gateway did not answer (${e.message}).`);
    }
    let body = null;
    try {
      body = await res.json();
    } catch {
      body = null;
    }
    if (!res.ok) {
      const err = (body && body.error) || {};
      const problem = new ApiError(res.status, err.code || "", err.message || res.statusText);
      if (res.status === 401 || (res.status === 403 && err.code === "admin_disabled")) {
        askForKey(problem.message);
      }
      throw problem;
    }
    return body;
  }

  // --- the key -----------------------------------------------------------------------------

  function askForKey(message) {
    state.key = "";
    sessionStorage.removeItem(KEY_SLOT);
    stopRefresh();
    $("view-requests").hidden = true;
    $("view-overview").hidden = true;
    $("forget").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("key").value = "";
    $("key").focus();
  }

  async function submitKey(event) {
    event.preventDefault();
    const key = $("key").value.trim();
    if (!key) return;
    if (!/^[\x21-\x7e]+$/.test(key)) {
      $("login-error").textContent = "An admin key is printable ASCII without spaces.";
      return;
    }
    state.key = key;
    $("login-error").textContent = "";
    $("key-submit").disabled = true;
    try {
      await api("/teams");
      sessionStorage.setItem(KEY_SLOT, key);
      start();
    } catch (e) {
      if (e.status !== 401) $("login-error").textContent = e.message;
    } finally {
      $("key-submit").disabled = false;
    }
  }

  // --- filters and the list ----------------------------------------------------------------

  function listQuery() {
    const form = $("filters");
    const q = new URLSearchParams();
    for (const name of ["team", "status", "model", "user"]) {
      const v = form.elements[name].value.trim();
      if (v) q.set(name, v);
    }
    for (const tag of form.elements.tag.value.split(/[\s,]+/)) {
      if (tag) q.append("tag", tag.includes(":") ? tag : tag.replace("=", ":"));
    }
    const since = form.elements.since.value.trim();
    const range = form.elements.range.value;
    if (since) q.set("since", since);
    else if (range) q.set("since", String(Math.floor(Date.now() / 1000) - Number(range)));
    const until = form.elements.until.value.trim();
    if (until) q.set("until", until);
    q.set("limit", String(PAGE));
    return q;
  }

  // the query without the moving part of a relative range: the same filters, the same list
  function filterKey(q) {
    const f = $("filters").elements;
    const copy = new URLSearchParams(q);
    if (!f.since.value.trim()) copy.delete("since");
    return `${copy}|${f.range.value}`;
  }

  async function loadList({ more = false, reset = false } = {}) {
    if (!state.key) return;
    if (state.loading) {
      if (reset) state.again = true; // new filters while a page loads: load them after it
      return;
    }
    state.loading = true;
    const q = listQuery();
    const key = filterKey(q);
    if (key !== state.query) {
      reset = true; // other filters: a new list, whatever was asked
      more = false;
    }
    if (more && state.cursor) q.set("cursor", state.cursor);
    try {
      const page = await api(`/requests?${q}`);
      $("filter-error").textContent = "";
      const rows = page.requests;
      state.query = key;
      if (more) {
        state.rows = state.rows.concat(rows);
        state.cursor = page.next_cursor;
        renderList();
      } else if (reset || state.rows.length === 0) {
        state.rows = rows;
        state.cursor = page.next_cursor;
        renderList();
      } else {
        // records are never changed once written: a refresh only adds the newest on top,
        // and the rows already shown stay as they are (focus, hover, scroll)
        const known = new Set(state.rows.map((r) => r.request_id));
        const fresh = rows.filter((r) => !known.has(r.request_id));
        if (fresh.length === rows.length && rows.length > 0) {
          state.rows = rows; // more arrived than a page holds: start over from the newest
          state.cursor = page.next_cursor;
          renderList();
        } else {
          state.rows = fresh.concat(state.rows);
          prependRows(fresh);
        }
      }
      $("refreshed").textContent = `updated ${clock(Date.now() / 1000)}`;
    } catch (e) {
      if (e.status === 400) $("filter-error").textContent = e.message;
      else if (e.status !== 401) $("refreshed").textContent = `refresh failed: ${e.message}`;
    } finally {
      state.loading = false;
    }
    if (state.again) {
      state.again = false;
      loadList({ reset: true });
    }
  }

  function rowNode(r, fresh = false) {
    return h(
      "tr",
      {
        "data-id": r.request_id,
        tabindex: "0",
        class: [r.request_id === state.selected ? "selected" : "", fresh ? "fresh" : ""].join(" "),
        title: r.request_id,
      },
      h("td", { class: "mono", title: dateTime(r.ts) }, clock(r.ts)),
      h("td", {}, statusBadge(r.status)),
      h("td", {}, r.team),
      h("td", { class: "ellipsis" }, r.model || dash),
      h("td", { class: "mono muted", title: r.route }, r.route.replace(/^\/v1\//, ""), r.stream ? h("span", { class: "tag-stream" }, " sse") : null, r.replay_of ? h("span", { class: "tag-replay", title: `replay of ${r.replay_of}` }, " replay") : null),
      h("td", { class: "num" }, int(r.input_tokens)),
      h("td", { class: "num" }, int(r.output_tokens)),
      h("td", { class: "num" }, ms(r.duration_ms)),
      h("td", { class: "num" }, ms(r.ttft_ms)),
      h("td", { class: `cache-${r.cache || "none"}` }, r.cache || dash),
      h("td", { class: "ellipsis" }, r.user || ""),
      h("td", { class: "cap", title: r.captured ? "captured" : "not captured" }, r.captured ? "●" : ""),
    );
  }

  function prependRows(fresh) {
    const body = $("rows");
    if (fresh.length === 0) return;
    if (body.querySelector("tr.none")) body.replaceChildren();
    body.prepend(...fresh.map((r) => rowNode(r, true)));
    countLine();
  }

  function countLine() {
    const n = state.rows.length;
    $("count").textContent = `${n} request${n === 1 ? "" : "s"}${state.cursor ? " (more below)" : ""}`;
    $("more").hidden = !state.cursor;
  }

  function renderList() {
    const body = $("rows");
    const rows = state.rows.map((r) => rowNode(r));
    if (rows.length === 0) {
      rows.push(h("tr", { class: "none" }, h("td", { colspan: "12" }, "No requests match these filters.")));
    }
    fill(body, rows);
    countLine();
  }

  function onListClick(event) {
    const tr = event.target.closest("tr[data-id]");
    if (tr) select(tr.getAttribute("data-id"));
  }

  function onListKey(event) {
    const tr = event.target.closest("tr[data-id]");
    if (!tr) return;
    let next = null;
    if (event.key === "ArrowDown" || event.key === "j") next = tr.nextElementSibling;
    else if (event.key === "ArrowUp" || event.key === "k") next = tr.previousElementSibling;
    else if (event.key === "Enter") next = tr;
    if (!next || !next.hasAttribute("data-id")) return;
    event.preventDefault();
    next.focus();
    select(next.getAttribute("data-id"));
  }

  // --- one request -------------------------------------------------------------------------

  async function select(id) {
    state.selected = id;
    // the open request in the address (never the key): a link another engineer can open
    history.replaceState(null, "", `#${encodeURIComponent(id)}`);
    for (const tr of $("rows").children) {
      tr.classList.toggle("selected", tr.getAttribute("data-id") === id);
    }
    const pane = $("detail");
    pane.classList.add("loading");
    try {
      const rec = await api(`/requests/${encodeURIComponent(id)}`);
      if (state.selected === id) fill(pane, renderDetail(rec));
    } catch (e) {
      if (state.selected === id && e.status !== 401) {
        fill(pane, h("p", { class: "error" }, `Could not load ${id}: ${e.message}`));
      }
    } finally {
      pane.classList.remove("loading");
    }
  }

  function section(title, ...kids) {
    return h("section", { class: "block" }, h("h3", {}, title), kids);
  }

  function facts(pairs) {
    return h(
      "dl",
      { class: "facts" },
      pairs.filter(Boolean).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v === "" || v === null || v === undefined ? dash : v)]),
    );
  }

  function safeLink(url, text) {
    try {
      const u = new URL(url);
      if (u.protocol !== "http:" && u.protocol !== "https:") return null;
      return h("a", { href: u.href, target: "_blank", rel: "noopener noreferrer", class: "trace" }, text);
    } catch {
      return null;
    }
  }

  function copyButton(text) {
    return h(
      "button",
      {
        type: "button",
        class: "ghost tiny",
        title: "Copy",
        on: {
          click: (e) => {
            if (!navigator.clipboard) return; // only in a secure context (https, localhost)
            navigator.clipboard.writeText(text).then(
              () => { e.target.textContent = "copied"; },
              () => { e.target.textContent = "copy failed"; },
            );
          },
        },
      },
      "copy",
    );
  }

  function renderDetail(rec) {
    const cap = rec.capture;
    const tags = Object.entries(rec.tags || {}).map(([k, v]) => badge(`${k}=${v}`, "tag"));
    const trace = rec.trace_url ? safeLink(rec.trace_url, "Open trace ↗") : null;
    const replayBtn = h(
      "button",
      {
        type: "button",
        id: "replay",
        class: "primary",
        disabled: cap ? false : true,
        title: cap ? "Send the captured request again, as its team" : "Only a captured request can be replayed",
      },
      "Replay",
    );
    const replayOut = h("div", { id: "replay-result", class: "replay-result" });
    replayBtn.addEventListener("click", () => replay(rec, replayBtn, replayOut));
    return [
      h(
        "div",
        { class: "detail-head" },
        h("div", { class: "title" }, statusBadge(rec.status), h("span", { class: "rid mono" }, rec.request_id), copyButton(rec.request_id)),
        h(
          "div",
          { class: "sub" },
          badge(rec.stream ? "stream" : "json", "kind"),
          rec.transport !== "http" ? badge(rec.transport, "kind") : null,
          rec.cache ? badge(`cache ${rec.cache}`, `cache-${rec.cache}`) : null,
          rec.estimated ? badge("usage estimated", "warn") : null,
          rec.replay_of ? badge(`replay of ${rec.replay_of}`, "kind") : null,
          cap ? badge(`captured (${cap.reason})`, "ok") : badge("not captured", "muted"),
          h("span", { class: "spacer" }),
          trace,
          replayBtn,
        ),
      ),
      replayOut,
      h(
        "div",
        { class: "cols" },
        section(
          "Request",
          facts([
            ["Finished", dateTime(rec.ts)],
            ["Team", rec.team],
            ["Model", rec.model],
            ["Route", rec.route],
            ["Upstream", rec.upstream],
            ["Key id", rec.key_id],
            ["User", rec.user],
            ["Tags", tags.length ? tags : ""],
            rec.response_id ? ["Response id", rec.response_id] : null,
            cap && cap.trace_id ? ["Trace id", h("span", { class: "mono" }, cap.trace_id)] : null,
          ]),
        ),
        section(
          "Usage and cost",
          facts([
            ["Input tokens", int(rec.input_tokens)],
            ["Cached input", int(rec.cached_tokens)],
            ["Output tokens", int(rec.output_tokens)],
            ["Reasoning", int(rec.reasoning_tokens)],
            ["Charged tokens", int(rec.charged_tokens)],
            ["Cost", usd(rec.cost_usd)],
            rec.saved_tokens ? ["Saved by cache", int(rec.saved_tokens)] : null,
          ]),
        ),
      ),
      section("Timeline", timeline(rec)),
      section("Attempts", attempts(rec, cap)),
      cap ? captured(cap, rec) : section("Capture", h("p", { class: "muted" }, "No capture: this request's bodies were not kept (see capture.sample_ratio and capture.errors).")),
    ];
  }

  function timeline(rec) {
    const total = rec.duration_ms || 0;
    const received = rec.ts - total / 1000;
    const marks = [
      ["Received", 0],
      ["First byte", rec.first_byte_ms ?? null],
      ["First token", rec.ttft_ms ?? null],
      ["Last byte", total],
    ];
    const track = h("div", { class: "track" });
    const bar = h("div", { class: "track-fill" });
    track.append(bar);
    for (const [name, at] of marks) {
      if (at === null || total <= 0) continue;
      const m = h("div", { class: "mark", title: `${name}: +${ms(at)}` });
      m.style.left = `${Math.min(100, (at / total) * 100)}%`;
      track.append(m);
    }
    const first = rec.first_byte_ms ?? rec.ttft_ms;
    if (first !== null && first !== undefined && total > 0) {
      const wait = h("div", { class: "track-wait" });
      wait.style.width = `${Math.min(100, (first / total) * 100)}%`;
      track.prepend(wait);
    }
    const table = h(
      "table",
      { class: "times" },
      marks.map(([name, at]) =>
        h(
          "tr",
          {},
          h("th", {}, name),
          h("td", { class: "num mono" }, at === null ? dash : `+${ms(at)}`),
          h("td", { class: "mono muted" }, at === null ? "" : clock(received + at / 1000, true)),
        ),
      ),
    );
    return h("div", { class: "timeline" }, track, table);
  }

  function attempts(rec, cap) {
    if (!cap || !Array.isArray(cap.attempts)) {
      return h("p", { class: "muted" }, `${rec.attempts} upstream call${rec.attempts === 1 ? "" : "s"}; the capture would hold each one's upstream, status and timing.`);
    }
    if (cap.attempts.length === 0) return h("p", { class: "muted" }, "No upstream call (answered by the gateway).");
    const total = Math.max(rec.duration_ms || 0, ...cap.attempts.map((a) => a.started_ms + a.duration_ms));
    return h(
      "table",
      { class: "grid" },
      h("tr", {}, ["#", "Upstream", "Key", "Status", "Outcome", "Start", "Duration", ""].map((t, i) => h("th", { class: i === 5 || i === 6 ? "num" : "" }, t))),
      cap.attempts.map((a, i) => {
        const span = h("div", { class: `gantt ${a.outcome === "ok" ? "ok" : "bad"}` });
        span.style.marginLeft = `${total > 0 ? (a.started_ms / total) * 100 : 0}%`;
        span.style.width = `${total > 0 ? Math.max(1, (a.duration_ms / total) * 100) : 100}%`;
        return h(
          "tr",
          {},
          h("td", {}, String(i + 1)),
          h("td", {}, a.upstream),
          h("td", { class: "mono" }, a.key_id || dash),
          h("td", {}, a.status ? statusBadge(a.status) : dash),
          h("td", {}, a.outcome, a.error ? h("span", { class: "muted" }, ` (${a.error})`) : null),
          h("td", { class: "num" }, `+${ms(a.started_ms)}`),
          h("td", { class: "num" }, ms(a.duration_ms)),
          h("td", { class: "gantt-cell" }, span),
        );
      }),
    );
  }

  function headersBlock(headers) {
    const list = Array.isArray(headers) ? headers : [];
    return h(
      "details",
      { class: "headers" },
      h("summary", {}, `Headers (${list.length})`),
      h("table", { class: "kv mono" }, list.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v)))),
    );
  }

  function cutNote(cut, extra) {
    return cut ? h("p", { class: "warn-text" }, `Cut at capture.max_body_bytes${extra || ""}.`) : null;
  }

  function captured(cap, rec) {
    const req = cap.request || {};
    const ans = cap.answer || {};
    const streamed = "sse" in ans || "output_text" in ans;
    let answerBody;
    if (streamed) {
      answerBody = [
        h("div", { class: "label" }, "Output text (assembled from the stream)"),
        h("pre", { class: "body output", id: "output" }, ans.output_text || ""),
        ans.sse_withheld ? h("p", { class: "muted" }, `Raw events not stored: ${ans.sse_withheld}.`) : null,
        typeof ans.sse === "string"
          ? h("details", { class: "raw" }, h("summary", {}, `Raw events (${bytes(new Blob([ans.sse]).size)})`), h("pre", { class: "body" }, ans.sse))
          : null,
      ];
    } else {
      const text = typeof ans.body === "string" ? outputText(ans.body) : null;
      answerBody = [
        text !== null ? h("div", { class: "label" }, "Output text") : null,
        text !== null ? h("pre", { class: "body output", id: "output" }, text) : null,
        h(
          "details",
          { class: "raw", open: text === null },
          h("summary", {}, "Body"),
          h("pre", { class: "body" }, ans.body === null || ans.body === undefined ? "(none)" : pretty(ans.body)),
        ),
      ];
    }
    return h(
      "div",
      { class: "cols" },
      section(
        "Captured request",
        h("div", { class: "line mono" }, `${req.method || ""} ${req.path || ""}`, h("span", { class: "muted" }, `  ${bytes(req.body_bytes || 0)}`)),
        cutNote(req.body_cut, ` (${bytes(req.body_bytes || 0)} sent)`),
        h("pre", { class: "body", id: "request-body" }, req.body === null || req.body === undefined ? "(no body)" : pretty(req.body)),
        headersBlock(req.headers),
      ),
      section(
        "Captured answer",
        h(
          "div",
          { class: "line" },
          statusBadge(ans.status),
          ans.upstream_status && ans.upstream_status !== ans.status ? h("span", { class: "muted" }, ` upstream ${ans.upstream_status}`) : null,
          ans.complete ? badge("complete", "ok") : badge("did not end whole", "bad"),
          ans.error ? badge(ans.error, "bad") : null,
        ),
        cutNote(ans.body_cut, ""),
        answerBody,
        headersBlock(ans.headers),
      ),
    );
  }

  // --- replay ------------------------------------------------------------------------------

  async function replay(rec, button, out) {
    button.disabled = true;
    button.textContent = "Replaying…";
    fill(out, h("p", { class: "muted" }, "Sending the captured request again…"));
    try {
      const r = await api(`/requests/${encodeURIComponent(rec.request_id)}/replay`, "POST");
      fill(out, comparison(r));
      loadList();
    } catch (e) {
      fill(out, h("p", { class: "error" }, `Replay failed: ${e.message}${e.code ? ` (${e.code})` : ""}`));
    } finally {
      button.disabled = false;
      button.textContent = "Replay";
    }
  }

  function usageOf(u, name) {
    return u && typeof u[name] === "number" ? u[name] : null;
  }

  function comparison(r) {
    const o = r.original || {};
    const rows = [
      ["Status", o.status, r.status, (v) => (v === null || v === undefined ? dash : statusBadge(v))],
      ["Latency", o.latency_ms, r.latency_ms, ms, false], // always differs: not marked
      ["Input tokens", usageOf(o.usage, "input_tokens"), usageOf(r.usage, "input_tokens"), int],
      ["Output tokens", usageOf(o.usage, "output_tokens"), usageOf(r.usage, "output_tokens"), int],
      ["Total tokens", usageOf(o.usage, "total_tokens"), usageOf(r.usage, "total_tokens"), int],
      ["Cost", o.cost_usd, r.cost_usd, usd, false],
    ];
    const sameOutput = (o.output || "") === (r.output || "");
    const [left, right] = sameOutput ? [o.output || "", r.output || ""] : wordDiff(o.output || "", r.output || "");
    const newId = h("a", { href: "#", class: "mono", on: { click: (e) => { e.preventDefault(); select(r.request_id); } } }, r.request_id);
    return h(
      "div",
      { class: "compare" },
      h(
        "div",
        { class: "compare-head" },
        h("strong", {}, "Replay"),
        newId,
        r.error ? badge(r.error, "bad") : null,
        r.streamed ? badge("stream", "kind") : null,
        r.redacted_input ? badge("sent with [REDACTED] input", "warn") : null,
        r.body_cut ? badge("answer shown cut", "warn") : null,
        h("span", { class: "spacer" }),
        badge(sameOutput ? "same output" : "output differs", sameOutput ? "ok" : "warn"),
      ),
      h(
        "table",
        { class: "grid compare-table" },
        h("tr", {}, h("th", {}, ""), h("th", {}, "Original"), h("th", {}, "Replay")),
        rows.map(([name, a, b, fmt, mark = true]) =>
          h("tr", { class: mark && a !== b ? "differs" : "" }, h("th", {}, name), h("td", {}, fmt(a)), h("td", {}, fmt(b))),
        ),
      ),
      h(
        "div",
        { class: "side-by-side" },
        h("div", {}, h("div", { class: "label" }, "Original output"), h("pre", { class: "body output", id: "replay-original" }, left)),
        h("div", {}, h("div", { class: "label" }, "Replay output"), h("pre", { class: "body output", id: "replay-output" }, right)),
      ),
    );
  }

  // a word-level difference: removed words marked on the left, added ones on the right
  function wordDiff(a, b) {
    const x = a.split(/(\s+)/);
    const y = b.split(/(\s+)/);
    if (x.length * y.length > 4_000_000) return [a, b];
    const n = x.length;
    const m = y.length;
    const lcs = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
    for (let i = n - 1; i >= 0; i--) {
      for (let j = m - 1; j >= 0; j--) {
        lcs[i][j] = x[i] === y[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
      }
    }
    const left = [];
    const right = [];
    let i = 0;
    let j = 0;
    while (i < n || j < m) {
      if (i < n && j < m && x[i] === y[j]) {
        left.push(x[i++]);
        right.push(y[j++]);
      } else if (j < m && (i === n || lcs[i][j + 1] >= lcs[i + 1][j])) {
        right.push(h("ins", {}, y[j++]));
      } else {
        left.push(h("del", {}, x[i++]));
      }
    }
    return [left, right];
  }

  // --- budgets and health ------------------------------------------------------------------

  function level(ratio) {
    if (ratio >= 0.9) return "bad";
    if (ratio >= 0.7) return "warn";
    return "ok";
  }

  function budgetBar(w) {
    const limit = w.limit || 0;
    const usedPart = limit > 0 ? Math.min(1, w.used / limit) : 0;
    const reservedPart = limit > 0 ? Math.min(1 - usedPart, w.reserved / limit) : 0;
    const used = h("div", { class: `bar-used ${level(usedPart + reservedPart)}` });
    used.style.width = `${usedPart * 100}%`;
    const reserved = h("div", { class: "bar-reserved" });
    reserved.style.width = `${reservedPart * 100}%`;
    const pct = limit > 0 ? Math.round(((w.used + w.reserved) / limit) * 100) : 0;
    return h(
      "div",
      { class: "budget" },
      h("div", { class: "budget-name" }, `per ${w.per}`, h("span", { class: "muted" }, ` · ${w.unit}`)),
      h("div", { class: "bar", title: `used ${amount(w.unit, w.used)}, reserved ${amount(w.unit, w.reserved)}, limit ${amount(w.unit, w.limit)}` }, used, reserved),
      h(
        "div",
        { class: "budget-text small" },
        h("strong", {}, `${pct}%`),
        ` ${amount(w.unit, w.used)}`,
        w.reserved ? ` + ${amount(w.unit, w.reserved)} reserved` : "",
        ` of ${amount(w.unit, w.limit)}`,
        w.resets_at ? h("span", { class: "muted" }, ` · resets in ${ago(w.resets_at)}`) : null,
      ),
    );
  }

  function renderTeams(teams) {
    fill(
      $("team-names"),
      teams.map((t) => h("option", { value: t.team })),
    );
    fill(
      $("budgets"),
      teams.map((t) =>
        h(
          "div",
          { class: "team" },
          h("div", { class: "team-name" }, t.team, h("span", { class: "muted small" }, `  models: ${t.models.join(", ")}`)),
          t.budgets.length ? t.budgets.map(budgetBar) : h("p", { class: "muted small" }, "No budget."),
        ),
      ),
    );
  }

  const stateClass = (s) => (s === "healthy" ? "ok" : s === "ejected" ? "bad" : "warn");

  function renderUpstreams(ups) {
    fill(
      $("upstreams"),
      h(
        "table",
        { class: "grid" },
        h("tr", {}, ["Upstream / key", "State", "Last minute", "Errors", "Until"].map((t, i) => h("th", { class: i === 2 || i === 3 ? "num" : "" }, t))),
        ups.map((u) => [
          h(
            "tr",
            {},
            h("td", {}, h("strong", {}, u.upstream)),
            h("td", {}, badge(u.state, stateClass(u.state)), u.reason ? h("span", { class: "muted" }, ` ${u.reason}`) : null),
            h("td", { class: "num" }, int(u.recent_requests)),
            h("td", { class: "num" }, `${(u.error_ratio * 100).toFixed(1)}%`),
            h("td", { class: "muted" }, u.until ? clock(u.until) : ""),
          ),
          u.keys.map((k) =>
            h(
              "tr",
              { class: "sub-row" },
              h("td", { class: "mono" }, `key ${k.key_id}`),
              h("td", {}, badge(k.state, stateClass(k.state))),
              h("td", { class: "num" }, int(k.recent_requests)),
              h("td", { class: "num" }, `${(k.error_ratio * 100).toFixed(1)}%`),
              h("td", { class: "muted" }, k.until ? clock(k.until) : ""),
            ),
          ),
        ]),
      ),
    );
    const down = ups.filter((u) => u.state !== "healthy").length;
    return h(
      "span",
      { class: `chip ${down ? (down === ups.length ? "bad" : "warn") : "ok"}` },
      `upstreams ${ups.length - down}/${ups.length} healthy`,
    );
  }

  function renderCache(c) {
    const looked = c.hits + c.misses;
    const ratio = looked ? c.hits / looked : 0;
    fill(
      $("cache"),
      facts([
        ["Enabled", c.enabled ? "yes" : "no"],
        ["Entries", int(c.entries)],
        ["Size", bytes(c.bytes)],
        ["Hits", int(c.hits)],
        ["Misses", int(c.misses)],
        ["Hit ratio", looked ? `${(ratio * 100).toFixed(1)}%` : dash],
        ["Coalesced", int(c.coalesced)],
        ["Bypassed", int(c.bypass)],
        ["In flight", int(c.in_flight)],
      ]),
    );
    return h(
      "span",
      { class: `chip ${c.enabled ? "ok" : "muted"}` },
      c.enabled ? `cache ${int(c.entries)} entries · ${looked ? (ratio * 100).toFixed(0) : 0}% hits` : "cache off",
    );
  }

  async function loadOverview() {
    if (!state.key) return;
    const chips = [];
    const parts = await Promise.allSettled([api("/teams"), api("/upstreams"), api("/cache")]);
    const [teams, ups, cache] = parts;
    if (teams.status === "fulfilled") renderTeams(teams.value.teams);
    if (ups.status === "fulfilled") chips.push(renderUpstreams(ups.value.upstreams));
    else chips.push(h("span", { class: "chip bad" }, `upstreams: ${ups.reason.message}`));
    if (cache.status === "fulfilled") chips.push(renderCache(cache.value));
    else chips.push(h("span", { class: "chip bad" }, `cache: ${cache.reason.message}`));
    if (teams.status === "fulfilled") {
      const tight = teams.value.teams.flatMap((t) => t.budgets.map((w) => ({ t: t.team, w })))
        .filter(({ w }) => w.limit > 0 && (w.used + w.reserved) / w.limit >= 0.8);
      chips.push(
        h(
          "span",
          { class: `chip ${tight.length ? "warn" : "ok"}`, title: tight.map(({ t, w }) => `${t} per ${w.per} ${w.unit}`).join("\n") },
          tight.length ? `${tight.length} budget${tight.length === 1 ? "" : "s"} ≥ 80%` : "budgets fine",
        ),
      );
    }
    fill($("health"), chips);
  }

  // --- views and refreshing ----------------------------------------------------------------

  function show(view) {
    state.view = view;
    for (const tab of document.querySelectorAll(".tab")) {
      tab.classList.toggle("active", tab.getAttribute("data-view") === view);
    }
    $("view-requests").hidden = view !== "requests";
    $("view-overview").hidden = view !== "overview";
  }

  function tick() {
    if (document.hidden || !$("auto").checked || !state.key) return;
    if (state.view === "requests") loadList();
    loadOverview();
  }

  function stopRefresh() {
    if (state.timer !== null) clearInterval(state.timer);
    state.timer = null;
  }

  function start() {
    $("login").hidden = true;
    $("forget").hidden = false;
    show(state.view);
    stopRefresh();
    state.timer = setInterval(tick, REFRESH_MS);
    loadList({ reset: true });
    loadOverview();
    let linked = "";
    try {
      linked = decodeURIComponent(location.hash.slice(1));
    } catch {
      linked = ""; // not an id the page put there
    }
    if (linked && state.view === "requests") select(linked);
  }

  function init() {
    $("login-form").addEventListener("submit", submitKey);
    $("forget").addEventListener("click", () => askForKey(""));
    $("filters").addEventListener("submit", (e) => {
      e.preventDefault();
      loadList({ reset: true });
    });
    $("filters").elements.range.addEventListener("change", () => loadList({ reset: true }));
    $("clear").addEventListener("click", () => {
      $("filters").reset();
      loadList({ reset: true });
    });
    $("more").addEventListener("click", () => loadList({ more: true }));
    $("rows").addEventListener("click", onListClick);
    $("rows").addEventListener("keydown", onListKey);
    for (const tab of document.querySelectorAll(".tab")) {
      tab.addEventListener("click", () => {
        show(tab.getAttribute("data-view"));
        tick();
      });
    }
    document.addEventListener("visibilitychange", tick);
    if (state.key) start();
    else askForKey("");
  }

  init();
})();
