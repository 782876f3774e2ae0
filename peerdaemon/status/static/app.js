// peerdaemon status page: the panels from /api/overview, kept live by the event stream
// (/api/events, server-sent events read with fetch, so the API key travels in a header).
// No framework, no build step; every value is put in the page as text, never as HTML.
"use strict";

const KEY_STORE = "peerdaemon-api-key";
const state = {
  key: "",
  cursor: null,
  data: null,
  spaces: [],
  started: performance.now(),
  uptimeBase: null,
  pending: new Set(),
  refreshing: false,
  timer: null,
  lastRefresh: -Infinity,
  shareChoice: new Map(),
  invites: new Map(),
  stream: null,
};

// -- small helpers ------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const $ = (id) => document.getElementById(id);

function bytes(n) {
  if (typeof n !== "number") return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function duration(s) {
  if (typeof s !== "number") return "-";
  s = Math.floor(s);
  const d = Math.floor(s / 86400), hh = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60), sec = s % 60;
  if (d) return `${d}d ${hh}h ${m}m`;
  if (hh) return `${hh}h ${m}m ${sec}s`;
  if (m) return `${m}m ${sec}s`;
  return `${sec}s`;
}

function ago(t) {
  if (typeof t !== "number") return "";
  const s = Date.now() / 1000 - t;
  return s < 60 ? "just now" : duration(s) + " ago";
}

function short(id) {
  return typeof id === "string" ? id.split("-")[0] : "";
}

function toast(text, kind) {
  const el = $("toast");
  el.textContent = text;
  el.className = "toast " + (kind || "");
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, kind === "error" ? 8000 : 2500);
}

async function copy(text, what) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    const area = h("textarea", { class: "offscreen" }, text);
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  toast(`${what} copied`);
}

// -- the API ------------------------------------------------------------------------------------

class Unauthorized extends Error {}

async function api(path, body) {
  const options = { headers: { "X-API-Key": state.key }, cache: "no-store" };
  if (body !== undefined) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (response.status === 401) throw new Unauthorized(data.error ? data.error.message : "unauthorized");
  if (!response.ok) throw new Error(data.error ? `${data.error.message} (${data.error.code})` : response.statusText);
  return data;
}

async function act(button, path, body, done) {
  button.disabled = true;
  try {
    const result = await api(path, body);
    if (done) done(result);
    await refresh(["environments", "spaces"]);
  } catch (err) {
    if (err instanceof Unauthorized) return askForKey(err.message);
    toast(err.message, "error");
  } finally {
    button.disabled = false;
  }
}

// -- panels -------------------------------------------------------------------------------------

function renderDevice(device) {
  $("device-title").textContent = device.name ? `${device.name} · ${short(device.id)}` : "";
  document.title = device.name ? `${device.name} · peerdaemon` : "peerdaemon";
  $("device-name").textContent = device.name || "-";
  $("device-id").textContent = device.id || "-";
  $("device-version").textContent = device.version || "-";
  state.uptimeBase = { uptime: device.uptime, at: performance.now() };
  tickUptime();
  $("device-store").textContent = bytes(device.store_bytes);
  $("device-envs").textContent = String(device.environments ?? "-");
  $("device-data").textContent = device.data_dir || "-";
}

function tickUptime() {
  const base = state.uptimeBase;
  if (base && typeof base.uptime === "number") {
    $("device-uptime").textContent = duration(base.uptime + (performance.now() - base.at) / 1000);
  }
}

function stateBadge(text, kind) {
  return h("span", { class: `badge ${kind || text}` }, text);
}

function renderPeers(peers, hubs) {
  const rows = [...peers, ...hubs].map((row) => {
    const why = row.state !== "connected" && row.reason ? row.reason : "";
    return h("tr", { class: "peer-row", dataset: { device: row.device || "", kind: row.kind || "lan", state: row.state || "" } },
      h("td", {}, h("div", {}, row.kind === "hub" ? "hub " : "", h("strong", {}, row.name || "(unknown)")),
        h("div", { class: "muted small" }, short(row.device) || "")),
      h("td", {}, h("code", { class: "wrap" }, row.address || "-"),
        row.direction ? h("div", { class: "muted small" }, row.direction) : null),
      h("td", {}, stateBadge(row.state || "unknown"),
        why ? h("div", { class: "reason small" }, why) : null,
        row.since ? h("div", { class: "muted small" }, ago(row.since)) : null));
  });
  $("peer-list").replaceChildren(...rows);
  $("peers-empty").hidden = rows.length > 0;
}

