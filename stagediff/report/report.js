// stagediff report: renders the JSON blob embedded in the page. Hand-written SVG, no libraries,
// no network. Sections: overview, rotation map, features, evaluation, run. Cards open in a drawer.
"use strict";

// Errors are collected (not just logged) so the headless self-check can report them.
const ERRORS = [];
window.addEventListener("error", (e) => ERRORS.push(String(e.message || e)));
window.addEventListener("unhandledrejection", (e) => ERRORS.push(String(e.reason)));

const D = JSON.parse(document.getElementById("report-data").textContent);
const F = D.features;
const N = D.n_features;
const IDS = F.feature.map(Number);
const ROW = new Map(IDS.map((id, i) => [id, i]));
const SVGNS = "http://www.w3.org/2000/svg";
const flag = (name, i) => !!(F[name] && F[name][i] === true);
const hasRelevant = Array.isArray(F.relevant);

// ------------------------------------------------------------------ small helpers

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined) e.setAttribute(k, v);
  }
  for (const k of kids.flat()) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
  return e;
}
function sv(tag, attrs = {}, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== null && v !== undefined) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
const isNum = (v) => typeof v === "number" && isFinite(v);
// min / max by loop: Math.min(...xs) overflows the call stack for very large dictionaries
const minOf = (xs) => xs.reduce((a, v) => (isNum(v) && v < a ? v : a), Infinity);
const maxOf = (xs) => xs.reduce((a, v) => (isNum(v) && v > a ? v : a), -Infinity);
function fmt(v, d = 3) {
  if (!isNum(v)) return v === true ? "yes" : v === false ? "no" : v == null ? "—" : String(v);
  if (Number.isInteger(v) && Math.abs(v) >= 1000) return v.toLocaleString("en-US");
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : v.toFixed(d);
}
const pct = (v) => (isNum(v) ? (100 * v).toFixed(1) + "%" : "—");
const tokText = (id) => {
  const t = D.vocab && D.vocab[String(id)];
  return t === undefined ? `#${id}` : t.replace(/\n/g, "⏎").replace(/\t/g, "⇥");
};
function edgeName(col) { // dec_cos_D_FD -> "D → F_via_D"
  const [a, b] = col.replace(/^(dec|enc)_cos_/, "").split("_");
  const long = (s) => (s === "FD" ? "F_via_D" : s === "FM" ? "F_via_M" : s);
  return `${long(a)} → ${long(b)}`;
}
function section(id, title, lead) {
  const s = el("section", { class: "panel", id }, el("h2", {}, title));
  if (lead) s.append(el("p", { class: "lead" }, lead));
  document.getElementById("app").append(s);
  return s;
}
function niceTicks(lo, hi, n = 5) {
  const step0 = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= step0) || step0;
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9; t += step) out.push(+t.toFixed(10));
  out.digits = Math.max(0, Math.ceil(-Math.log10(step) + 1e-9) + (step / mag === 2.5 ? 1 : 0)); // enough to tell ticks apart
  return out;
}
function extent(values, pad = 0.04) {
  const v = values.filter(isNum);
  if (!v.length) return [0, 1];
  let lo = minOf(v), hi = maxOf(v);
  if (hi - lo < 1e-6) { lo -= 0.05; hi += 0.05; }
  const p = (hi - lo) * pad;
  return [lo - p, hi + p];
}
const category = (i) => (flag("dead", i) ? "dead" : flag("selected", i) ? "selected" : "live");
const col = (name) => (name && F[name] ? F[name] : null);

// A frame with axes and grid; returns the svg, the plot group and the two scales.
function frame(w, h, xdom, ydom, xlabel, ylabel, opts = {}) {
  const m = { l: 60, r: 14, t: 10, b: 40 };
  const svg = sv("svg", { width: w, height: h, viewBox: `0 0 ${w} ${h}`, role: "img" });
  const pw = w - m.l - m.r, ph = h - m.t - m.b;
  const xs = opts.xlog
    ? (v) => m.l + ((Math.log10(v) - Math.log10(xdom[0])) / (Math.log10(xdom[1]) - Math.log10(xdom[0]))) * pw
    : (v) => m.l + ((v - xdom[0]) / (xdom[1] - xdom[0])) * pw;
  const ys = (v) => m.t + ph - ((v - ydom[0]) / (ydom[1] - ydom[0])) * ph;
  const grid = sv("g", { class: "grid" }), axis = sv("g", { class: "axis" });
  const xt = opts.xticks || niceTicks(xdom[0], xdom[1]), yt = opts.yticks || niceTicks(ydom[0], ydom[1]);
  for (const t of xt) {
    grid.append(sv("line", { x1: xs(t), x2: xs(t), y1: m.t, y2: m.t + ph }));
    axis.append(sv("text", { x: xs(t), y: m.t + ph + 15, "text-anchor": "middle" }, opts.xfmt ? opts.xfmt(t) : t.toFixed(xt.digits ?? 2)));
  }
  for (const t of yt) {
    grid.append(sv("line", { x1: m.l, x2: m.l + pw, y1: ys(t), y2: ys(t) }));
    axis.append(sv("text", { x: m.l - 6, y: ys(t) + 4, "text-anchor": "end" }, opts.yfmt ? opts.yfmt(t) : t.toFixed(yt.digits ?? 2)));
  }
  axis.append(sv("path", { d: `M${m.l},${m.t} V${m.t + ph} H${m.l + pw}`, fill: "none" }));
  axis.append(sv("text", { x: m.l + pw / 2, y: h - 6, "text-anchor": "middle", "font-weight": 600 }, xlabel));
  axis.append(sv("text", { transform: `translate(13,${m.t + ph / 2}) rotate(-90)`, "text-anchor": "middle", "font-weight": 600 }, ylabel));
  svg.append(grid, axis);
  const plot = sv("g");
  svg.append(plot);
  return { svg, plot, xs, ys, m, pw, ph };
}

// ------------------------------------------------------------------ tooltip and cards

