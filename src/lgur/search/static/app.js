// Search page: POST /api/search, then a grid of the top-k gallery images (served by id from /img/{id}).
const form = document.getElementById("search-form");
const statusLine = document.getElementById("status");
const grid = document.getElementById("results");

function showError(message) {
  statusLine.textContent = message;
  statusLine.className = "error";
}

function render(data) {
  grid.replaceChildren();
  for (const hit of data.results) {
    const fig = document.createElement("figure");
    fig.className = "hit";
    const img = document.createElement("img");
    img.src = hit.url;
    img.alt = hit.path;
    const cap = document.createElement("figcaption");
    cap.textContent = `#${hit.rank} ${hit.score.toFixed(3)} ${hit.path}`;
    fig.append(img, cap);
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