function renderSpaces(spaces) {
  state.spaces = spaces;
  const cards = spaces.map((space) => {
    const members = (space.members || []).map((m) =>
      h("li", { dataset: { device: m.device } },
        h("strong", {}, m.name || short(m.device)), " ",
        h("span", { class: "muted small" }, short(m.device)), " ",
        m.self ? stateBadge("this device", "self") : stateBadge(m.link ? m.link.state : "not seen", m.link ? m.link.state : "unknown")));
    const hubs = (space.hubs || []).map((hub) =>
      h("div", { class: "small" }, "hub ", h("code", {}, hub.url), " ", stateBadge(hub.state || "unknown"),
        hub.reason && hub.state !== "connected" ? h("span", { class: "reason" }, " " + hub.reason) : null));
    const invite = state.invites.get(space.id);
    const code = h("input", { class: "invite-code", readonly: true, hidden: !invite, "aria-label": "invite code" });
    code.value = invite || "";
    const button = h("button", {
      class: "small-button", dataset: { action: "invite" },
      onclick: (e) => act(e.currentTarget, "/api/spaces/invite", { space: space.id }, (r) => {
        state.invites.set(space.id, r.code);  // shown again when the panel is drawn anew
        code.value = r.code;
        code.hidden = false;
        copy(r.code, "Invite code");
      }),
    }, "Copy invite");
    return h("div", { class: "space", dataset: { space: space.id } },
      h("div", { class: "space-head" }, h("strong", {}, space.name), " ",
        h("span", { class: "muted small" }, space.id), button),
      hubs.length ? h("div", {}, hubs) : h("div", { class: "muted small" }, "no hub: LAN only"),
      h("ul", { class: "members" }, members), code);
  });
  $("space-list").replaceChildren(...cards);
  $("spaces-empty").hidden = cards.length > 0;
}

function envRow(label, ...content) {
  return h("div", { class: "env-row" }, h("span", { class: "label" }, label), h("span", { class: "value" }, ...content));
}

function sharing(env) {
  if (env.space) {
    return envRow("Shared", "in ", h("strong", { class: "space-name" }, env.space.name), " ",
      h("button", { class: "small-button", dataset: { action: "unshare" }, onclick: (e) => act(e.currentTarget, "/api/environments/unshare", { id: env.id }) }, "Unshare"));
  }
  if (!state.spaces.length) return envRow("Shared", h("span", { class: "muted" }, "local (no space to share it in)"));
  const select = h("select", { "aria-label": "space", onchange: (e) => state.shareChoice.set(env.id, e.target.value) },
    state.spaces.map((s) => h("option", { value: s.id, selected: state.shareChoice.get(env.id) === s.id }, s.name)));
  return envRow("Shared", h("span", { class: "muted" }, "local "), select, " ",
    h("button", { class: "small-button", dataset: { action: "share" }, onclick: (e) => act(e.currentTarget, "/api/environments/share", { id: env.id, space: select.value }) }, "Share"));
}