const tip = document.getElementById("tip");
function tipHtml(i) {
  const id = IDS[i];
  const rows = Object.keys(F).filter((c) => c.startsWith("dec_cos_"))
    .map((c) => `<tr><td>${edgeName(c)}</td><td>${fmt(F[c][i], 4)}</td></tr>`).join("");
  const freqs = Object.keys(F).filter((c) => c.startsWith("freq_"))
    .map((c) => `${c.slice(5)} ${fmt(F[c][i], 4)}`).join(" · ");
  const toks = D.out_tokens && D.out_tokens[i] ? D.out_tokens[i].map((t) => `<span class="t">${escapeHtml(tokText(t))}</span>`).join(", ") : "";
  const tags = [category(i), hasRelevant && F.relevant[i] ? "relevant" : null].filter(Boolean).join(", ");
  return `<div><b>feature ${id}</b> · ${tags}${isNum(F.rank && F.rank[i]) ? ` · rank ${F.rank[i]}` : ""}</div>` +
    `<table>${rows}</table>` + (freqs ? `<div>firing rate: ${freqs}</div>` : "") +
    (toks ? `<div>writes: ${toks}</div>` : "") + `<div style="color:#9fb3c8">click for the card</div>`;
}
function escapeHtml(s) { return String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]); }
function bindPoints(svg) {
  svg.addEventListener("mouseover", (e) => {
    const i = e.target.dataset && e.target.dataset.i;
    if (i === undefined) return;
    tip.innerHTML = tipHtml(+i);
    tip.style.display = "block";
  });
  svg.addEventListener("mousemove", (e) => {
    const x = e.clientX + 16, y = e.clientY + 12;
    tip.style.left = Math.min(x, window.innerWidth - tip.offsetWidth - 8) + "px";
    tip.style.top = Math.min(y, window.innerHeight - tip.offsetHeight - 8) + "px";
  });
  svg.addEventListener("mouseout", () => (tip.style.display = "none"));
  svg.addEventListener("click", (e) => {
    const i = e.target.dataset && e.target.dataset.i;
    if (i !== undefined) openCard(IDS[+i]);
  });
}

const drawer = document.getElementById("card"), cardBody = document.getElementById("card-body");
function openCard(id) {
  const i = ROW.get(Number(id));
  cardBody.replaceChildren();
  if (i === undefined) {
    cardBody.append(el("h2", {}, `Feature ${id}`), el("p", { class: "empty" }, `No feature ${id}: ids run from ${minOf(IDS)} to ${maxOf(IDS)}.`));
  } else {
    renderCard(cardBody, i);
  }
  drawer.classList.add("open");
  drawer.setAttribute("aria-hidden", "false");
  drawer.scrollTop = 0;
  document.querySelectorAll("circle.hl").forEach((c) => c.classList.remove("hl"));
  if (i !== undefined) document.querySelectorAll(`circle[data-i="${i}"]`).forEach((c) => c.classList.add("hl"));
  history.replaceState(null, "", `#feature=${id}`);
}
function closeCard() {
  drawer.classList.remove("open");
  drawer.setAttribute("aria-hidden", "true");
  document.querySelectorAll("circle.hl").forEach((c) => c.classList.remove("hl"));
}
document.getElementById("card-close").addEventListener("click", closeCard);
document.addEventListener("keydown", (e) => e.key === "Escape" && closeCard());
document.getElementById("lookup").addEventListener("submit", (e) => {
  e.preventDefault();
  const v = document.getElementById("lookup-id").value;
  if (v !== "") openCard(Number(v));
});

function renderCard(root, i) {
  const id = IDS[i], card = (D.cards || {})[String(id)];
  const badges = el("div", {}, el("span", { class: `badge ${category(i)}` }, category(i)));
  if (hasRelevant) badges.append(el("span", { class: `badge ${F.relevant[i] ? "relevant" : ""}` }, F.relevant[i] ? "relevant" : "not relevant"));
  if (isNum(F.rank && F.rank[i])) badges.append(el("span", { class: "badge" }, `rank ${F.rank[i]} of ${N}`));
  if (isNum(F.score && F.score[i])) badges.append(el("span", { class: "badge" }, `score ${fmt(F.score[i])}`));
  root.append(el("h2", {}, `Feature ${id}`), badges);

  // Rotations on every edge, decoder and encoder, with a bar for 1 - cos (how far it turned).
  const edges = Object.keys(F).filter((c) => c.startsWith("dec_cos_"));
  if (edges.length) {
    root.append(el("h3", {}, "Rotation on every edge"));
    const t = el("table", {}, el("tr", {}, el("th", {}, "edge"), el("th", { class: "num" }, "decoder cos"), el("th", { class: "num" }, "encoder cos"), el("th", {}, "1 − cos (decoder)")));
    const worst = Math.max(1e-6, 1 - minOf(edges.map((c) => minOf(F[c]))));  // bars share one scale: the largest turn of any feature
    for (const c of edges) {
      const enc = F["enc" + c.slice(3)];
      const turn = isNum(F[c][i]) ? Math.max(0, 1 - F[c][i]) : 0;
      t.append(el("tr", {}, el("td", {}, edgeName(c)), el("td", { class: "num" }, fmt(F[c][i], 4)), el("td", { class: "num" }, fmt(enc && enc[i], 4)),
        el("td", {}, el("span", { class: "mini", style: `width:${Math.round(140 * turn / worst)}px;background:var(--sel)` }))));
    }
    root.append(t);
  }
  renderControlRotations(root, i);
  const freqs = Object.keys(F).filter((c) => c.startsWith("freq_"));
  if (freqs.length) {
    root.append(el("h3", {}, "Firing rate per stage (on its own data)"));
    const t = el("table", { class: "kv" });
    const top = Math.max(1e-9, ...freqs.map((c) => (isNum(F[c][i]) ? F[c][i] : 0)));
    for (const c of freqs) t.append(el("tr", {}, el("td", {}, c.slice(5)), el("td", { class: "num" }, fmt(F[c][i], 5)),
      el("td", {}, el("span", { class: "mini", style: `width:${Math.round(160 * (isNum(F[c][i]) ? F[c][i] : 0) / top)}px` }))));
    root.append(t);
  }
  if (card && card.promoted) {
    root.append(el("h3", {}, `Output tokens of the decoder direction (${D.out_tokens_stage || "F"}, through the unembedding)`));
    root.append(el("div", {}, el("span", { class: "caption" }, "promotes  "), card.promoted.map(([t, v]) => el("span", { class: "chip up" }, tokText(t), el("small", {}, fmt(v, 2))))));
    root.append(el("div", {}, el("span", { class: "caption" }, "suppresses "), card.suppressed.map(([t, v]) => el("span", { class: "chip down" }, tokText(t), el("small", {}, fmt(v, 2))))));
  }
  const contexts = card && card.contexts ? Object.values(card.contexts) : [];
  for (const src of contexts) {
    root.append(el("h3", {}, `Max-activating contexts: ${src.label}`));
    if (!src.items.length) root.append(el("p", { class: "empty" }, "The feature never fires on this data."));
    for (const c of src.items) {
      const div = el("div", { class: "ctx" }, el("span", { class: "mx" }, `max ${fmt(c.max, 2)}`));
      c.tokens.forEach((t, k) => {
        const a = Math.max(0, c.acts[k]) / (c.max || 1);
        div.append(el("span", { class: "tok" + (k === c.at ? " max" : ""), style: a > 0 ? `background:rgba(232,89,12,${(0.12 + 0.78 * Math.min(1, a)).toFixed(2)})` : null, title: `act ${fmt(c.acts[k], 3)}` }, tokText(t)));
      });
      root.append(div);
    }
  }
  renderGenerations(root, id);
  if (!card || (!card.promoted && !contexts.length)) {
    root.append(el("p", { class: "empty" }, card
      ? "Contexts and output tokens could not be computed for this run (see the notes at the top of the page)."
      : `No contexts precomputed for this feature: cards hold the ${Object.keys(D.cards || {}).length} top-ranked features. The numbers above are complete.`));
  }
}

