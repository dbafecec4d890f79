// Search page: POST /api/search, then a grid of the top-k gallery images (served by id from /img/{id}).
// Clicking a hit explains it (POST /api/explain): the query's words coloured by the prototype part that attends
// to them, the crop with its foreground map and its strongest part's attention, the parts ranked by their share.
const form = document.getElementById("search-form");
const statusLine = document.getElementById("status");
const grid = document.getElementById("results");

function showError(message) {
  statusLine.textContent = message;
  statusLine.className = "error";
}

function render(data) {
  grid.replaceChildren();
  document.getElementById("explain").hidden = true;
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
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({query, k}),
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
