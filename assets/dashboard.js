"use strict";
// rack's dashboard: a snapshot from the REST API, then every change from the event feed
// (GET /events as NDJSON, resumed from the last id after a disconnect). The one thing read
// again on a timer is each app's traffic (GET /apps/{app}/metrics, every 15 s): the router's
// figures are not events.
(() => {
  const $ = (id) => document.getElementById(id);
  const KEY = "rack.credential";
  const apps = new Map();      // name -> {status, release, history: []}
  const builds = new Map();    // id -> {app, status, at}
  const deployments = new Map(); // id -> {app, release, previous, state, at, changes}
  const resources = new Map(); // app -> Map(name -> {type, status, url}), the URL already masked
  const resourceLoads = new Map(); // app -> the number of its latest resource request
  const traffic = new Map();   // app -> {requests, errors, p95, bars}, the last 4 minutes
  let live = null;             // the deployment whose rollout log is shown
  let lastId = null;           // the feed's cursor
  let stopped = false;

  const auth = () => sessionStorage.getItem(KEY);
  const headers = (accept) => ({ Authorization: auth(), Accept: accept || "application/json" });

  async function api(path) {
    const response = await fetch(path, { headers: headers(), cache: "no-store" });
    if (response.status === 401) { signOut("Your credential was refused; sign in again."); throw new Error("unauthorized"); }
    if (!response.ok) throw new Error(`${path}: ${response.status}`);
    return response.json();
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    for (const child of children) node.append(child);
    return node;
  }
  const when = (at) => (at ? new Date(at).toLocaleTimeString() : "");
  const statusCell = (text) => el("td", { class: `status ${String(text).toLowerCase()}` }, String(text).toLowerCase());

  function renderApps() {
    const body = $("apps");
    body.replaceChildren(...[...apps.keys()].sort().map((name) => {
      const app = apps.get(name);
      const row = el("tr", { "data-app": name, "data-status": app.status, "data-history": app.history.join(" ") },
        el("td", {}, name), statusCell(app.status), el("td", { class: "release" }, app.release || "—"));
      return row;
    }));
  }

  function renderRecent(map, bodyId, cells) {
    const rows = [...map.entries()].sort((a, b) => (b[1].at || "").localeCompare(a[1].at || "")).slice(0, 10);
    $(bodyId).replaceChildren(...rows.map(([id, item]) => el("tr", { "data-id": id }, ...cells(id, item))));
  }
  const renderBuilds = () => renderRecent(builds, "builds", (id, b) => [el("td", {}, id), el("td", {}, b.app), statusCell(b.status), el("td", {}, when(b.at))]);
  const renderDeployments = () => renderRecent(deployments, "deployments", (id, d) => [el("td", {}, d.release), el("td", {}, d.app), statusCell(d.state), el("td", { class: "changes" }, d.changes || ""), el("td", { class: "analysis" }, d.analysis || ""), el("td", {}, when(d.at))]);

  // A resource's URL with its password replaced: the API shows it to a credential that may
  // deploy, but the page never puts a secret in the DOM.
  function masked(url) {
    const text = String(url || "");
    const scheme = text.indexOf("://");
    if (scheme < 0) return text;
    const rest = text.slice(scheme + 3);
    const end = rest.search(/[/?#]/);
    const authority = end < 0 ? rest : rest.slice(0, end);
    const at = authority.lastIndexOf("@");
    if (at < 0) return text;
    const colon = authority.indexOf(":");
    if (colon < 0 || colon > at) return text;
    return `${text.slice(0, scheme + 3)}${authority.slice(0, colon)}:********${authority.slice(at)}${end < 0 ? "" : rest.slice(end)}`;
  }

  function renderResources() {
    const rows = [];
    for (const app of [...resources.keys()].sort()) {
      const byName = resources.get(app);
      for (const name of [...byName.keys()].sort()) {
        const r = byName.get(name);
        rows.push(el("tr", { "data-app": app, "data-resource": name, "data-status": r.status },
          el("td", {}, app), el("td", {}, name), el("td", { class: "type" }, r.type), statusCell(r.status),
          el("td", { class: "url" }, r.url || "—")));
      }
    }
    $("resources").replaceChildren(...rows);
  }

  // The app's resources from the API; a later request's answer wins over an earlier one's.
  async function loadResources(app) {
    const number = (resourceLoads.get(app) || 0) + 1;
    resourceLoads.set(app, number);
    const list = await api(`/apps/${encodeURIComponent(app)}/resources`).catch(() => null);
    if (!list || resourceLoads.get(app) !== number || !apps.has(app)) return;
    resources.set(app, new Map(list.map((r) => [r.name, { type: r.type, status: r.status, url: masked(r.url) }])));
    renderResources();
  }

  // Requests per 10 s as block characters, the highest period full.
  function bars(values) {
    const blocks = "▁▂▃▄▅▆▇█";
    const top = Math.max(1, ...values);
    return values.map((v) => blocks[Math.min(7, Math.floor((v / top) * 7.999))]).join("");
  }

  function renderTraffic() {
    const rows = [...traffic.keys()].sort().map((app) => {
      const t = traffic.get(app);
      return el("tr", { "data-app": app, "data-requests": t.requests, "data-errors": t.errors },
        el("td", {}, app), el("td", {}, String(t.requests)), el("td", { class: t.errors ? "status failed" : "" }, String(t.errors)),
        el("td", {}, t.p95 === null ? "—" : t.p95.toFixed(1)), el("td", { class: "bars" }, t.bars));
    });
    $("traffic").replaceChildren(...rows);
  }

  // The app's requests, errors and p95 over the last 4 minutes, by 10 s.
  async function loadTraffic(app) {
    const end = new Date();
    const start = new Date(end.getTime() - 240 * 1000);
    const query = `start=${encodeURIComponent(start.toISOString())}&end=${encodeURIComponent(end.toISOString())}&period=10&metrics=requests,errors,latency-p95`;
    const metrics = await api(`/apps/${encodeURIComponent(app)}/metrics?${query}`).catch(() => null);
    if (!metrics || !apps.has(app)) return;
    const values = (name) => (metrics.find((m) => m.name === name) || { values: [] }).values;
    const sum = (name) => values(name).reduce((total, v) => total + v.sum, 0);
    const p95 = values("latency-p95").reduce((most, v) => Math.max(most, v.max), -1);
    traffic.set(app, { requests: sum("requests"), errors: sum("errors"), p95: p95 < 0 ? null : p95, bars: bars(values("requests").map((v) => v.sum)) });
    renderTraffic();
  }

  // What a deployment changes against the release active before it, as key names only.
  function summary(diff) {
    const parts = [];
    const env = diff.env || {};
    const keys = [...(env.added || []).map((k) => `+${k}`), ...(env.removed || []).map((k) => `-${k}`), ...(env.changed || []).map((k) => `~${k}`)];
    if (keys.length) parts.push(`env ${keys.join(" ")}`);
    if (diff.build && diff.build.changed) parts.push(`build ${diff.build.to ? diff.build.to.id : "changed"}`);
    if (diff.manifest && diff.manifest.changed) parts.push("manifest changed");
    return parts.length ? parts.join("; ") : "no changes";
  }

  async function loadChanges(id) {
    const d = deployments.get(id);
    if (!d || d.changes !== undefined) return;
    if (!d.previous) { d.changes = "first release"; renderDeployments(); return; }
    d.changes = "…";
    const path = `/apps/${encodeURIComponent(d.app)}/releases/${d.previous}/diff/${d.release}`;
    const diff = await api(path).catch(() => null);
    const now = deployments.get(id);
    if (now) { now.changes = diff ? summary(diff) : "—"; renderDeployments(); }
  }

  function setStatus(name, status) {
    const app = apps.get(name) || { status: "", release: "", history: [] };
    if (app.status !== status) app.history.push(status);
    app.status = status;
    apps.set(name, app);
  }

  function activity(event) {
    if (event.kind === "deployment.line") return;
    const list = $("activity");
    list.prepend(el("li", { "data-kind": event.kind }, el("time", {}, when(event.at)), `${event.app}: ${event.message}`));
    while (list.children.length > 50) list.lastChild.remove();
  }

  function showRollout(id, app, release) {
    live = id;
    $("rollout-title").textContent = `Deployment of ${release || "?"} to ${app}`;
    $("rollout").replaceChildren();
  }

  // One feed event: the page's state follows it.
  function apply(event) {
    const data = event.data || {};
    switch (event.kind) {
      case "app.created": setStatus(event.app, "running"); break;
      case "app.updated": { const app = apps.get(event.app); if (app) app.release = data.release || app.release; break; }
      case "app.deleted": apps.delete(event.app); resources.delete(event.app); renderResources(); break;
      case "build.created": case "build.started": case "build.succeeded": case "build.failed": case "build.cancelled": {
        const status = { "build.created": "created", "build.started": "running", "build.succeeded": "complete", "build.failed": "failed", "build.cancelled": "cancelled" }[event.kind];
        const build = builds.get(event.build_id) || { app: event.app, at: event.at };
        builds.set(event.build_id, { ...build, status });
        renderBuilds();
        break;
      }
      case "deployment.started":
        deployments.set(event.deployment_id, { app: event.app, release: event.release_id, previous: data.previous_release, state: data.state || "pending", at: event.at });
        setStatus(event.app, data.status || "updating");
        showRollout(event.deployment_id, event.app, event.release_id);
        renderDeployments();
        loadChanges(event.deployment_id);
        break;
      case "deployment.state": {
        const d = deployments.get(event.deployment_id) || { app: event.app, release: event.release_id, at: event.at };
        deployments.set(event.deployment_id, { ...d, state: data.to });
        setStatus(event.app, data.status);
        renderDeployments();
        break;
      }
      // The traffic analysis' verdict, with its figures (the line says them).
      case "deployment.analysis": {
        const d = deployments.get(event.deployment_id) || { app: event.app, release: event.release_id, at: event.at };
        const verdict = data.service ? `${data.service}: ${event.message.replace(/^analysis:? ?/, "")}` : event.message;
        deployments.set(event.deployment_id, { ...d, analysis: d.analysis ? `${d.analysis}; ${verdict}` : verdict });
        renderDeployments();
        break;
      }
      // A deployment may link a resource or leave one unlinked (which has no event of its own).
      case "deployment.finished": loadResources(event.app); break;
      case "resource.created": case "resource.ready": case "resource.failed": {
        // The event says the status; the URL (ready only once it runs) comes from the API.
        const byName = resources.get(event.app) || new Map();
        const known = byName.get(data.resource) || { url: "" };
        byName.set(data.resource, { ...known, type: data.type, status: data.status });
        resources.set(event.app, byName);
        renderResources();
        loadResources(event.app);
        break;
      }
      case "deployment.line":
        if (event.deployment_id !== live) showRollout(event.deployment_id, event.app, deployments.get(event.deployment_id)?.release);
        $("rollout").append(el("div", { class: "line", "data-id": String(event.id) }, `${event.at.slice(11, 19)} ${data.stream || ""} ${event.message}`));
        $("rollout").scrollTop = $("rollout").scrollHeight;
        break;
      default: break;
    }
    renderApps();
    activity(event);
  }

  // Follows the feed; on a disconnect, resumes after the last event it applied.
  async function follow() {
    while (!stopped && auth()) {
      try {
        const query = lastId === null ? "" : `?after=${lastId}`;
        const response = await fetch(`/events${query}`, { headers: headers("application/x-ndjson"), cache: "no-store" });
        if (response.status === 401) { signOut("Your credential was refused; sign in again."); return; }
        if (!response.ok || !response.body) throw new Error(`feed: ${response.status}`);
        $("feed-state").textContent = "live";
        $("feed-state").classList.add("live");
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let newline;
          while ((newline = buffer.indexOf("\n")) >= 0) {
            const line = buffer.slice(0, newline);
            buffer = buffer.slice(newline + 1);
            if (!line) continue;
            const event = JSON.parse(line);
            if (typeof event.id === "number") { lastId = event.id; apply(event); }
          }
        }
      } catch (error) {
        console.warn(error);
      }
      $("feed-state").textContent = "reconnecting";
      $("feed-state").classList.remove("live");
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }

  async function start() {
    $("login").hidden = true;
    $("board").hidden = false;
    $("logout").hidden = false;
    stopped = false;
    try {
      const system = await api("/system");
      $("rack-name").textContent = system.name || "";
      // The feed first, so nothing that happens while the snapshot loads is missed: its
      // events are applied on top of the snapshot as they come.
      const feed = follow();
      for (const app of await api("/apps")) {
        const known = apps.get(app.name);
        apps.set(app.name, { status: known ? known.status : app.status, release: app.release, history: known ? known.history : [app.status] });
        const [appBuilds, appDeployments] = await Promise.all([
          api(`/apps/${app.name}/builds?limit=5`).catch(() => []),
          api(`/apps/${app.name}/deployments?limit=5`).catch(() => []),
        ]);
        for (const b of appBuilds) if (!builds.has(b.id)) builds.set(b.id, { app: b.app, status: b.status, at: b.started });
        for (const d of appDeployments) if (!deployments.has(d.id)) deployments.set(d.id, { app: d.app, release: d.release, previous: d.previous, state: d.state, at: d.created });
        loadResources(app.name);
        loadTraffic(app.name);
      }
      const timer = setInterval(() => { if (stopped) clearInterval(timer); else for (const app of apps.keys()) loadTraffic(app); }, 15000);
      renderApps(); renderBuilds(); renderDeployments();
      for (const id of deployments.keys()) loadChanges(id);
      await feed;
    } catch (error) {
      console.warn(error);
    }
  }

  function signOut(message) {
    stopped = true;
    sessionStorage.removeItem(KEY);
    $("board").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
  }

  $("login").addEventListener("submit", async (e) => {
    e.preventDefault();
    const credential = "Basic " + btoa("rack:" + $("secret").value);
    const response = await fetch("/auth", { headers: { Authorization: credential, Accept: "application/json" } });
    if (!response.ok) { $("login-error").textContent = response.status === 401 ? "That password or token is not valid." : `Sign-in failed (${response.status}).`; return; }
    sessionStorage.setItem(KEY, credential);
    $("secret").value = "";
    start();
  });
  $("logout").addEventListener("click", () => signOut(""));

  if (auth()) start(); else signOut("");
})();