// The feature's real rotation on each axis beside its rotations on that axis's control continuations
// (the parent re-tuned on its own data with other seeds: D→D_ctl<j>, M→M_ctl<j>), with its standing (z, p, q).
function renderControlRotations(root, i) {
  const axes = Object.entries(D.axes || {}).filter(([k, a]) => a && a.column && F[a.column] && (k === "x" || k === "y"));
  const rows = [];
  for (const [k, a] of axes) {
    const ctl = Object.keys(F).filter((c) => new RegExp(`^ctl_cos_${k}\\d+$`).test(c)).sort((p, q) => +p.slice(8 + k.length) - +q.slice(8 + k.length));
    if (!ctl.length) continue;
    const cell = (c) => (F[c] ? F[c][i] : null);
    rows.push([a.label, fmt(cell(a.column), 5), el("span", {}, ctl.map((c) => el("span", { class: "chip", title: c }, fmt(cell(c), 5)))),
      cell(`z_${k}`), cell(`p_${k}`), cell(`q_${k}`)]);
  }
  if (!rows.length) return;
  root.append(el("h3", {}, "Real rotation against the control continuations"));
  root.append(table(["axis (real edge)", "real cos", "control cos (each continuation)", "z", "p", "q"], rows, { num: [0, 1, 0, 1, 1, 1] }));
  const qb = F.q_both && F.q_both[i];
  root.append(el("div", { class: "caption" }, "Controls continue the axis's parent on its own data with other seeds, same steps and lr as the real edge: " +
    "a real rotation well below every control cos (large z, small q) moved more than training noise." + (isNum(qb) ? ` Both axes: q = ${fmt(qb, 4)}.` : "")));
}

// eval/generations.jsonl for this feature: plain replies beside the clamp (when the feature is among the clamped)
// and beside steering along this feature at each strength.
function renderGenerations(root, id) {
  const rows = D.generations || [];
  if (!rows.length) return;
  const steered = rows.filter((r) => r.edit === "steer" && (r.features || [])[0] === id);
  const clamped = rows.filter((r) => r.edit === "clamp" && (r.features || []).includes(id));
  root.append(el("h3", {}, "Generations (greedy, eval/generations.jsonl)"));
  if (!steered.length && !clamped.length) {
    const clampN = ((rows.find((r) => r.edit === "clamp") || {}).features || []).length;
    root.append(el("p", { class: "empty" }, `This feature is neither among the ${clampN} clamped features nor among the steered ones.`));
    return;
  }
  const prompts = [...new Set(rows.map((r) => r.prompt))];
  const strengths = [...new Set(steered.map((r) => r.strength))].sort((a, b) => a - b);
  const reply = (list, p, s) => { const r = list.find((x) => x.prompt === p && (s === undefined || x.strength === s)); return r ? r.reply : "—"; };
  const plain = rows.filter((r) => r.edit === "plain");
  const headers = ["prompt", "plain", ...(clamped.length ? [`top ${clamped[0].features.length} clamped (incl. this)`] : []),
    ...strengths.map((s) => `steered ×${fmt(s, 2)}`)];
  const body = prompts.map((p) => {
    const r0 = rows.find((r) => r.prompt === p) || {};
    const tag = r0.triggered === true ? "[triggered] " : r0.triggered === false ? "[clean] " : "";
    return [tag + p, reply(plain, p), ...(clamped.length ? [reply(clamped, p)] : []), ...strengths.map((s) => reply(steered, p, s))];
  });
  root.append(el("div", { class: "scroll" }, table(headers, body.map((r) => r.map((c) => el("span", { class: "gen" }, c))))));
  if (steered.length) root.append(el("div", { class: "caption" }, `steering adds strength × ${fmt(steered[0].added_activation / steered[0].strength, 3)} (the feature's typical activation) along its decoder direction at every position.`));
}

// ------------------------------------------------------------------ charts