function linked(env) {
  const link = env.link;
  if (!link) return envRow("File", h("span", { class: "muted" }, "not linked"));
  const rows = [envRow("File", h("code", { class: "wrap" }, link.path), " ", stateBadge(link.state))];
  if (link.conflict) {
    const quote = (path) => "'" + String(path).replace(/'/g, "'\\''") + "'";  // for a shell
    const command = `cp ${quote(link.conflict_path)} ${quote(link.path)}`;
    rows.push(h("div", { class: "conflict-note" },
      h("div", {}, h("strong", {}, "Conflict: "), "the linked file cannot be applied; it is left as it is."),
      link.error ? h("div", { class: "small muted" }, link.error) : null,
      h("div", {}, "Merged state: ", h("code", { class: "wrap conflict-path" }, link.conflict_path)),
      h("div", {}, "To resolve, fix the file, or copy the merged state over it: ",
        h("code", { class: "wrap" }, command), " ",
        h("button", { class: "small-button", onclick: () => copy(command, "Command") }, "Copy command")),
      h("div", { class: "small muted" },
        "Mirroring resumes by itself once the file is valid. There is no resolve button: the page never writes your file.")));
  } else if (link.error) {
    rows.push(h("div", { class: "reason small" }, link.error));
  }
  return rows;
}

function mock(env) {
  const m = env.mock;
  const out = [];
  if (m && m.state !== "stopped") {
    out.push(envRow("Mock", stateBadge(m.state), " ",
      m.url ? h("a", { href: m.url, target: "_blank", rel: "noopener noreferrer", class: "mock-url" }, m.url) : null, " ",
      m.url ? h("button", { class: "small-button", dataset: { action: "copy-url" }, onclick: () => copy(m.url, "Mock URL") }, "Copy URL") : null, " ",
      h("button", { class: "small-button", dataset: { action: "mock-stop" }, onclick: (e) => act(e.currentTarget, "/api/mocks/stop", { id: env.id }) }, "Stop"),
      typeof m.requests === "number" ? h("span", { class: "muted small" }, ` ${m.requests} request${m.requests === 1 ? "" : "s"}`) : null));
    if (m.error) out.push(h("div", { class: "reason small" }, `${m.error.code || "error"}: ${m.error.message || ""}`));
  } else {
    out.push(envRow("Mock", h("span", { class: "muted" }, "not served "),
      h("button", { class: "small-button", dataset: { action: "mock-start" }, onclick: (e) => act(e.currentTarget, "/api/mocks/start", { id: env.id }, (r) => toast(`Serving at ${r.url}`)) }, "Start mock")));
  }
  const cloud = env.cloud_mock;
  if (cloud) {
    out.push(envRow("Cloud Mock", stateBadge(cloud.state), " ",
      cloud.url ? h("code", { class: "wrap" }, cloud.url) : null, " ",
      cloud.url ? h("button", { class: "small-button", onclick: () => copy(cloud.url, "Cloud Mock URL") }, "Copy URL") : null,
      cloud.access ? h("span", { class: "muted small" }, ` access: ${cloud.access}`) : null));
  }
  return out;
}

function renderEnvironments(envs) {
  const cards = envs.map((env) => {
    const badges = [];
    if (env.link && env.link.conflict) badges.push(stateBadge("conflict"));
    if (env.mock && env.mock.state === "running") badges.push(stateBadge("served", "running"));
    if (env.space) badges.push(stateBadge("shared"));
    if (env.newer) badges.push(stateBadge("newer Mockoon", "warning"));
    if ((env.errors || []).length) badges.push(stateBadge("error"));
    return h("article", { class: "env", dataset: { env: env.id } },
      h("div", { class: "env-head" },
        h("strong", { class: "env-name" }, env.name || "(unnamed)"), " ",
        h("span", { class: "muted small" }, `${env.routes} routes · ${bytes(env.size)}`), " ", badges),
      envRow("ID", h("code", {}, env.id)),
      sharing(env), linked(env), mock(env),
      (env.errors || []).map((e) => h("div", { class: "reason small" }, e)));
  });
  $("env-list").replaceChildren(...cards);
  $("envs-empty").hidden = cards.length > 0;
}

function describe(event) {
  const d = event.data || {};
  const bits = [];
  if (d.name) bits.push(d.name);
  if (d.id) bits.push(short(d.id));
  if (d.device) bits.push(short(d.device));
  if (d.origin && d.origin !== "local") bits.push(`from ${d.origin.split(":")[0]}`);
  if (d.url) bits.push(d.url);
  if (d.reason) bits.push(d.reason);
  if (d.path) bits.push(d.path);
  return bits.join(" · ");
}

function eventItem(event) {
  const time = new Date((event.time || 0) * 1000).toLocaleTimeString();
  return h("li", { dataset: { id: event.id, type: event.type } },
    h("span", { class: "muted small" }, time), " ", h("strong", {}, event.type), " ",
    h("span", { class: "small" }, describe(event)));
}

function addEvents(events) {
  const list = $("event-list");
  list.prepend(...events.slice(-100).reverse().map(eventItem));
  while (list.children.length > 100) list.lastElementChild.remove();
}

// -- live updates -------------------------------------------------------------------------------

const SECTIONS_OF = [
  [/^environment-(shared|unshared)/, ["environments", "spaces"]],
  [/^(environment|mirror|mock|files|file)-/, ["environments"]],
  [/^(peer|hub)-/, ["peers", "spaces"]],
  [/^space-/, ["spaces", "environments", "device"]],
];

function sectionsFor(type) {
  for (const [pattern, sections] of SECTIONS_OF) if (pattern.test(type)) return sections;
  return ["device", "spaces", "environments", "peers"];
}

// A burst of events (a script editing, a peer catching up) costs the daemon one re-read of the
// panels a second, not one per event: the first event after a quiet spell is shown within
// QUICK ms, later ones at most every GAP ms.
const QUICK = 150, GAP = 1000;

function schedule(sections) {
  for (const s of sections) state.pending.add(s);
  if (state.timer || state.refreshing || !state.pending.size) return;
  const wait = Math.max(QUICK, state.lastRefresh + GAP - performance.now());
  state.timer = setTimeout(() => { state.timer = null; refresh(); }, wait);
}

async function refresh(sections) {
  if (sections) for (const s of sections) state.pending.add(s);
  if (state.refreshing || !state.pending.size) return;
  state.refreshing = true;
  try {
    const wanted = [...state.pending];
    state.pending.clear();
    // the share buttons list the spaces: an environments refresh takes the spaces along
    if (wanted.includes("environments") && !wanted.includes("spaces")) wanted.push("spaces");
    const results = await Promise.all(wanted.map((s) => api("/api/" + s).then((r) => [s, r])));
    const got = Object.fromEntries(results);
    if (got.device) renderDevice(got.device);
    if (got.spaces) renderSpaces(got.spaces);
    if (got.environments) renderEnvironments(got.environments);
    if (got.peers) renderPeers(got.peers.peers, got.peers.hubs);
  } catch (err) {
    if (err instanceof Unauthorized) askForKey(err.message);
    else toast(`refresh failed: ${err.message}`, "error");
  } finally {
    state.refreshing = false;
    state.lastRefresh = performance.now();
    schedule([]);  // what came in meanwhile
  }
}

function setLive(status) {
  const el = $("live");
  el.dataset.state = status;
  el.textContent = { live: "live", connecting: "connecting", offline: "offline" }[status];
}

function handleBlocks(blocks) {
  const events = [];
  for (const block of blocks) {
    const event = parseBlock(block);
    if (event) events.push(event);
  }
  if (!events.length) return;
  addEvents(events);
  const sections = new Set();
  for (const event of events) for (const s of sectionsFor(event.type)) sections.add(s);
  schedule(sections);
}

function parseBlock(block) {
  let type = "message", data = "";
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const at = line.indexOf(":");
    const field = at < 0 ? line : line.slice(0, at);
    const value = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
    if (field === "event") type = value;
    else if (field === "data") data += (data ? "\n" : "") + value;
  }
  if (!data) return null;
  const payload = JSON.parse(data);
  if (type === "hello") {
    // events were lost (the log moved on, or the daemon restarted): re-read everything
    if (payload.reset || payload.missed) schedule(["device", "spaces", "environments", "peers"]);
    return null;
  }
  if (typeof payload.id === "number") state.cursor = payload.id;
  return payload;
}

