// streambus dashboard: one swarm's blocking view, live.
"use strict";

(() => {
  const { el, svg, config } = SB;
  const swarm = config.swarm;
  const base = `/swarms/${encodeURIComponent(swarm)}`;
  const replayed = new Map();
  let latest = null;
  const query = SB.filter(() => latest && render(latest));

  function rowText(r) {
    return [r.coordinator, r.state, r.dead ? "dead" : "", r.channel || "", (r.watches || []).join(" ")];
  }

  // -- coordinators -----------------------------------------------------------------------------
  function coordinatorRow(r, nowS) {
    const waiting = r.state === "waiting";
    const state = el("td", { class: "state" }, el("span", { class: `badge ${r.state}` }, r.state));
    if (r.dead) state.append(" ", el("span", { class: "badge dead" }, "dead"));
    const beat = r.last_heartbeat_age_s;
    const heartbeat = beat === null || beat === undefined ? "-"
      : r.dead ? `dead · ${SB.duration(beat)} ago` : `${SB.duration(beat)} ago`;
    const left = waiting && r.remaining_s !== undefined ? SB.duration(r.remaining_s) : "-";
    return el("tr", { "data-coordinator": r.coordinator, "data-state": r.state,
                      "data-dead": r.dead ? "true" : "false", class: r.dead ? "dead" : null },
      el("td", { class: "id" }, r.coordinator),
      state,
      el("td", { class: "mono" }, waiting ? r.channel : (r.channel ? `(${r.channel})` : "-")),
      el("td", { class: "num" }, r.iteration ?? "-"),
      el("td", { title: r.since ? new Date(r.since * 1000).toISOString() : "" },
        r.since ? `${SB.duration(nowS - r.since)} ago` : "-"),
      el("td", {}, waiting && r.deadline ? SB.clock(r.deadline * 1000) : "-"),
      el("td", { class: `num${waiting && r.remaining_s === 0 ? " warn" : ""}` }, left),
      el("td", { class: `heartbeat${r.dead ? " warn" : ""}` }, heartbeat),
      el("td", { class: `num${r.retries_pending ? " warn" : ""}` }, r.retries_pending),
      el("td", { class: "mono wrap" }, (r.watches || []).join(", ") || "-"));
  }

  function summary(data) {
    const rows = data.rows;
    const by = (state) => rows.filter((r) => r.state === state).length;
    const nowS = data.now_ms / 1000;
    const waits = rows.filter((r) => r.state === "waiting" && r.since).map((r) => nowS - r.since);
    const chip = (value, label) => el("span", { class: "chip" }, el("b", {}, value), label);
    document.getElementById("summary").replaceChildren(
      chip(rows.length, "coordinators"), chip(by("waiting"), "waiting"),
      chip(by("signaled"), "signaled"), chip(by("timed_out"), "timed out"),
      chip(rows.filter((r) => r.dead).length, `dead (> ${SB.duration(data.dead_after)})`),
      chip(data.counters.dead_letters || 0, "dead letters"),
      chip(waits.length ? SB.duration(Math.max(...waits)) : "-", "oldest wait"));
  }

  // -- CFN loop ---------------------------------------------------------------------------------
  const PATH = ["pending", "implementing", "validating", "deciding"];
  function loop(data) {
    const section = document.getElementById("loop-section");
    section.hidden = !data.loop;
    if (!data.loop) return;
    document.getElementById("loop").replaceChildren(...data.loop.phases.map((p) => {
      const ends = p.state === "escalated" ? "escalated" : "done";
      const steps = [...PATH, ends];
      const at = steps.indexOf(p.state);
      const parts = [el("span", { class: "name" }, p.phase)];
      steps.forEach((step, i) => {
        if (i) parts.push(el("span", { class: "arrow" }, "→"));
        const number = config.loop_numbers[step];
        parts.push(el("span", {
          class: `step${i === at ? ` current ${step}` : ""}${i < at ? " passed" : ""}`,
          "data-step": step,
        }, number ? `${step} (Loop ${number})` : step));
      });
      parts.push(el("span", { class: "muted" }, ` iteration ${p.iteration} · round ${p.round}`));
      return el("div", { class: "loop-phase", "data-phase": p.phase, "data-state": p.state }, ...parts);
    }));
  }

  // -- timeline ---------------------------------------------------------------------------------
  function timeline(data, visible) {
    const spans = data.spans.filter((s) => visible.has(s.coordinator));
    const box = document.getElementById("timeline");
    if (!spans.length) {
      box.replaceChildren(el("p", { class: "muted" }, "No wait in the last " +
        SB.duration(data.window_ms / 1000) + "."));
      return;
    }
    const lanes = [...new Set(spans.map((s) => s.coordinator))].slice(0, 40);
    const now = data.now_ms;
    const t0 = Math.min(now - 10000, Math.max(now - data.window_ms, Math.min(...spans.map((s) => s.start_ms))));
    const W = 1000, left = 160, right = 12, lane = 20, top = 6;
    const H = top + lanes.length * lane + 24;
    const x = (t) => left + ((Math.max(t, t0) - t0) / (now - t0)) * (W - left - right);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
                              "aria-label": "timeline of recent waits" });
    lanes.forEach((name, i) => {
      root.append(svg("text", { x: left - 8, y: top + i * lane + 14, "text-anchor": "end",
                                class: "label" }, name.length > 22 ? name.slice(0, 21) + "…" : name));
      root.append(svg("line", { x1: left, x2: W - right, y1: top + (i + 1) * lane - 1,
                                y2: top + (i + 1) * lane - 1, class: "axis" }));
    });
    for (const s of spans) {
      const i = lanes.indexOf(s.coordinator);
      if (i < 0) continue;
      const end = s.end_ms ?? now;
      const outcome = s.outcome || "waiting";
      const rect = svg("rect", { x: x(s.start_ms), y: top + i * lane + 3, height: lane - 7,
                                 width: Math.max(2, x(end) - x(s.start_ms)), rx: 2,
                                 class: `span ${outcome}` });
      rect.append(svg("title", {}, `${s.coordinator} on ${s.channel} #${s.iteration}: ` +
        `${outcome}, ${SB.duration((end - s.start_ms) / 1000)}`));
      root.append(rect);
    }
    const axisY = top + lanes.length * lane + 16;
    for (let k = 0; k <= 5; k++) {
      const t = t0 + ((now - t0) * k) / 5;
      root.append(svg("text", { x: x(t), y: axisY, "text-anchor": k === 5 ? "end" : "middle" },
        k === 5 ? "now" : `-${SB.duration((now - t) / 1000)}`));
    }
    box.replaceChildren(root);
  }

  // -- latency histograms -----------------------------------------------------------------------
  function latency(data) {
    const box = document.getElementById("latency");
    if (!data.latency.length) {
      box.replaceChildren(el("p", { class: "muted" }, "No ACK in the last " +
        SB.duration(data.window_ms / 1000) + "."));
      return;
    }
    const bounds = config.latency_bounds_ms;
    const labels = [...bounds.map((b) => (b < 1000 ? `${b}` : `${b / 1000}s`)), "more"];
    box.replaceChildren(...data.latency.map((h) => {
      const W = 330, H = 130, left = 8, bottom = 22, top = 14;
      const n = h.buckets.length, bw = (W - left * 2) / n, peak = Math.max(...h.buckets);
      const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
                                "aria-label": `latency histogram of ${h.channel}` });
      h.buckets.forEach((count, i) => {
        const height = peak ? ((H - top - bottom) * count) / peak : 0;
        const bar = svg("rect", { x: left + i * bw + 1, y: H - bottom - height, width: bw - 2,
                                  height: Math.max(count ? 1 : 0, height), class: "bar" });
        bar.append(svg("title", {}, `≤ ${labels[i]} ms: ${count}`));
        root.append(bar);
        if (count) root.append(svg("text", { x: left + i * bw + bw / 2, y: H - bottom - height - 3,
                                             "text-anchor": "middle" }, count));
        if (i % 2 === 0) {
          root.append(svg("text", { x: left + i * bw + bw / 2, y: H - 6, "text-anchor": "middle" },
                          labels[i]));
        }
      });
      return el("div", { class: "histogram", "data-channel": h.channel },
        el("div", { class: "title mono" }, h.channel),
        el("div", { class: "muted" }, `n=${h.count} · p50 ${SB.ms(h.p50_ms)} · ` +
          `p99 ${SB.ms(h.p99_ms)} · max ${SB.ms(h.max_ms)} (bucket bounds in ms)`),
        root);
    }));
  }

  // -- dead letters -----------------------------------------------------------------------------
  async function replay(id, cell) {
    const response = await fetch(`${base}/dead-letters/${id}/replay`,
                                 { method: "POST", headers: { "X-Streambus-Action": "1" } });
    const body = await response.json();
    replayed.set(id, response.ok ? `replayed as ${body.request_id}` : body.error);
    cell.replaceChildren(replayed.get(id));
  }

  function deadLetters(data) {
    const rows = data.dead_letters.map((d) => {
      const action = el("td", {});
      if (replayed.has(d.id)) action.append(replayed.get(d.id));
      else if (data.allow_actions && d.replayable) {
        const button = el("button", { type: "button", class: "replay" }, "Replay");
        button.addEventListener("click", () => replay(d.id, action));
        action.append(button);
      }
      return el("tr", { "data-id": d.id },
        el("td", { title: d.id }, SB.clock(d.at_ms)),
        el("td", { class: "wrap reason" }, d.reason),
        el("td", { class: "mono" }, `${d.source} ${d.source_id}`, el("br"),
           el("span", { class: "muted" }, `group ${d.group}`)),
        el("td", { title: d.body }, d.kind),
        action);
    });
    SB.replaceRows(document.querySelector("#dead-letters tbody"), rows);
    document.getElementById("no-dead-letters").hidden = rows.length > 0;
  }

  function render(data) {
    latest = data;
    const q = query();
    const rows = data.rows.filter((r) => SB.matches(q, ...rowText(r)));
    const nowS = data.now_ms / 1000;
    SB.replaceRows(document.querySelector("#coordinators tbody"),
                   rows.map((r) => coordinatorRow(r, nowS)));
    document.getElementById("no-rows").hidden = rows.length > 0;
    summary(data);
    loop(data);
    const visible = new Set(q ? rows.map((r) => r.coordinator) : data.spans.map((s) => s.coordinator));
    timeline(data, visible);
    latency(data);
    deadLetters(data);
  }

  SB.live(`${base}/events`, render);
})();