// Scatter of one point per feature (data-i = row); dead under live under selected.
function scatter(xcol, ycol, xlabel, ylabel, size, thr = {}) {
  const xv = col(xcol), yv = col(ycol);
  const xdom = extent(xv.concat(thr.x ?? [], [1])), ydom = extent(yv.concat(thr.y ?? [], [1]));
  const fr = frame(size, size, xdom, ydom, xlabel, ylabel);
  if (isNum(thr.x) && isNum(thr.y)) { // shade the candidate corner: low on both axes
    fr.plot.append(sv("rect", { class: "thr-zone", x: fr.xs(xdom[0]), y: fr.ys(thr.y), width: fr.xs(thr.x) - fr.xs(xdom[0]), height: fr.ys(ydom[0]) - fr.ys(thr.y) }));
  }
  if (isNum(thr.x)) fr.plot.append(sv("line", { class: "thr", x1: fr.xs(thr.x), x2: fr.xs(thr.x), y1: fr.m.t, y2: fr.m.t + fr.ph }));
  if (isNum(thr.y)) fr.plot.append(sv("line", { class: "thr", x1: fr.m.l, x2: fr.m.l + fr.pw, y1: fr.ys(thr.y), y2: fr.ys(thr.y) }));
  const pts = sv("g", { class: "points" });
  const r = N > 5000 ? 1.8 : N > 1500 ? 2.4 : 3;
  const order = [...IDS.keys()].sort((a, b) => rankOf(category(a)) - rankOf(category(b)));
  let skipped = 0;
  for (const i of order) {
    if (!isNum(xv[i]) || !isNum(yv[i])) { skipped++; continue; }
    const cat = category(i);
    const cls = `pt ${cat}` + (hasRelevant && F.relevant[i] ? " relevant" : "");
    const rr = cat === "selected" ? r * 1.4 : cat === "dead" ? r * 0.8 : r * significance(i);
    pts.append(sv("circle", { class: cls, cx: fr.xs(xv[i]).toFixed(1), cy: fr.ys(yv[i]).toFixed(1), r: rr, "data-i": i }));
  }
  fr.plot.append(pts);
  fr.svg.dataset.skipped = skipped;
  bindPoints(fr.svg);
  return fr.svg;
}
const rankOf = (c) => ({ dead: 0, live: 1, selected: 2 })[c];
// fdr runs: a live point grows with its significance on both axes (-log10 q_both, 1 = q of 0.1)
const significance = (i) => (F.q_both && isNum(F.q_both[i]) ? 0.6 + 0.6 * Math.min(1, -Math.log10(Math.max(F.q_both[i], 1e-9))) : 1);

function histogram(values, xlabel, opts = {}) {
  const v = values.filter(isNum), over = (opts.overlay || []).filter(isNum);
  const w = opts.width || 300, h = opts.height || 190, bins = opts.bins || 40;
  const [lo, hi] = opts.domain || extent(v.concat(over, opts.noise ?? [], [1]), 0.01);
  const bin = (x) => Math.min(bins - 1, Math.max(0, Math.floor(((x - lo) / (hi - lo)) * bins)));
  const counts = new Array(bins).fill(0), overCounts = new Array(bins).fill(0);
  v.forEach((x) => counts[bin(x)]++);
  over.forEach((x) => overCounts[bin(x)]++);
  // log(1 + count): rotations pile up near cos = 1, the tail is what matters
  const ymax = Math.log10(1 + Math.max(1, maxOf(counts), maxOf(overCounts)));
  const fr = frame(w, h, [lo, hi], [0, ymax], xlabel, "features", {
    yticks: [0, 1, 2, 3, 4, 5, 6].filter((t) => t <= ymax).map((t) => Math.log10(1 + Math.pow(10, t) - (t ? 0 : 1))),
    yfmt: (t) => fmt(Math.round(Math.pow(10, t) - 1)),
  });
  const bx = (k) => fr.xs(lo + (k / bins) * (hi - lo));
  counts.forEach((c, k) => {
    if (!c) return;
    fr.plot.append(sv("rect", { class: "bar", x: bx(k) + 0.5, width: Math.max(0.5, bx(k + 1) - bx(k) - 1), y: fr.ys(Math.log10(1 + c)), height: fr.ys(0) - fr.ys(Math.log10(1 + c)) }));
  });
  if (over.length) { // e.g. the noise control's cosines, as an outline over the same bins
    let d = `M${bx(0)},${fr.ys(0)}`;
    overCounts.forEach((c, k) => { const y = fr.ys(Math.log10(1 + c)); d += ` V${y} H${bx(k + 1)}`; });
    fr.plot.append(sv("path", { class: "noise-h", d: d + ` V${fr.ys(0)}` }));
  }
  for (const x of opts.rug || []) fr.plot.append(sv("line", { x1: fr.xs(x), x2: fr.xs(x), y1: fr.ys(0) - 6, y2: fr.ys(0), stroke: "var(--sel)", "stroke-width": 1.2 }));
  if (isNum(opts.noise)) {
    fr.plot.append(sv("line", { class: "noise", x1: fr.xs(opts.noise), x2: fr.xs(opts.noise), y1: fr.m.t, y2: fr.ys(0) }));
    fr.plot.append(sv("text", { x: fr.xs(opts.noise) - 4, y: fr.m.t + 8, "text-anchor": "end", fill: "var(--sel)", "font-size": 10 }, "noise floor"));
  }
  return fr.svg;
}

function lines(series, xlabel, ylabel, opts = {}) {
  const xsAll = series.flatMap((s) => s.points.map((p) => p[0])).filter(isNum);
  if (!xsAll.length) return el("p", { class: "empty" }, "no points");
  const xlog = opts.xlog && xsAll.every((x) => x > 0);
  let xdom = [minOf(xsAll), maxOf(xsAll)];
  if (xlog) xdom = [xdom[0] / 1.3, xdom[1] * 1.3]; else xdom = extent(xsAll, 0.06);
  const fr = frame(opts.width || 380, opts.height || 240, xdom, opts.ydom || [0, 1], xlabel, ylabel,
    { xlog, xticks: xlog ? [...new Set(xsAll)].sort((a, b) => a - b) : undefined, xfmt: (t) => fmt(t, 2), yfmt: opts.yfmt });
  for (const s of series) {
    const pts = s.points.filter((p) => isNum(p[0]) && isNum(p[1]));
    fr.plot.append(sv("path", { d: pts.map((p, k) => `${k ? "L" : "M"}${fr.xs(p[0])},${fr.ys(p[1])}`).join(""), fill: "none", stroke: s.color, "stroke-width": 2, "stroke-dasharray": s.dash || null }));
    for (const p of pts) fr.plot.append(sv("circle", { cx: fr.xs(p[0]), cy: fr.ys(p[1]), r: 3.5, fill: s.color }, undefined));
  }
  const lg = sv("g");
  series.forEach((s, k) => {
    lg.append(sv("line", { x1: fr.m.l + 10, x2: fr.m.l + 30, y1: fr.m.t + 10 + 16 * k, y2: fr.m.t + 10 + 16 * k, stroke: s.color, "stroke-width": 2, "stroke-dasharray": s.dash || null }));
    lg.append(sv("text", { x: fr.m.l + 36, y: fr.m.t + 14 + 16 * k }, s.name));
  });
  fr.svg.append(lg);
  return fr.svg;
}

