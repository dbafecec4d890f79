// Search page: POST /api/search, then a grid of the top-k gallery images (served by id from /img/{id}).
// Clicking a hit explains it (POST /api/explain): the query's words coloured by the prototype part that attends
// to them, the crop with its foreground map and its strongest part's attention, the parts ranked by their share.
// Video indexes: each hit also says video and time; clicking it shows its frame (/frame/{id}) with the box.
const form = document.getElementById("search-form");
const statusLine = document.getElementById("status");
const grid = document.getElementById("results");
const detail = document.getElementById("detail");
let isVideo = false;

fetch("/api/info").then((r) => r.json()).then((info) => {
  isVideo = Boolean(info.video);
  document.getElementById("per-track-label").hidden = !isVideo;
}).catch(() => {});

function fmtTime(t) {
  const m = Math.floor(t / 60);
  const s = (t - 60 * m).toFixed(1).padStart(4, "0");
  return `${m}:${s}`;
}

function showFrame(hit, fig) {
  for (const f of grid.querySelectorAll(".hit.selected")) f.classList.remove("selected");
  fig.classList.add("selected");
  const img = document.getElementById("detail-img");
  const box = document.getElementById("detail-box");
  const [fw, fh] = hit.frame_size;
  const [x1, y1, x2, y2] = hit.box;
  img.onload = () => {
    const s = img.clientWidth / fw;
    Object.assign(box.style, {left: `${x1 * s}px`, top: `${y1 * s}px`, width: `${(x2 - x1) * s}px`,
                              height: `${(y2 - y1) * s}px`});
  };
  img.src = hit.frame_url;
  const span = hit.span || [hit.t, hit.t];
  document.getElementById("detail-text").textContent =
    `#${hit.rank} ${hit.video} at ${fmtTime(hit.t)} (frame ${hit.frame}), on screen ${fmtTime(span[0])}-${fmtTime(span[1])}, ` +
    `box ${hit.box.map((v) => Math.round(v)).join(",")}`;
  detail.hidden = false;
}

function showError(message) {
  statusLine.textContent = message;
  statusLine.className = "error";
}

function render(data) {
  grid.replaceChildren();
  document.getElementById("explain").hidden = true;
  detail.hidden = true;
  for (const hit of data.results) {
    const fig = document.createElement("figure");
    fig.className = "hit";
    const img = document.createElement("img");
    img.src = hit.url;
    img.alt = hit.path;
    const cap = document.createElement("figcaption");
    cap.textContent = `#${hit.rank} ${hit.score.toFixed(3)} ${hit.path}`;
    fig.append(img, cap);
    fig.addEventListener("click", () => explainHit(hit, fig, data.query));
    if (hit.frame_url) {
      fig.classList.add("video");
      const when = document.createElement("span");
      when.className = "when";
      when.textContent = `${hit.video} ${fmtTime(hit.t)}`;
      fig.append(when);
      fig.addEventListener("click", () => showFrame(hit, fig));
    }
    grid.append(fig);
  }
  statusLine.className = "";
  statusLine.textContent = `${data.results.length} results in ${data.ms} ms`;
  grid.dataset.query = data.query;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const query = document.getElementById("query").value.trim();
  const k = parseInt(document.getElementById("k").value, 10);
  if (!query) { showError("type a description first"); return; }
  statusLine.className = "";
  statusLine.textContent = "searching...";
  try {
    const resp = await fetch("/api/search", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify(isVideo ? {query, k, per_track: document.getElementById("per-track").checked} : {query, k}),
    });
    const data = await resp.json();
    if (!resp.ok) { showError(data.error || `error ${resp.status}`); return; }
    render(data);
  } catch (err) {
    showError(`request failed: ${err}`);
  }
});

// ---- explanations
function el(tag, props = {}, children = []) {
  const e = Object.assign(document.createElement(tag), props);
  e.append(...children);
  return e;
}

async function explainHit(hit, fig, query) {
  const box = document.getElementById("explain");
  for (const f of grid.querySelectorAll(".hit.explained")) f.classList.remove("explained");
  fig.classList.add("explained");
  box.hidden = false;
  box.replaceChildren(el("p", {className: "explain-status", textContent: `explaining #${hit.rank}...`}));
  try {
    const resp = await fetch("/api/explain", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({query, ids: [hit.id]}),
    });
    const data = await resp.json();
    if (!resp.ok) {
      box.replaceChildren(el("p", {className: "error", textContent: data.error || `error ${resp.status}`}));
      return;
    }
    renderExplanation(box, data, hit);
  } catch (err) {
    box.replaceChildren(el("p", {className: "error", textContent: `request failed: ${err}`}));
  }
}

function renderExplanation(box, data, hit) {
  const colors = data.part_colors;
  const color = (k) => (k === null || k === undefined ? "inherit" : colors[k % colors.length]);
  const [h] = data.hits;
  const words = el("p", {className: "explain-words"});
  data.words.forEach((w, j) => {
    const k = data.word_part[j];
    words.append(el("span", {className: "w", textContent: w, title: k === null ? "" : `part ${k}`,
                             style: `color:${color(k)}`}), " ");
  });
  const panels = el("div", {className: "explain-panels"}, h.panels.map((p) =>
    el("figure", {}, [el("img", {src: p.src, alt: p.name}), el("figcaption", {textContent: p.name})])));
  const rows = h.parts.map((p) => el("tr", {style: `color:${color(p.part)}`}, [
    el("td", {textContent: `part ${p.part}`}),
    el("td", {textContent: (p.contribution >= 0 ? "+" : "") + p.contribution.toFixed(3)}),
    el("td", {textContent: p.top_words.map(([w]) => w).join(", ")}),
  ]));
  const notes = data.limitations.map((n) => el("p", {className: "explain-note", textContent: n}));
  box.replaceChildren(
    el("h2", {textContent: `Why #${hit.rank} (score ${h.score.toFixed(3)}) matches`}), words, panels,
    el("table", {className: "explain-parts"}, [
      el("tr", {}, [el("th", {textContent: "part"}), el("th", {textContent: "share of score"}),
                    el("th", {textContent: "words it attends to"})]), ...rows]),
    ...notes,
    el("p", {className: "explain-note", textContent: `maps: ${data.reduction}; ${data.ms} ms`}));
}
