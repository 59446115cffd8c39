// streambus dashboard: every swarm of the namespace, live.
"use strict";

(() => {
  const { el } = SB;
  const tbody = document.querySelector("#swarms tbody");
  let latest = null;
  const query = SB.filter(() => latest && render(latest));

  function loopText(loop) {
    if (!loop) return "-";
    const current = loop.phases.find((p) => p.phase === loop.current);
    if (!current) return `done (${loop.phases.length} phases)`;
    const index = loop.phases.indexOf(current) + 1;
    const number = SB.config.loop_numbers[current.state];
    return `phase ${index}/${loop.phases.length} ${current.phase}: ${current.state}` +
      (number ? ` (Loop ${number})` : "") +
      (current.iteration ? ` · iteration ${current.iteration}` : "") +
      (current.round ? ` · round ${current.round}` : "");
  }

  function count(value, warn) {
    return el("td", { class: `num${warn && value ? " warn" : ""}` }, value);
  }

  function render(data) {
    latest = data;
    const q = query();
    const shown = data.swarms.filter((s) => SB.matches(q, s.swarm, loopText(s.loop)));
    SB.replaceRows(tbody, shown.map((s) => el("tr", { "data-swarm": s.swarm },
      el("td", { class: "id" }, el("a", { href: `/swarms/${encodeURIComponent(s.swarm)}` }, s.swarm)),
      count(s.coordinators), count(s.waiting), count(s.signaled), count(s.timed_out, true),
      count(s.dead, true), count(s.dead_letters, true),
      el("td", { class: "num" }, SB.duration(s.oldest_wait_s)),
      el("td", { class: "loop" }, loopText(s.loop)))));
    document.getElementById("empty").hidden = data.swarms.length > 0;
    const more = document.getElementById("more");
    more.hidden = !data.more;
    more.textContent = data.more ? `${data.more} more swarms not shown.` : "";
  }

  SB.live("/events", render);
})();