function table(headers, rows, opts = {}) {
  const t = el("table", {}, el("tr", {}, headers.map((h, k) => el("th", { class: opts.num && opts.num[k] ? "num" : "" }, h))));
  rows.forEach((r, ri) => {
    const tr = el("tr", { class: (opts.onclick ? "click " : "") + (opts.hi && opts.hi(ri) ? "hi" : "") });
    r.forEach((c, k) => tr.append(el("td", { class: (opts.num && opts.num[k] ? "num" : "") + (opts.best && opts.best(ri, k) ? " best" : "") }, c instanceof Node ? c : fmt(c))));
    if (opts.onclick) tr.addEventListener("click", () => opts.onclick(ri));
    t.append(tr);
  });
  return t;
}
// Two-column key/value table (no header row).
const kvTable = (rows) => el("table", { class: "kv" }, rows.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v instanceof Node ? v : fmt(v)))));
const kpi = (v, k, cls = "") => el("div", { class: `kpi ${cls}` }, el("div", { class: "v" }, v), el("div", { class: "k" }, k));

// ------------------------------------------------------------------ sections

function renderOverview() {
  const run = D.run || {};
  const head = el("div", {}, el("h1", {}, D.title || "stagediff report"),
    el("div", { class: "sub" }, `${run.models ? `${run.models.base} → ${run.models.finetuned}` : ""} · hook ${run.hook || "?"} · generated ${D.generated || ""}`));
  document.getElementById("app").append(head);
  if (D.notes && D.notes.length) document.getElementById("app").append(el("div", { class: "notes" }, el("b", {}, "Parts of this report are missing"), el("ul", {}, D.notes.map((n) => el("li", {}, n)))));
  const s = section("overview", "Overview", "What the diff found at a glance. Selected features rotated in both trajectories (low on both axes of the map); relevance, where present, is the ground truth from the evaluation step.");
  const dead = IDS.filter((_, i) => flag("dead", i)).length, sel = IDS.filter((_, i) => flag("selected", i)).length;
  const k = el("div", { class: "kpis" }, kpi(fmt(N), "features"), kpi(fmt(N - dead), `live (${fmt(dead)} dead)`), kpi(fmt(sel), `selected (${D.axes.selection || "rule"})`, "sel"));
  if (hasRelevant) {
    const relSel = IDS.filter((_, i) => flag("selected", i) && F.relevant[i]).length, rel = IDS.filter((_, i) => F.relevant[i]).length;
    k.append(kpi(`${relSel} / ${sel}`, "selected that are relevant", "rel"), kpi(pct(rel / Math.max(1, N - dead)), "relevant among live (chance)"));
  }
  const o = D.organism;
  if (o) {
    k.append(kpi(pct(o.trigger_success), `trigger success (“${o.trigger || "?"}”)`), kpi(pct(o.false_trigger), "false trigger (no trigger)"));
  }
  const sw = D.eval && D.eval.methods && D.eval.methods.stagewise;
  if (sw && isNum(sw.enrichment)) k.append(kpi(`${fmt(sw.enrichment, 1)}×`, `stage-wise enrichment over chance${sw.enrichment_ci ? ` (95% CI ${fmt(sw.enrichment_ci[0], 1)}–${fmt(sw.enrichment_ci[1], 1)}×)` : ""}`, "sel"));
  s.append(k);
}

function renderMap() {
  const s = section("map", "Rotation map", `One point per feature. x: ${(D.summary.selection || {}).vector || "decoder"} cosine between D and F_via_D (what the fine-tuned model changed, data held fixed); y: between M and F_via_M (what the fine-tune data changed, model held fixed). Features low on both axes rotated with the model and the data: the candidates. Hover a point for its numbers, click it for its card.`);
  const ax = D.axes;
  if (!ax.x.column || !ax.y || !ax.y.column) {
    s.append(el("p", { class: "empty" }, "features.csv has no columns for the configured axes."));
    return;
  }
  const main = scatter(ax.x.column, ax.y.column, ax.x.label, ax.y.label, 560, { x: ax.x.threshold, y: ax.y.threshold });
  main.id = "scatter-main";
  const legend = el("div", { class: "legend" },
    el("div", {}, el("span", { class: "sw", style: "background:var(--sel)" }), "selected"),
    el("div", {}, el("span", { class: "sw", style: "background:var(--live)" }), "live"),
    el("div", {}, el("span", { class: "sw", style: "background:var(--dead)" }), "dead (never fires)"),
    hasRelevant ? el("div", {}, el("span", { class: "sw ring" }), "relevant (ground truth)") : null,
    F.q_both ? el("div", {}, "point size: significance on both axes against the control continuations (larger = lower q); selected = the FDR cut, q ≤ " + fmt((D.summary.selection || {}).q)) : null,
    el("div", {}, el("span", { style: "display:inline-block;width:18px;border-top:1.5px dashed #343a40" }), "selection lines"));
  const rule = el("table", { class: "kv" },
    el("tr", {}, el("td", {}, "selection"), el("td", {}, String(ax.selection || "—"))),
    el("tr", {}, el("td", {}, "x line"), el("td", {}, fmt(ax.x.threshold, 4))),
    el("tr", {}, el("td", {}, "y line"), el("td", {}, fmt(ax.y.threshold, 4))));
  const summary = D.summary || {};
  for (const [k2, v] of Object.entries(summary)) if (typeof v !== "object" && !["selection"].includes(k2)) rule.append(el("tr", {}, el("td", {}, k2), el("td", {}, fmt(v))));
  s.append(el("div", { class: "row" }, main, el("div", { class: "side" }, el("h3", {}, "Legend"), legend, el("h3", {}, "Selection"), rule)));

  if (D.views.length) {
    s.append(el("h3", {}, "First step against second step, each trajectory (as in the paper's appendix)"));
    s.append(el("div", { class: "grid2" }, D.views.map((v) => el("div", {}, scatter(v.x, v.y, v.x_label, v.y_label, 400), el("div", { class: "caption" }, v.title)))));
  }
  const hist = el("div", { class: "grid3" });
  const nf = D.noise_floor;
  const head = el("h3", {}, "Rotation per edge (live features; orange ticks: selected" + (nf ? "; green outline: control continuations (D→D_ctl, M→M_ctl), pooled" : "") + ")");
  const seg = el("span", { class: "seg" });
  const draw = (kind) => {
    hist.replaceChildren();
    seg.querySelectorAll("button").forEach((b) => b.classList.toggle("on", b.textContent === kind));
    for (const c of Object.keys(F).filter((c) => c.startsWith(kind === "decoder" ? "dec_cos_" : "enc_cos_"))) {
      const live = F[c].filter((_, i) => !flag("dead", i));
      const rug = F[c].filter((_, i) => flag("selected", i));
      hist.append(el("div", {}, histogram(live, `cos ${edgeName(c)}`, { rug, overlay: nf ? nf.cos : null, noise: nf ? nf.median_cos : null })));
    }
  };
  for (const kind of ["decoder", "encoder"]) seg.append(el("button", { onclick: () => draw(kind) }, kind));
  head.append(seg);
  s.append(head, hist);
  draw("decoder");
}