async function follow() {
  for (;;) {
    const controller = new AbortController();
    state.stream = controller;
    try {
      const response = await fetch(`/api/events?since=${state.cursor}`, {
        headers: { "X-API-Key": state.key, Accept: "text/event-stream" },
        cache: "no-store",
        signal: controller.signal,
      });
      if (response.status === 401) return askForKey("the API key was refused");
      if (!response.ok) throw new Error(response.statusText);
      setLive("live");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer = (buffer + value).replace(/\r\n?/g, "\n");
        const end = buffer.lastIndexOf("\n\n");
        if (end >= 0) {
          handleBlocks(buffer.slice(0, end).split("\n\n"));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (_) {
      // the daemon stopped or restarted: retry below, from the last event seen
    }
    setLive("offline");
    await new Promise((resolve) => setTimeout(resolve, 2000));
    setLive("connecting");
  }
}

// -- start --------------------------------------------------------------------------------------

function askForKey(message) {
  $("main").hidden = true;
  $("key-form").hidden = false;
  const error = $("key-error");
  error.hidden = !message;
  error.textContent = message || "";
  setLive("offline");
}

async function start() {
  try {
    const overview = await api("/api/overview");
    sessionStorage.setItem(KEY_STORE, state.key);
    $("key-form").hidden = true;
    $("main").hidden = false;
    renderDevice(overview.device);
    renderSpaces(overview.spaces);
    renderEnvironments(overview.environments);
    renderPeers(overview.peers, overview.hubs);
    addEvents(overview.events);
    state.cursor = overview.cursor;
    document.body.dataset.ready = "1";
    performance.mark("peerdaemon-panels-filled");
    setInterval(tickUptime, 1000);
    follow();
  } catch (err) {
    if (err instanceof Unauthorized) askForKey(state.key ? err.message : "");
    else askForKey(`cannot reach the daemon: ${err.message}`);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const meta = document.querySelector('meta[name="peerdaemon-api-key"]');
  const fromMeta = meta && meta.content && !meta.content.startsWith("{{") ? meta.content : "";
  if (location.hash.startsWith("#key=")) {
    state.key = decodeURIComponent(location.hash.slice(5));
    history.replaceState(null, "", location.pathname);  // out of the address bar and history
  } else {
    state.key = fromMeta || sessionStorage.getItem(KEY_STORE) || "";
  }
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("key-input").value.trim();
    start();
  });
  if (state.key) start();
  else askForKey("");
});
