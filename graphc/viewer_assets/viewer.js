// graphc viewer: draws the model graphc.viewer exported (nodes laid out in nested blocks) on a canvas.
// Part of graphc (same licence). No dependencies: the page works offline.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("graphc-data").textContent);
  const N = data.nodes, E = data.edges, B = data.blocks, info = data.info;
  const PADX = 14, HEADER = 24, PADB = 12, RANK_GAP = 34;
  const PART = {
    forward: ["#dbe9ff", "#3d6fb6", "forward"],
    gradient: ["#ffe1cc", "#c2571a", "gradient"],
    update: ["#ecdcf8", "#7b3fa6", "optimiser update"],
    state: ["#f7f0d4", "#9a7b12", "optimiser state"],
  };
  const KIND = {
    input: ["#cfe2ff", "#2b5aa0", "input"],
    parameter: ["#fff3cd", "#b8860b", "parameter"],
    constant: ["#eeeeee", "#888888", "constant"],
    output: ["#d1e7dd", "#2f7a4f", "output"],
  };
  const FALLBACK = "#d10f2f";
  const expanded = new Set();
  const inEdges = N.map(() => []), outEdges = N.map(() => []);
  E.forEach((e, k) => { outEdges[e[0]].push(k); inEdges[e[1]].push(k); });
  const depth = N.map(() => 0);
  N.forEach((n, i) => { let d = 0, p = n.parent; while (p >= 0) { d++; p = N[p].parent; } depth[i] = d; });
  const base = (loc) => { const k = loc.lastIndexOf("/"); return k >= 0 ? loc.slice(k + 1) : loc; };
  // what a search matches: op, title, tensor names, source file:line (each field ends with " \u0001")
  const searchText = N.map((n) => [n.op, n.full, n.names.join(" "), n.loc, base(n.loc), ""].join(" \u0001 ").toLowerCase());
  const maxTime = N.reduce((m, n) => Math.max(m, n.time || 0), 0);

  const canvas = document.getElementById("canvas");
  const ctx = canvas.getContext("2d");
  const $ = (id) => document.getElementById(id);
  let W = 0, H = 0, dpr = 1, scale = 1, tx = 0, ty = 0;
  let visible = [], visEdges = [], root = { w: 0, h: 0, minx: 0 };
  let selected = -1, mode = "part", lastRenderMs = 0, frame = 0;

  // ---- layout: the exported block layouts, grown where boxes are expanded ----------------------
  function layoutBlock(key) {
    const b = B[key];
    let y = 0, minx = Infinity, maxx = -Infinity;
    for (let r = 0; r < b.ranks.length; r++) {
      let shift = 0, rh = b.rh[r];
      const row = b.ranks[r];
      for (const i of row) {
        const n = N[i];
        let w = n.w, h = n.h;
        n._inner = null;
        if (n.block !== undefined && expanded.has(i)) {
          const s = layoutBlock(n.block);
          n._inner = s;
          w = Math.max(n.w, s.w + 2 * PADX);
          h = s.h + HEADER + PADB;
        }
        n._cx = n.x + shift + (w - n.w) / 2;
        shift += w - n.w;
        n._w = w; n._h = h;
        if (h > rh) rh = h;
        if (n._cx - w / 2 < minx) minx = n._cx - w / 2;
        if (n._cx + w / 2 > maxx) maxx = n._cx + w / 2;
      }
      for (const i of row) N[i]._cy = y;
      y += rh + RANK_GAP;
    }
    if (minx === Infinity) { minx = 0; maxx = 0; }
    return { w: maxx - minx, h: Math.max(0, y - RANK_GAP), minx: minx };
  }

  function place(key, ox, oy, s) {
    const b = B[key];
    for (const row of b.ranks) {
      for (const i of row) {
        const n = N[i];
        n.ax = ox + n._cx - s.minx; n.ay = oy + n._cy; n.vis = true;
        visible.push(i);
        if (n._inner) place(n.block, n.ax - n._w / 2 + PADX + (n._w - 2 * PADX - n._inner.w) / 2, n.ay + HEADER, n._inner);
      }
    }
  }

  function relayout() {
    for (const n of N) n.vis = false;
    visible = [];
    root = layoutBlock("root");
    place("root", 0, 0, root);
    visEdges = [];
    for (let k = 0; k < E.length; k++) if (N[E[k][0]].vis && N[E[k][1]].vis) visEdges.push(k);
  }

  // ---- colours ----------------------------------------------------------------------------------
  function bufColour(b) { return "hsl(" + ((b * 137.508) % 360).toFixed(1) + ",65%,82%)"; }
  function colours(n) {
    if (mode === "memory") {
      if (n.buf) return [bufColour(n.buf[0]), n.inplace ? "#000" : "#555"];
      if (KIND[n.kind]) return KIND[n.kind];
      return ["#ffffff", "#999999"];
    }
    if (mode === "time") {
      if (n.time != null && maxTime > 0) {
        const f = n.time / maxTime;
        return ["rgb(255," + Math.round(245 - 190 * f) + "," + Math.round(235 - 200 * f) + ")", "#7a1f1f"];
      }
      if (KIND[n.kind]) return KIND[n.kind];
      return ["#ffffff", "#999999"];
    }
    if (KIND[n.kind]) return KIND[n.kind];
    return PART[n.part] || PART.forward;
  }

  // ---- drawing ----------------------------------------------------------------------------------
  function resize() {
    const r = canvas.getBoundingClientRect();
    dpr = window.devicePixelRatio || 1;
    W = Math.max(1, r.width); H = Math.max(1, r.height);
    canvas.width = Math.round(W * dpr); canvas.height = Math.round(H * dpr);
    requestDraw();
  }
  function requestDraw() { if (!frame) frame = requestAnimationFrame(() => { frame = 0; draw(); }); }

  function roundRect(x, y, w, h, r) {
    ctx.moveTo(x + r, y); ctx.lineTo(x + w - r, y); ctx.quadraticCurveTo(x + w, y, x + w, y + r);
    ctx.lineTo(x + w, y + h - r); ctx.quadraticCurveTo(x + w, y + h, x + w - r, y + h);
    ctx.lineTo(x + r, y + h); ctx.quadraticCurveTo(x, y + h, x, y + h - r);
    ctx.lineTo(x, y + r); ctx.quadraticCurveTo(x, y, x + r, y);
  }

  function edgePath(e) {
    const s = N[e[0]], t = N[e[1]];
    if (e[3] === 1) {  // update: from the new value back up to its parameter, on the right
      const x0 = s.ax + s._w / 2, y0 = s.ay + s._h / 2, x1 = t.ax + t._w / 2, y1 = t.ay + t._h / 2;
      const bend = 60 + Math.min(400, Math.abs(y0 - y1) * 0.15);
      ctx.moveTo(x0, y0); ctx.bezierCurveTo(x0 + bend, y0, x1 + bend, y1, x1, y1);
      return;
    }
    const x0 = s.ax, y0 = s.ay + s._h, x1 = t.ax, y1 = t.ay;
    const dy = Math.max(24, (y1 - y0) / 2);
    ctx.moveTo(x0, y0); ctx.bezierCurveTo(x0, y0 + dy, x1, y1 - dy, x1, y1);
  }

  function edgeInView(e, x0, y0, x1, y1) {
    const s = N[e[0]], t = N[e[1]];
    const lo = Math.min(s.ax, t.ax) - 500, hi = Math.max(s.ax, t.ax) + 500;
    const top = Math.min(s.ay, t.ay), bot = Math.max(s.ay + s._h, t.ay + t._h);
    return hi >= x0 && lo <= x1 && bot >= y0 && top <= y1;
  }

  function draw() {
    const t0 = performance.now();
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = "#ffffff"; ctx.fillRect(0, 0, W, H);
    ctx.setTransform(dpr * scale, 0, 0, dpr * scale, dpr * tx, dpr * ty);
    const x0 = -tx / scale, y0 = -ty / scale, x1 = x0 + W / scale, y1 = y0 + H / scale;
    const inView = (n) => n.ax + n._w / 2 >= x0 && n.ax - n._w / 2 <= x1 && n.ay + n._h >= y0 && n.ay <= y1;
    const text = scale >= 0.33;
    // expanded boxes: frames under their bodies
    for (const i of visible) {
      const n = N[i];
      if (!n._inner || !inView(n)) continue;
      const c = colours(n);
      ctx.beginPath(); roundRect(n.ax - n._w / 2, n.ay, n._w, n._h, 8);
      ctx.fillStyle = n.kind === "scan" ? "#fdf4ea" : "#eef5ff"; ctx.fill();
      ctx.setLineDash([6, 4]); ctx.lineWidth = (n.fb ? 3 : 1.5) / Math.max(scale, 0.3);
      ctx.strokeStyle = n.fb ? FALLBACK : c[1]; ctx.stroke(); ctx.setLineDash([]);
      if (text) {
        ctx.fillStyle = "#333"; ctx.font = "bold 11px sans-serif"; ctx.textBaseline = "middle";
        ctx.fillText("\u25be " + n.title + (n.kernel ? "   " + n.kernel.split(" ")[0] : ""), n.ax - n._w / 2 + 8, n.ay + HEADER / 2);
      }
    }
    // edges, batched by style
    const lw = 1 / Math.max(scale, 0.25);
    const hl = new Set();
    if (selected >= 0) { for (const k of inEdges[selected]) hl.add(k); for (const k of outEdges[selected]) hl.add(k); }
    ctx.beginPath();
    for (const k of visEdges) { const e = E[k]; if (e[3] === 0 && !hl.has(k) && edgeInView(e, x0, y0, x1, y1)) edgePath(e); }
    ctx.strokeStyle = "#8a8f98"; ctx.lineWidth = lw; ctx.stroke();
    ctx.beginPath();
    for (const k of visEdges) { const e = E[k]; if (e[3] === 1 && !hl.has(k)) edgePath(e); }
    ctx.strokeStyle = "#b02a37"; ctx.setLineDash([5, 4]); ctx.lineWidth = 1.3 * lw; ctx.stroke(); ctx.setLineDash([]);
    if (hl.size) {
      ctx.beginPath();
      for (const k of hl) if (N[E[k][0]].vis && N[E[k][1]].vis) edgePath(E[k]);
      ctx.strokeStyle = "#0b5ed7"; ctx.lineWidth = 2.5 * lw; ctx.stroke();
    }
    // arrow heads and edge labels when zoomed in
    if (scale > 0.35) {
      ctx.fillStyle = "#8a8f98";
      ctx.beginPath();
      for (const k of visEdges) {
        const e = E[k]; if (e[3] !== 0) continue;
        const t = N[e[1]];
        if (t.ax < x0 || t.ax > x1 || t.ay < y0 || t.ay > y1) continue;
        ctx.moveTo(t.ax, t.ay); ctx.lineTo(t.ax - 4, t.ay - 7); ctx.lineTo(t.ax + 4, t.ay - 7); ctx.closePath();
      }
      ctx.fill();
    }
    if (scale > 0.9) {
      ctx.font = "9px sans-serif"; ctx.fillStyle = "#666"; ctx.textBaseline = "middle";
      let shown = 0;
      for (const k of visEdges) {
        const e = E[k]; if (e[3] !== 0 || !e[2]) continue;
        const s = N[e[0]], t = N[e[1]];
        const mx = (s.ax + t.ax) / 2 + 4, my = (s.ay + s._h + t.ay) / 2;
        if (mx < x0 || mx > x1 || my < y0 || my > y1) continue;
        ctx.fillText(e[2], mx, my);
        if (++shown > 1500) break;
      }
    }
    // nodes
    const mates = mode === "memory" && selected >= 0 && N[selected].buf ? new Set(N[selected].buf) : null;
    for (const i of visible) {
      const n = N[i];
      if (n._inner || !inView(n)) continue;
      const c = colours(n);
      const x = n.ax - n._w / 2, y = n.ay;
      ctx.beginPath();
      const rad = n.kind === "input" || n.kind === "output" ? 14 : n.kind === "parameter" ? 9 : 3;
      roundRect(x, y, n._w, n._h, rad);
      ctx.fillStyle = scale < 0.25 ? c[1] : c[0]; ctx.fill();  // far out: the stronger colour
      let sw = 1, sc = c[1];
      if (n.block !== undefined) sw = 2.2;
      if (n.fb) { sw = 3; sc = FALLBACK; }
      if (mates && n.buf && n.buf.some((b) => mates.has(b))) { sw = 3.5; sc = "#000"; }
      if (i === selected) { sw = 3.5; sc = "#0b5ed7"; }
      if (scale > 0.08 || sw > 1) { ctx.lineWidth = sw / Math.max(scale, 0.2); ctx.strokeStyle = sc; ctx.stroke(); }
      if (n.block !== undefined && scale > 0.2) {  // a collapsed kernel/loop: stacked-box look
        ctx.beginPath(); ctx.moveTo(x + 4, y + n._h + 3); ctx.lineTo(x + n._w + 3, y + n._h + 3); ctx.lineTo(x + n._w + 3, y + 4);
        ctx.lineWidth = 1.2 / scale; ctx.strokeStyle = c[1]; ctx.stroke();
      }
      if (text) {
        ctx.textBaseline = "alphabetic"; ctx.fillStyle = "#111";
        ctx.font = (n.kind === "op" ? "" : "bold ") + "11px sans-serif";
        const pre = n.block !== undefined ? "\u25b8 " : "";
        ctx.fillText(pre + n.title, x + 8, y + 14, n._w - 12);
        ctx.font = "10px sans-serif"; ctx.fillStyle = "#555";
        ctx.fillText(n.sub, x + 8, y + 28, n._w - 12);
        if (mode === "time" && n.time != null) {
          ctx.fillStyle = "#7a1f1f"; ctx.font = "bold 10px sans-serif";
          ctx.fillText(fmtTime(n.time), x + n._w + 5, y + 14);
        }
      }
    }
    lastRenderMs = performance.now() - t0;
    document.body.dataset.rendered = String((+document.body.dataset.rendered || 0) + 1);
  }

  function fmtTime(s) { return s >= 1e-3 ? (s * 1e3).toFixed(2) + " ms" : (s * 1e6).toFixed(1) + " \u00b5s"; }

  // ---- view ---------------------------------------------------------------------------------------
  // whole: the whole graph in the window; else a readable start (the top of a tall graph, full width)
  function fit(whole) {
    const w = root.w + 40, h = root.h + 40;
    const all = Math.min(W / w, H / h);
    scale = whole !== false || all >= 0.45 ? Math.min(all, 1.2) : Math.max(all, Math.min(W / w, 0.6));
    tx = (W - root.w * scale) / 2;
    ty = root.h * scale + 20 <= H ? (H - root.h * scale) / 2 : 20;
    requestDraw();
  }
  function centerOn(i, minScale) {
    const n = N[i];
    if (minScale && scale < minScale) scale = minScale;
    tx = W / 2 - n.ax * scale; ty = H / 2 - (n.ay + n._h / 2) * scale;
    requestDraw();
  }
  function hit(px, py) {
    const x = (px - tx) / scale, y = (py - ty) / scale;
    for (let k = visible.length - 1; k >= 0; k--) {
      const n = N[visible[k]];
      if (x >= n.ax - n._w / 2 && x <= n.ax + n._w / 2 && y >= n.ay && y <= n.ay + n._h) {
        return { id: visible[k], header: !!n._inner && y <= n.ay + HEADER };
      }
    }
    return null;
  }

  function toggle(i, on) {
    if (N[i].block === undefined) return;
    if (on === undefined) on = !expanded.has(i);
    if (on) expanded.add(i); else expanded.delete(i);
    const before = N[i].vis ? [N[i].ax, N[i].ay] : null;
    relayout();
    if (before) { tx += (before[0] - N[i].ax) * scale; ty += (before[1] - N[i].ay) * scale; }  // keep it still
    requestDraw();
  }
  function reveal(i) {
    let p = N[i].parent, changed = false;
    while (p >= 0) { if (!expanded.has(p)) { expanded.add(p); changed = true; } p = N[p].parent; }
    if (changed) relayout();
    select(i);
    centerOn(i, 0.8);
  }

  // ---- details ------------------------------------------------------------------------------------
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  function link(i, text) { return '<a data-node="' + i + '">' + esc(text) + "</a>"; }
  function select(i) {
    selected = i;
    const d = $("details");
    if (i < 0) { d.innerHTML = '<p class="muted">Click a node to see its op, attributes, types and source line.</p>'; requestDraw(); return; }
    const n = N[i];
    const rows = [];
    const row = (k, v) => rows.push("<tr><td>" + esc(k) + "</td><td>" + v + "</td></tr>");
    const part = KIND[n.kind] && n.kind !== "output" ? KIND[n.kind][2] : (PART[n.part] || PART.forward)[2];
    row("op", esc(n.op));
    row("kind", esc(n.kind) + " \u00b7 " + esc(part));
    if (n.names.length) row("name", esc(n.names.join(", ")));
    for (const k in n.attrs) row(k, esc(n.attrs[k]));
    n.ins.forEach((t, k) => row("in " + k, esc(t.type) + " " + (t.src != null ? link(t.src, (N[t.src].names[t.out || 0] || N[t.src].full) + (t.out != null ? "." + t.out : "")) : esc(t.label))));
    n.outs.forEach((t, k) => row("out " + k, esc(t)));
    const users = outEdges[i].filter((k) => E[k][3] === 0).map((k) => E[k][1]);
    if (users.length) row("used by", users.slice(0, 20).map((u) => link(u, N[u].full)).join(", ") + (users.length > 20 ? " \u2026" : ""));
    if (n.updated_by != null) row("updated by", link(n.updated_by, N[n.updated_by].full));
    const upd = outEdges[i].filter((k) => E[k][3] === 1).map((k) => E[k][1]);
    if (upd.length) row("new value of", upd.map((u) => link(u, N[u].full)).join(", "));
    if (n.kernel) row("kernel", esc(n.kernel));
    if (n.parent >= 0) row("inside", link(n.parent, N[n.parent].full));
    if (n.members != null) row(n.kind === "scan" ? "body" : "fused ops", n.members + ' ops <a data-toggle="' + i + '">' + (expanded.has(i) ? "collapse" : "expand") + "</a>");
    if (n.buf) row("buffer", "workspace " + n.buf.map((b) => "#" + b).join(", ") + (n.inplace ? " (in place over a dying input)" : ""));
    if (n.fb) row("host fallback", '<b style="color:' + FALLBACK + '">the backend runs this op\'s NumPy impl on the host</b>');
    if (n.time != null) row("time", esc(fmtTime(n.time)));
    let h = "<h2>" + esc(n.full) + "</h2>";
    if (n.loc) h += '<div class="src">source: <code id="loc">' + esc(n.loc) + "</code></div>" + (n.code ? "<pre id=\"code\">" + esc(n.code) + "</pre>" : "");
    d.innerHTML = h + "<table>" + rows.join("") + "</table>";
    requestDraw();
  }
  $("details").addEventListener("click", (ev) => {
    const a = ev.target.closest("a"); if (!a) return;
    if (a.dataset.node != null) reveal(+a.dataset.node);
    if (a.dataset.toggle != null) { const i = +a.dataset.toggle; toggle(i); select(i); }
  });

  // ---- search -------------------------------------------------------------------------------------
  function search(q) {
    // a file:line token matches that line exactly (not line 50 for ":5")
    const toks = q.toLowerCase().split(/\s+/).filter(Boolean).map((t) => (/:\d+$/.test(t) ? t + " \u0001" : t));
    if (!toks.length) return [];
    const out = [];
    for (let i = 0; i < N.length; i++) if (toks.every((t) => searchText[i].includes(t))) out.push(i);
    out.sort((a, b) => depth[a] - depth[b] || a - b);
    return out;
  }
  let results = [], active = 0;
  function showResults() {
    const box = $("results");
    const q = $("search").value;
    results = search(q);
    active = 0;
    if (!q.trim()) { box.hidden = true; return; }
    box.hidden = false;
    if (!results.length) { box.innerHTML = '<div class="muted">no node matches</div>'; return; }
    box.innerHTML = results.slice(0, 200).map((i, k) => '<div data-node="' + i + '"' + (k === 0 ? ' class="active"' : "") + ">" +
      esc(N[i].full) + ' <span class="loc">' + esc(N[i].outs[0] || "") + " " + esc(base(N[i].loc)) + "</span></div>").join("") +
      (results.length > 200 ? '<div class="muted">' + (results.length - 200) + " more</div>" : "");
  }
  $("search").addEventListener("input", showResults);
  $("search").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && results.length) { reveal(results[active]); }
    if (ev.key === "Escape") { $("results").hidden = true; }
    if (ev.key === "ArrowDown" || ev.key === "ArrowUp") {
      active = Math.max(0, Math.min(Math.min(results.length, 200) - 1, active + (ev.key === "ArrowDown" ? 1 : -1)));
      const items = $("results").querySelectorAll("div[data-node]");
      items.forEach((el, k) => el.classList.toggle("active", k === active));
      if (items[active]) reveal(results[active]);
      ev.preventDefault();
    }
  });
  $("results").addEventListener("click", (ev) => {
    const el = ev.target.closest("div[data-node]"); if (!el) return;
    reveal(+el.dataset.node); $("results").hidden = true;
  });

  // ---- pan, zoom, click ---------------------------------------------------------------------------
  let drag = null;
  canvas.addEventListener("mousedown", (ev) => { drag = { x: ev.clientX, y: ev.clientY, tx: tx, ty: ty, moved: false }; });
  window.addEventListener("mousemove", (ev) => {
    if (!drag) return;
    const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) { drag.moved = true; canvas.classList.add("dragging"); }
    if (drag.moved) { tx = drag.tx + dx; ty = drag.ty + dy; requestDraw(); }
  });
  window.addEventListener("mouseup", (ev) => {
    if (!drag) return;
    const wasDrag = drag.moved;
    drag = null; canvas.classList.remove("dragging");
    if (wasDrag || ev.target !== canvas) return;
    const r = canvas.getBoundingClientRect();
    const h = hit(ev.clientX - r.left, ev.clientY - r.top);
    $("results").hidden = true;
    if (!h) { select(-1); return; }
    const n = N[h.id];
    if (n.block !== undefined && (!expanded.has(h.id) || h.header)) toggle(h.id);
    select(h.id);
  });
  canvas.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const r = canvas.getBoundingClientRect();
    const px = ev.clientX - r.left, py = ev.clientY - r.top;
    const f = Math.exp(-ev.deltaY * (ev.deltaMode === 1 ? 0.05 : 0.0015));
    const ns = Math.min(8, Math.max(0.005, scale * f));
    tx = px - (px - tx) * ns / scale; ty = py - (py - ty) * ns / scale; scale = ns;
    requestDraw();
  }, { passive: false });
  window.addEventListener("resize", resize);

  // ---- toolbar, legend, stats ---------------------------------------------------------------------
  function legend() {
    const item = (c, label) => '<div><i style="background:' + c[0] + ";border-color:" + c[1] + '"></i>' + esc(label) + "</div>";
    let h = "";
    const parts = new Set(N.map((n) => n.part));
    if (mode === "part") {
      for (const k in PART) if (parts.has(k)) h += item(PART[k], PART[k][2]);
    } else if (mode === "memory") {
      h += item([bufColour(0), "#555"], "one colour per workspace buffer");
      h += "<div class=muted>same colour: the buffer is reused</div>";
    } else {
      h += item(["rgb(255,55,35)", "#7a1f1f"], "slowest kernel") + item(["rgb(255,245,235)", "#7a1f1f"], "fastest");
      if (!info.timed) h += "<div class=muted>no timings in this export</div>";
    }
    for (const k in KIND) if (N.some((n) => n.kind === k)) h += item(KIND[k], KIND[k][2]);
    if (N.some((n) => n.block !== undefined)) h += "<div>\u25b8 fused kernel / scan body (click to expand)</div>";
    if (E.some((e) => e[3] === 1)) h += '<div><span style="color:#b02a37">- - \u2192</span> parameter update</div>';
    if (N.some((n) => n.fb)) h += '<div><i style="border:2px solid ' + FALLBACK + '"></i>host fallback</div>';
    $("legend").innerHTML = h;
  }
  function stats() {
    const s = [info.ops + " ops"];
    if (info.kind === "function") s.push(info.kernels + " kernels on " + esc(info.backend));
    if (info.updates) s.push(info.updates + " parameter updates");
    const short = (e) => esc(e.length > 28 ? e.slice(0, 27) + "\u2026" : e);
    if (info.memory) s.push('<span title="peak ' + esc(info.memory.peak) + " bytes; naive " + esc(info.memory.naive) + ' bytes">memory plan: peak ' + short(info.memory.peak) + " B (naive " + short(info.memory.naive) + " B), " + info.memory.buffers + " buffers for " + info.memory.tensors + " tensors</span>");
    if (info.fallback_ops && info.fallback_ops.length) s.push('<span class="bad">host fallback: ' + esc(info.fallback_ops.join(", ")) + "</span>");
    $("stats").innerHTML = s.join(" \u00b7 ");
    $("title").textContent = info.title;
  }
  $("mode").addEventListener("change", () => { mode = $("mode").value; legend(); requestDraw(); });
  $("fit").addEventListener("click", () => fit(true));
  $("expand-all").addEventListener("click", () => { N.forEach((n, i) => { if (n.block !== undefined) expanded.add(i); }); relayout(); fit(true); });
  $("collapse-all").addEventListener("click", () => { expanded.clear(); relayout(); fit(true); });
  if (!info.timed) $("mode").querySelector('option[value="time"]').textContent = "kernel time (none recorded)";
  if (!N.some((n) => n.buf)) $("mode").querySelector('option[value="memory"]').textContent = "memory plan (compiled functions only)";

  // ---- start, and the handle the tests drive ------------------------------------------------------
  relayout();
  resize();
  legend(); stats();
  fit(false);
  draw();
  window.graphcViewer = {
    data: data, search: search, reveal: reveal, select: select, fit: fit,
    expand: (i) => toggle(i, true), collapse: (i) => toggle(i, false),
    isExpanded: (i) => expanded.has(i),
    visibleIds: () => visible.slice(),
    screenPos: (i) => { const n = N[i]; const r = canvas.getBoundingClientRect(); return { x: r.left + tx + n.ax * scale, y: r.top + ty + (n.ay + Math.min(n._h, HEADER) / 2) * scale }; },
    box: (i) => { const n = N[i]; const r = canvas.getBoundingClientRect(); return { x: r.left + tx + (n.ax - n._w / 2) * scale, y: r.top + ty + n.ay * scale, w: n._w * scale, h: n._h * scale }; },
    centerOn: (i, s) => { if (s) scale = s; centerOn(i); draw(); },
    setMode: (m) => { mode = m; $("mode").value = m; legend(); draw(); },
    setView: (s, x, y) => { scale = s; tx = x; ty = y; draw(); },
    redraw: () => { draw(); return lastRenderMs; },
    get lastRenderMs() { return lastRenderMs; },
    get scale() { return scale; },
  };
  document.body.dataset.ready = "1";
})();