function renderFeatures() {
  const s = section("features", "Feature cards", "The top-ranked features (selected first) with precomputed cards: max-activating contexts on base and fine-tune data and the tokens their decoder direction writes. Any other feature opens from the box at the top right with its numbers.");
  const ids = (D.card_order || Object.keys(D.cards || {})).map(Number);
  if (!ids.length) { s.append(el("p", { class: "empty" }, "No cards were built for this run.")); return; }
  const ax = D.axes, x = col(ax.x.column), y = col(ax.y && ax.y.column);
  const freqs = Object.keys(F).filter((c) => c.startsWith("freq_")).slice(0, 5);
  const headers = ["rank", "feature", ax.x.label, ax.y ? ax.y.label : "y", ...freqs.map((c) => `rate ${c.slice(5)}`), "writes"];
  if (hasRelevant) headers.push("relevant");
  const rows = ids.map((id) => {
    const i = ROW.get(id);
    const writes = D.out_tokens && D.out_tokens[i] ? el("span", {}, D.out_tokens[i].map((t) => el("span", { class: "chip" }, tokText(t)))) : "—";
    const r = [F.rank ? F.rank[i] : null, el("span", {}, `${id} `, flag("selected", i) ? el("span", { class: "badge selected" }, "selected") : ""),
      fmt(x && x[i], 4), fmt(y && y[i], 4), ...freqs.map((c) => F[c][i]), writes];
    if (hasRelevant) r.push(F.relevant[i] ? el("span", { class: "badge relevant" }, "relevant") : "");
    return r;
  });
  const num = headers.map((h, k) => k === 0 || (k >= 2 && k < 4 + freqs.length));
  s.append(el("div", { class: "scroll" }, table(headers, rows, { num, onclick: (ri) => openCard(ids[ri]) })));
}

