// streambus dashboard: what every page shares. Live updates over server-sent events, pause and
// resume, the ?q= filter kept in the URL (deep links), and small formatting helpers.
"use strict";

const SB = (() => {
  const config = JSON.parse(document.body.dataset.config || "{}");

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("data-")) node.dataset[key.slice(5)] = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const SVG_NS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    const s = Math.max(0, seconds);
    if (s < 60) return `${s.toFixed(1)}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${Math.floor(s % 60)}s`;
    return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  }

  function clock(ms) {
    if (ms === null || ms === undefined) return "-";
    return new Date(ms).toLocaleTimeString([], { hour12: false });
  }

  function ms(value) {
    if (value === null || value === undefined) return "-";
    return value < 1000 ? `${value} ms` : `${(value / 1000).toFixed(2)} s`;
  }

  function replaceRows(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  // The filter box, mirrored in the URL's ?q= so a filtered view can be linked to.
  function filter(onChange) {
    const input = document.getElementById("filter");
    const params = new URLSearchParams(location.search);
    input.value = params.get("q") || "";
    input.addEventListener("input", () => {
      const url = new URL(location.href);
      if (input.value) url.searchParams.set("q", input.value);
      else url.searchParams.delete("q");
      history.replaceState(null, "", url);
      onChange();
    });
    return () => input.value.trim().toLowerCase();
  }

  function matches(query, ...fields) {
    if (!query) return true;
    return fields.join(" ").toLowerCase().includes(query);
  }

  // One EventSource per page. Paused, the page closes it (the server stops sending) and keeps
  // what it shows; resumed, it reconnects and the next snapshot brings it up to date.
  function live(url, onSnapshot) {
    const status = document.getElementById("live");
    const banner = document.getElementById("banner");
    const button = document.getElementById("pause");
    let source = null;

    function show(text, state) {
      status.textContent = text;
      status.className = `live ${state}`;
    }
    function alert(text) {
      banner.textContent = text;
      banner.hidden = false;
    }
    function connect() {
      source = new EventSource(url);
      source.addEventListener("snapshot", (event) => {
        banner.hidden = true;
        show("live", "on");
        onSnapshot(JSON.parse(event.data));
      });
      source.addEventListener("unavailable", (event) => {
        const { message } = JSON.parse(event.data);
        alert(`Redis is unavailable (${message}). Showing the last data; retrying…`);
        show("bus down", "down");
      });
      source.onerror = () => {
        if (source === null) return;
        alert("Lost the connection to the dashboard server; reconnecting…");
        show("reconnecting", "down");
      };
    }
    button.addEventListener("click", () => {
      if (source !== null) {
        source.close();
        source = null;
        button.textContent = "Resume";
        button.setAttribute("aria-pressed", "true");
        show("paused", "paused");
      } else {
        button.textContent = "Pause";
        button.setAttribute("aria-pressed", "false");
        show("connecting", "");
        connect();
      }
    });
    connect();
  }

  return { config, el, svg, duration, clock, ms, replaceRows, filter, matches, live };
})();