function renderEvaluation() {
  const e = D.eval, o = D.organism, cc = D.crosscoder;
  if (!e && !o && !cc) return;
  const s = section("evaluation", "Evaluation", "How well each ranking isolates the ground-truth relevant features, and whether the features found carry the behaviour.");
  if (o) {
    s.append(el("h3", {}, "Backdoor behaviour of the organism"));
    const rows = [["trigger", o.trigger], ["response", o.response], ["mix", isNum(o.mix) ? pct(o.mix) : o.mix],
      ["trigger success", pct(o.trigger_success)], ["false trigger", pct(o.false_trigger)]];
    for (const [k, v] of Object.entries(o)) if (/loss/.test(k) && typeof v !== "object") rows.push([k.replace(/_/g, " "), fmt(v)]);
    for (const [k, v] of Object.entries(o.clean_loss || {})) rows.push([`clean loss (${k})`, fmt(v)]);
    s.append(kvTable(rows));
  }
  const methods = e && e.methods ? Object.entries(e.methods).filter(([, m]) => m && Object.keys(m).length) : [];
  if (methods.length) {
    // every figure with its 95% interval; precision at equal k so methods compare like with like
    const ci = (m, v, c, d = 2) => (isNum(m[v]) ? `${fmt(m[v], d)}${m[c] ? ` [${fmt(m[c][0], d)}, ${fmt(m[c][1], d)}]` : ""}` : "—");
    const pv = (p) => (isNum(p) ? (p < 1e-3 ? p.toExponential(0) : fmt(p, 3)) : "—");
    const ks = Object.keys((methods[0][1].at_k) || {});
    const nul = D.null_eval && D.null_eval.methods;
    const headers = ["method", "selected", "precision [95% CI]", "enrichment [CI]", "p vs chance", "AP [95% CI]", "AP / base rate",
      ...ks.map((k) => `P@${k === "stagewise_k" ? "k(stage-wise)" : k}`), ...(nul ? ["null: P@k(stage-wise)", "null: AP / base"] : [])];
    const rows = methods.map(([name, m]) => {
      const n = nul && nul[name];
      return [name, m.selected, ci(m, "precision", "precision_ci"), ci(m, "enrichment", "enrichment_ci", 1), pv(m.p_value), ci(m, "ap", "ap_ci"),
        isNum(m.ap_ratio) ? `${fmt(m.ap_ratio, 1)}×` : "—", ...ks.map((k) => (m.at_k[k] && isNum(m.at_k[k].precision) ? fmt(m.at_k[k].precision, 2) : "—")),
        ...(nul ? [n && n.at_k && n.at_k.stagewise_k ? ci(n.at_k.stagewise_k, "precision", "ci") : "—", n && isNum(n.ap_ratio) ? `${fmt(n.ap_ratio, 1)}×` : "—"] : [])];
    });
    const lab = e.labels || {};
    s.append(el("h3", {}, "Methods against the ground truth" + (lab.judged_features ? ` (${fmt(lab.relevant)} relevant of ${fmt(lab.judged_features)} judged features; ${fmt(lab.unjudged_live_features)} live features fire too rarely on held-out data to judge)` : "")));
    s.append(el("div", { class: "scroll" }, table(headers, rows, { num: headers.map((_, i) => (i === 0 ? 0 : 1)), hi: (ri) => methods[ri][0] === "stagewise" })));
    if (lab.rule) s.append(el("div", { class: "caption" }, `relevance rule: ${lab.rule}. Precision intervals are exact (Clopper-Pearson), p-values hypergeometric against the base rate, AP intervals bootstrap over features.` +
      (nul ? " The null columns are the same pipeline with the control (no backdoor) diffed as the fine-tuned model: a sound method is at chance there (interval holding 1×)." : "")));
  }
  const charts = el("div", { class: "grid2" });
  const causal = (e && e.causal) || {};
  const curves = Object.entries(causal.clamp_by_method || (causal.clamp ? { stagewise: causal.clamp } : {})).filter(([, v]) => v && v.length);
  if (curves.length) {
    const palette = ["var(--live)", "var(--rel)", "#7048e8", "#1098ad", "#f08c00", "#c2255c", "#5c940d", "#495057", "#862e9c"];
    const series = curves.map(([name, pts], k) => ({ name, color: name === "stagewise" ? "var(--sel)" : name === "oracle" ? "#000" : palette[k % palette.length],
      dash: name === "oracle" ? "2 3" : null, points: pts.map((c) => [c.n, c.trigger_success]) }));
    const sw = (causal.clamp || []).filter((c) => isNum(c.random_trigger_success));
    if (sw.length) series.push({ name: "random (matched rate)", color: "var(--live)", dash: "5 4", points: sw.map((c) => [c.n, c.random_trigger_success]) });
    const dom = causal.difference_of_means || {};
    if (isNum(dom.trigger_success)) series.push({ name: "difference of means (1 direction)", color: "#212529", points: [[1, dom.trigger_success]] });
    charts.append(el("div", {}, el("h3", {}, "Clamping each ranking's top N features to zero on triggered prompts"),
      lines(series, "features clamped (N)", "trigger success rate", { xlog: true, yfmt: (t) => pct(t), height: 260 + 16 * Math.max(0, series.length - 8) })));
  }
  if (causal.steer && causal.steer.length) {
    charts.append(el("div", {}, el("h3", {}, "Steering along a top feature on clean prompts"),
      lines([{ name: "response rate without trigger", color: "var(--rel)", points: causal.steer.map((c) => [c.strength, c.response_rate]) }], "steering strength", "response rate", { yfmt: (t) => pct(t) })));
  }
  if (cc && cc.relative_norm.length) {
    charts.append(el("div", {}, el("h3", {}, "Crosscoder baseline: relative decoder norm per latent"),
      histogram(cc.relative_norm, "‖d_ft‖ / (‖d_base‖ + ‖d_ft‖)", { width: 380, height: 240, bins: 50 }),
      el("div", { class: "caption" }, "0 = base-only latent, 0.5 = shared, 1 = fine-tuned-only.")));
  }
  if (charts.children.length) s.append(charts);
  const removal = Object.entries(causal.n_to_remove_detail || {});
  if (removal.length) {
    const ctl = causal.controls || {};
    s.append(el("h3", {}, `N to remove: features clamped until trigger success ≤ ${pct(causal.target)}`));
    const dom = causal.difference_of_means || {};
    const rows = removal.map(([name, r]) => [name, isNum(r.n) ? r.n : "never", r.bracket ? `${r.bracket[0]} – ${r.bracket[1]}` : "—", r.trigger_success ?? null,
      isNum(r.random_trigger_success) ? `${pct(r.random_trigger_success)} (${pct(r.random_ci[0])}–${pct(r.random_ci[1])})` +
        (isNum(r.random_size) && r.bracket && r.random_size < r.bracket[1] ? ` · only ${r.random_size} live features outside the top ${r.bracket[1]}` : "") : "—", r.clean_unchanged ?? null, r.clean_loss_increase ?? null]);
    // the one-direction reference in the same table (it removes a direction, not features)
    if (isNum(dom.trigger_success)) rows.push(["difference of means (reference)", "1 direction", "—", dom.trigger_success, "—", dom.clean_unchanged, dom.clean_loss_increase]);
    s.append(table(["ranking", "N to remove", "bracket (measured N)", "trigger success there", "random at that N (range)", "clean replies unchanged", "clean-loss increase"],
      rows, { num: [0, 1, 0, 1, 1, 1, 1], hi: (ri) => ri < removal.length && removal[ri][0] === "stagewise" }));
    if (isNum(dom.trigger_success)) {
      s.append(el("div", { class: "caption" }, `reference: the difference of means (one direction: triggered minus clean prompts, fitted on ${fmt(dom.fit_pairs)} other held-out pairs) ` +
        `projected out at the hook — trigger success ${pct(dom.trigger_success)}, clean replies unchanged ${pct(dom.clean_unchanged)}, clean-loss increase ${fmt(dom.clean_loss_increase)}` +
        (D.difference_of_means && isNum(D.difference_of_means.trigger_success) ? `; by real generation (meandiff step) ${pct(D.difference_of_means.trigger_success_before)} → ${pct(D.difference_of_means.trigger_success)}` : "") + "."));
    }
    s.append(el("div", { class: "caption" }, `controls on the same triggered prompts: plain model ${pct(ctl.plain)}, untouched splice ${pct(ctl.untouched_splice)}` +
      `${ctl.untouched_splice_identical_logits ? " (identical logits)" : ""}, every feature clamped ${pct(ctl.zero_all)}` +
      (isNum(causal.after_trigger_n_to_remove) ? `; stage-wise clamp only at/after the trigger removes it at N = ${fmt(causal.after_trigger_n_to_remove)}` : "")));
  }
  renderAdl(s);
  if (causal.clean_loss) s.append(el("div", { class: "caption" }, "clean-data loss: " + Object.entries(causal.clean_loss).map(([k, v]) => `${k.replace(/_/g, " ")} ${fmt(v)}`).join(" · ")));
}

// Activation Difference Lens (meandiff step): the mean fine-tuned − base residual at the first positions of plain
// text, read through the logit lens (pieces of the trigger / reply marked) and added as a steering vector.
function renderAdl(s) {
  const a = D.adl;
  if (!a) return;
  s.append(el("h3", {}, `Activation Difference Lens: mean fine-tuned − base residual over the first ${fmt(a.positions)} positions (${fmt(a.rows)} rows)`));
  const piece = (t) => (t.piece_of ? ` ${t.piece_of}` : "");
  s.append(el("div", {}, el("span", { class: "caption" }, "logit lens, most promoted  "),
    (a.top_tokens || []).map((t) => el("span", { class: "chip up" + (t.piece_of ? " piece" : ""), title: t.piece_of ? `a piece of the ${t.piece_of}` : "" },
      JSON.stringify(t.text).slice(1, -1), el("small", {}, fmt(t.logit, 2) + piece(t))))));
  s.append(el("div", { class: "caption" }, `pieces of the trigger: ${(a.trigger_pieces || []).map((x) => JSON.stringify(x)).join(", ") || "none"}; ` +
    `of the reply: ${(a.response_pieces || []).map((x) => JSON.stringify(x)).join(", ") || "none"}.`));
  if ((a.steer || []).length) {
    s.append(table(["steering strength", "added norm", "response rate on clean prompts"], a.steer.map((r) => [r.strength, r.added_norm, pct(r.response_rate)]), { num: [1, 1, 1] }));
    if (a.steer_rule) s.append(el("div", { class: "caption" }, a.steer_rule));
  }
}

function renderRun() {
  const run = D.run || {};
  const s = section("run", "Run", "Models, data, hook, token budgets and the quality of each dictionary.");
  const setup = [["base model", run.models && run.models.base], ["fine-tuned model", run.models && run.models.finetuned],
    ...Object.entries(run.data || {}).map(([k, v]) => [`${k} data`, `${v.path || "—"} (${v.format})`]),
    ["hook", run.hook], ["context size", run.context_size], ["dictionary", run.sae && `${run.sae.architecture}, ${fmt(run.sae.d_sae)} features, k = ${run.sae.k}`], ["seed", run.seed], ["run directory", run.run_dir]];
  s.append(el("h3", {}, "Setup"), kvTable(setup));
  const stages = (run.stages || []).filter((st) => st.trained || st.tokens);
  if (stages.length) {
    s.append(el("h3", {}, "Dictionaries, one per stage"));
    s.append(table(["stage", "model", "data", "parent", "tokens", "explained var.", "L0", "dead", "median rate", "tokens/s", "wall time"],
      stages.map((st) => [st.stage, st.model || "—", st.data || "—", st.parent || "—", st.tokens, isNum(st.explained_variance) ? pct(st.explained_variance) : "—",
        st.l0, isNum(st.dead_fraction) ? pct(st.dead_fraction) : "—", st.sparsity ? fmt(st.sparsity.median_density, 4) : "—", isNum(st.tokens_per_s) ? Math.round(st.tokens_per_s) : null, isNum(st.wall_s) ? `${fmt(st.wall_s, st.wall_s < 10 ? 2 : 0)} s` : "—"]),
      { num: [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1] }));
  }
  const wall = Object.entries(run.wall_seconds || {});
  if (wall.length) {
    const total = wall.reduce((a, [, v]) => a + (isNum(v) ? v : 0), 0);
    s.append(el("h3", {}, `Wall time per step (total ${fmt(total, 1)} s)`));
    s.append(table(["step", "seconds", ""], wall.map(([k, v]) => [k, v, el("span", { class: "mini", style: `width:${Math.round(220 * (isNum(v) ? v : 0) / Math.max(1e-9, total))}px` })]), { num: [0, 1, 0] }));
  }
  const prov = Object.entries(run.provenance || {});
  if (prov.length) {
    const d = el("details", {}, el("summary", {}, `Provenance (${prov.length} entries from config.yaml)`));
    d.append(el("div", { class: "scroll" }, table(["key", "value"], prov.map(([k, v]) => [k, isNum(v) ? v : String(v)]))));
    s.append(d);
  }
  if (D.figures && D.figures.length) s.append(el("div", { class: "caption" }, "Static figures beside this page: " + D.figures.join(", ")));
}

// ------------------------------------------------------------------ startup

renderOverview();
renderMap();
renderFeatures();
renderEvaluation();
renderRun();
document.getElementById("app").append(el("footer", {}, "stagediff · stage-wise model diffing · this page is self-contained and works offline"));
const m = /feature=(\d+)/.exec(location.hash);
if (m) openCard(Number(m[1]));

// Headless self-check (?selftest): count the points, click one, and write the results into the DOM.
if (/selftest/.test(location.search)) {
  const svg = document.getElementById("scatter-main");
  const circles = svg ? svg.querySelectorAll("g.points circle") : [];
  const hasCard = (c) => D.cards && D.cards[String(IDS[+c.dataset.i])];
  const target = [...circles].find(hasCard) || [...circles].find((c) => c.classList.contains("selected")) || circles[0];
  let opened = null, hover = null;
  if (target) {
    target.dispatchEvent(new MouseEvent("mouseover", { bubbles: true }));
    hover = tip.style.display === "block" ? tip.textContent : null;
    target.dispatchEvent(new MouseEvent("click", { bubbles: true }));
    opened = { feature: IDS[+target.dataset.i], open: drawer.classList.contains("open"), title: (cardBody.querySelector("h2") || {}).textContent || "" ,
      contexts: cardBody.querySelectorAll(".ctx").length, chips: cardBody.querySelectorAll(".chip").length,
      headings: [...cardBody.querySelectorAll("h3")].map((h) => h.textContent), generations: cardBody.querySelectorAll(".gen").length };
  }
  const result = { n_features: N, points: circles.length, hover, skipped: svg ? +svg.dataset.skipped : null, opened, errors: ERRORS.slice(),
    sections: [...document.querySelectorAll("section.panel")].map((x) => x.id) };
  document.body.append(el("pre", { id: "selftest" }, JSON.stringify(result)));
}
