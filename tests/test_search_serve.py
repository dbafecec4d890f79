"""`lgur serve`: JSON API validation, image serving by id only (never outside the gallery: edited manifests,
symlinks, files swapped after indexing), bounded bodies and ids, an event loop that stays responsive,
micro-batching equal to one-at-a-time search, and the page driven by headless Chromium."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from lgur.search.index import GalleryIndex, SearchError, build_index
from lgur.search.searcher import Searcher
from lgur.search.server import QueryBatcher, create_app


@pytest.fixture(scope="module")
def searcher(built_index) -> Searcher:
    return Searcher(built_index, device="cpu")


@pytest.fixture(scope="module")
def client(searcher) -> TestClient:
    return TestClient(create_app(searcher))


def test_search_api_returns_ranked_results_with_image_urls(client, searcher):
    r = client.post("/api/search", json={"query": "a woman with a red bag", "k": 7})
    assert r.status_code == 200
    body = r.json()
    assert body["k"] == 7 and [h["rank"] for h in body["results"]] == list(range(1, 8))
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    [ref] = searcher.search(["a woman with a red bag"], k=7)
    assert [h["path"] for h in body["results"]] == [h.path for h in ref.hits]
    first = body["results"][0]
    img = client.get(first["url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
    assert img.content == searcher.index.file(first["id"]).read_bytes()
    assert client.post("/api/search", json={"query": "a man"}).json()["k"] == 10  # default k
    info = client.get("/api/info").json()
    assert info["images"] == len(searcher) and info["max_k"] == 100
    page = client.get("/")
    assert page.status_code == 200 and 'id="query"' in page.text and 'id="k"' in page.text


@pytest.mark.parametrize("body", [
    {"query": "", "k": 5},                 # empty
    {"query": "   ", "k": 5},              # only spaces
    {"query": "x" * 501, "k": 5},          # too long
    {"query": "a man", "k": 0},
    {"query": "a man", "k": 1000},
    {"query": "a man", "k": -3},
    {"query": "a man", "k": "5"},          # wrong types (strict: no coercion)
    {"query": "a man", "k": 2.5},
    {"query": 5, "k": 5},
    {"query": ["a man"], "k": 5},
    {"k": 5},                              # missing query
    {"query": "a man", "k": 5, "extra": 1},
    ["a man", 5],                          # not an object
])
@pytest.mark.parametrize("endpoint", ["/api/search", "/api/explain"])  # one validation for both
def test_search_api_rejects_bad_input(client, body, endpoint):
    r = client.post(endpoint, json=body)
    assert r.status_code == 422
    assert isinstance(r.json()["error"], str) and r.json()["error"]


def test_explain_api(client, searcher):
    import base64
    import io

    from PIL import Image

    q = "a man in a black jacket with a red backpack"
    r = client.post("/api/explain", json={"query": q, "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    [ref] = searcher.search([q], k=3)
    assert [h["id"] for h in body["hits"]] == [h.id for h in ref.hits]
    assert body["words"][:3] == ["a", "man", "in"] and len(body["word_part"]) == len(body["words"])
    assert body["limitations"] == [] and "mean" in body["reduction"]
    for h, ref_hit in zip(body["hits"], ref.hits):
        assert sum(p["contribution"] for p in h["parts"]) == pytest.approx(h["score"], abs=1e-5)
        assert h["score"] == pytest.approx(ref_hit.score, abs=2e-2) and h["url"] == f"/img/{ref_hit.id}"
        assert [p["name"] for p in h["panels"]] == ["crop", "foreground", f"part {h['strongest']}"]
        crop = Image.open(ref_hit.file)
        for p in h["panels"]:
            assert p["src"].startswith("data:image/jpeg;base64,")
            im = Image.open(io.BytesIO(base64.b64decode(p["src"].split(",", 1)[1])))
            assert im.size == crop.size  # every panel at the crop's own size
        grid = h["part_attention"]
        assert len(grid) == 6 and sum(map(sum, grid[h["strongest"]])) == pytest.approx(1, abs=1e-2)
    one = client.post("/api/explain", json={"query": q, "ids": [ref.hits[2].id]}).json()
    assert [h["id"] for h in one["hits"]] == [ref.hits[2].id]
    assert one["hits"][0]["parts"] == body["hits"][2]["parts"]


@pytest.mark.parametrize("ids", [[], [96], [-1], [10 ** 30], ["0"], [0.0], list(range(101)), "0", None])
def test_explain_api_rejects_bad_ids(client, ids):
    r = client.post("/api/explain", json={"query": "a man", "ids": ids} if ids is not None
                    else {"query": "a man", "id": 3})
    assert r.status_code == 422 and isinstance(r.json()["error"], str) and r.json()["error"]


def test_search_api_rejects_non_json(client):
    """The body is read as JSON whatever its content type: 422 with the reason, never another 4xx."""
    for content, ctype, says in ((b"query=a+man&k=5", "application/x-www-form-urlencoded", "not valid JSON"),
                                 (b"{not json", "application/json", "not valid JSON"),
                                 (b"", "application/json", "empty body")):
        r = client.post("/api/search", content=content, headers={"content-type": ctype})
        assert r.status_code == 422 and says in r.json()["error"], (content, r.status_code, r.text)
    assert client.get("/api/search").status_code == 405


def test_query_of_max_length_and_k_max_are_accepted(client):
    r = client.post("/api/search", json={"query": "a" * 500, "k": 100})
    assert r.status_code == 200 and len(r.json()["results"]) == min(100, 96)


TRAVERSALS = [
    "/img/96", "/img/-1", "/img/1e3", "/img/abc", "/img/..", "/img/%2e%2e", "/img/..%2F..%2Fetc%2Fpasswd",
    "/img/../../etc/passwd", "/img/%2e%2e/%2e%2e/etc/passwd", "/img/0/../../../etc/passwd", "/img/",
    "/img/%EF%BC%91",  # fullwidth digit one
    "/img//etc/passwd", "/static/..%2Fserver.py", "/static/../server.py", "/static/%2e%2e/server.py",
    "/static/../../../../etc/passwd", "/etc/passwd",
]


def test_images_only_by_index_id(live_server):
    """Raw requests (http.client sends the path unnormalised, unlike httpx) never reach a file outside the
    gallery: anything but a valid row id is a 404."""
    import http.client
    from urllib.parse import urlsplit

    host, port = urlsplit(live_server).hostname, urlsplit(live_server).port
    for path in TRAVERSALS:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read().decode("utf-8", "replace")
        conn.close()
        assert resp.status == 404, (path, resp.status)
        assert "root:" not in body and "import " not in body
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/img/0")
    assert conn.getresponse().status == 200


def free_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def running(app):
    """`app` served by uvicorn on a free loopback port in a thread; yields its base URL, stops it after."""
    import uvicorn

    sock = free_port()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def live_server(searcher):
    with running(create_app(searcher)) as url:
        yield url


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="headless Chromium not installed (Debian: apt-get install chromium chromium-driver; "
                           "tools/ensure_chromium.sh does it)")
@pytest.mark.slow  # Chromium
def test_page_in_headless_chromium(live_server, searcher):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    from PIL import Image

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(30)
        driver.get(live_server + "/")
        query = "a man in a black jacket with a red backpack"
        driver.find_element(By.ID, "query").send_keys(query)
        Select(driver.find_element(By.ID, "k")).select_by_visible_text("5")
        driver.find_element(By.ID, "go").click()
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit img")) == 5)
        loaded = ("return Array.from(document.querySelectorAll('#results .hit img'))"
                  ".map(i => i.complete ? i.naturalWidth : 0)")
        wait.until(lambda d: all(w > 0 for w in d.execute_script(loaded)))
        widths = driver.execute_script(loaded)
        assert len(widths) == 5 and all(w > 0 for w in widths)
        captions = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .hit figcaption")]
        [ref] = searcher.search([query], k=5)
        assert [c.split()[0] for c in captions] == [f"#{i}" for i in range(1, 6)]
        assert [c.split()[-1] for c in captions] == [h.path for h in ref.hits]
        assert "5 results" in driver.find_element(By.ID, "status").text
        # clicking a hit explains it: coloured words, the crop with its foreground and strongest part, the parts
        driver.find_elements(By.CSS_SELECTOR, "#results .hit")[1].click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#explain .explain-panels img")) == 3)
        panels = ("return Array.from(document.querySelectorAll('#explain .explain-panels img'))"
                  ".map(i => i.complete ? [i.naturalWidth, i.naturalHeight] : [0, 0])")
        wait.until(lambda d: all(w > 0 for w, _ in d.execute_script(panels)))
        crop = Image.open(ref.hits[1].file)
        assert driver.execute_script(panels) == [list(crop.size)] * 3
        names = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#explain .explain-panels figcaption")]
        assert names[:2] == ["crop", "foreground"] and names[2].startswith("part ")
        words = driver.find_elements(By.CSS_SELECTOR, "#explain .explain-words .w")
        assert [w.text for w in words] == query.split()
        assert len({w.value_of_css_property("color") for w in words}) >= 2  # coloured by part, not all alike
        rows = driver.find_elements(By.CSS_SELECTOR, "#explain .explain-parts tr")[1:]
        assert len(rows) == 6 and rows[0].text.startswith(names[2])  # strongest part first
        if os.environ.get("LGUR_SCREENSHOT"):
            driver.set_window_size(1100, 1000)
            driver.save_screenshot(os.environ["LGUR_SCREENSHOT"])
        # an empty query is refused in the page without a request
        driver.find_element(By.ID, "query").clear()
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: "type a description" in d.find_element(By.ID, "status").text)
    finally:
        driver.quit()


# ---------------------------------------------------------------------------------------------------------
# never outside the gallery


@pytest.fixture
def own_gallery(tmp_path, built_index, synth_root):
    """A private copy of the indexed gallery and its index (manifest pointed at the copy), plus a secret
    file outside the gallery: a decodable JPEG with a marker appended, so that serving or indexing it shows."""
    gallery = tmp_path / "gallery"
    shutil.copytree(synth_root / "imgs", gallery)
    index = tmp_path / "copy.lgidx"
    shutil.copytree(built_index, index)
    edit_manifest(index, lambda m: m.update(images_root=str(gallery.resolve())))
    outside = tmp_path / "outside"
    outside.mkdir()
    marker = f"SECRET-{uuid.uuid4().hex}".encode()
    secret = outside / "secret.jpg"
    secret.write_bytes(next(gallery.rglob("*.jpg")).read_bytes() + marker)
    return index, gallery, secret, marker


def edit_manifest(index: Path, change) -> None:
    m = json.loads((index / "manifest.json").read_text())
    change(m)
    (index / "manifest.json").write_text(json.dumps(m))


def edit_path(index: Path, row: int, new: str) -> None:
    """Rewrite one row's stored relative path (the `path` column), as an attacker with write access would."""
    import numpy as np

    col = index / json.loads((index / "manifest.json").read_text())["data"] / "col-path.npy"
    paths = [bytes(p) for p in np.load(col, allow_pickle=False)]
    paths[row] = new.encode()
    np.save(col, np.array(paths, dtype=f"S{max(map(len, paths))}"), allow_pickle=False)


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside/secret.jpg", "sub/../../outside/secret.jpg",
                                 "SECRET_ABS", "", "a\x00b"])
def test_manifest_naming_paths_outside_the_root_is_refused_at_load(own_gallery, bad):
    index, gallery, secret, marker = own_gallery
    bad = str(secret) if bad == "SECRET_ABS" else bad
    edit_path(index, 3, bad)
    with pytest.raises(SearchError, match=r"outside its images root.*row 3"):
        GalleryIndex.load(index)
    with pytest.raises(SearchError, match="outside its images root"):
        Searcher(index, device="cpu")


@pytest.mark.parametrize("root", ["/", "relative/root", None])
def test_manifest_with_a_bad_images_root_is_refused(own_gallery, root):
    index = own_gallery[0]
    edit_manifest(index, lambda m: m.update(images_root=root))
    with pytest.raises(SearchError, match="images_root"):
        GalleryIndex.load(index)


def test_index_skips_symlinks_leading_outside_and_reports_them(tmp_path, tiny_checkpoint, own_gallery):
    _, gallery, secret, marker = own_gallery
    small = tmp_path / "small"
    small.mkdir()
    for p in sorted(gallery.rglob("*.jpg"))[:4]:
        shutil.copy(p, small / p.name)
    (small / "evil.jpg").symlink_to(secret)                     # a file link leading out
    (small / "linked").symlink_to(secret.parent, target_is_directory=True)  # a folder link leading out
    (small / "inside.jpg").symlink_to(small / sorted(os.listdir(small))[0])  # stays inside: fine
    index, report = build_index(tiny_checkpoint, small, tmp_path / "s.lgidx", num_workers=0, progress=False)
    paths = index.files.paths()
    assert "evil.jpg" not in paths and not any(p.startswith("linked") for p in paths)
    assert "inside.jpg" in paths and len(paths) == 5
    assert [s["path"] for s in report.outside] == ["evil.jpg"]
    assert "outside the gallery" in report.outside[0]["reason"] and str(secret) in report.outside[0]["reason"]
    assert "1 outside the gallery" in report.summary() and "evil.jpg" in report.summary()
    manifest = json.loads((tmp_path / "s.lgidx" / "manifest.json").read_text())
    assert "evil.jpg" in [s["path"] for s in manifest["skipped"]]
    # only an explicit flag follows it; the strict server still refuses to serve it, an explicit one serves it
    index, report = build_index(tiny_checkpoint, small, tmp_path / "f.lgidx", num_workers=0, progress=False,
                                follow_symlinks=True)
    assert "evil.jpg" in index.files.paths() and not report.outside
    searcher = Searcher(tmp_path / "f.lgidx", device="cpu")
    row = index.files.paths().index("evil.jpg")
    r = TestClient(create_app(searcher)).get(f"/img/{row}")
    assert r.status_code == 403 and marker not in r.content and "error" in r.json()
    r = TestClient(create_app(searcher, follow_symlinks=True)).get(f"/img/{row}")
    assert r.status_code == 200 and r.content.endswith(marker)


def test_files_swapped_after_indexing_are_not_followed_outside(own_gallery):
    index, gallery, secret, marker = own_gallery
    searcher = Searcher(index, device="cpu")
    client = TestClient(create_app(searcher))
    files = searcher.index.files.paths()
    assert client.get("/img/0").status_code == 200
    # 1. a file replaced by a symlink to the secret
    (gallery / files[0]).unlink()
    (gallery / files[0]).symlink_to(secret)
    # 2. the folder of another file replaced by a symlink to a folder holding a file of the same name
    sub = next(p for p in files if "/" in p and p.split("/")[0] != files[0].split("/")[0])
    folder = sub.split("/")[0]
    decoy = secret.parent / "decoy"
    shutil.copytree(gallery / folder, decoy / folder)
    for p in (decoy / folder).rglob("*.jpg"):
        p.write_bytes(secret.read_bytes())
    shutil.rmtree(gallery / folder)
    (gallery / folder).symlink_to(decoy / folder, target_is_directory=True)
    # 3. a file replaced by a FIFO (opening it for reading would block a naive server)
    fifo_row = next(i for i, p in enumerate(files) if not p.startswith(folder) and i != 0)
    (gallery / files[fifo_row]).unlink()
    os.mkfifo(gallery / files[fifo_row])
    for row in (0, files.index(sub), fifo_row):
        r = client.get(f"/img/{row}")
        assert r.status_code == 403, (row, r.status_code)
        assert marker not in r.content and "not served" in r.json()["error"]
    # 4. a deleted file: 404, readable
    gone = next(i for i, p in enumerate(files) if not p.startswith(folder) and i not in (0, fifo_row))
    (gallery / files[gone]).unlink()
    r = client.get(f"/img/{gone}")
    assert r.status_code == 404 and "gone" in r.json()["error"]


# ---------------------------------------------------------------------------------------------------------
# bounded input, responsive loop


def test_oversized_bodies_are_413(searcher):
    client = TestClient(create_app(searcher))
    body = json.dumps({"query": "a man " * 20000, "k": 5}).encode()
    assert len(body) > 65536
    r = client.post("/api/search", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "65536" in r.json()["error"]
    # streamed without Content-Length (chunked): counted as it arrives
    r = client.post("/api/search", content=iter([body[:40000], body[40000:]]),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]
    # the limit is configurable (create_app / search.max_body_bytes / lgur serve --max-body-bytes)
    small = TestClient(create_app(searcher, max_body_bytes=20))
    assert small.post("/api/search", json={"query": "a man in a red coat", "k": 5}).status_code == 413
    assert small.post("/api/search", json={"query": "a man"}).status_code == 200


def test_huge_and_odd_ids_are_404_not_500(client):
    for image_id in ("9" * 5000, "1" * 21, "99999999999999999999", "0" * 30 + "1", "1_000", "١"):  # Arabic-Indic one
        r = client.get(f"/img/{image_id}")
        assert r.status_code == 404, image_id
        assert "no gallery image" in r.json()["error"] and len(r.text) < 300


@pytest.mark.parametrize("body, status, expect", [
    (json.dumps({f"k{i}": i for i in range(4800)}, separators=(",", ":")).encode(), 422, "unknown field"),
    (b"[" * 50000 + b"]" * 50000, 413, "larger than"),  # 100,000 bytes > search.max_body_bytes (65,536)
    (b"[" * 30000 + b"]" * 30000, 422, "nested too deeply"),
    (b'{"query": "\\ud800 a man", "k": 5}', 422, "Unicode"),
    (b'{"query": "a man", "k": 5, "query": "x"}', 200, None),    # duplicate key: last wins (json), still valid
    (b'{"query": "a man", "k": NaN}', 422, "k"),
    (b'{"query": "a man", "k": true}', 422, "k"),
    ('{"query": "a man"}'.encode("utf-16"), 200, None),   # UTF-16 JSON is valid JSON (RFC 8259 readers)
    (b"\xff\xfe\x00garbage", 422, "JSON"),
])
def test_hostile_json_bodies_get_readable_errors(client, body, status, expect):
    assert len(body) <= 65536 * 2
    r = client.post("/api/search", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    if expect is not None:
        assert expect.lower() in r.json()["error"].lower(), r.json()


def test_hostile_bodies_do_not_stall_the_event_loop(live_server):
    """While clients post 3 MB bodies of 200k keys (refused with 413 before they are read) and many-keyed
    bodies just under the limit (parsed off the event loop), /api/info keeps answering within a second.
    Before, one such 3 MB body stalled every other request for seconds (it was parsed on the loop)."""
    import httpx

    huge = json.dumps({f"key{i}": i for i in range(200_000)}).encode()
    near = json.dumps({f"k{i}": i for i in range(4800)}, separators=(",", ":")).encode()
    assert len(huge) > 3_000_000 and 60_000 < len(near) < 65536
    waits, done, statuses = [], threading.Event(), []

    def hostile(body: bytes, times: int):
        with httpx.Client(timeout=60) as c:
            for _ in range(times):
                try:
                    r = c.post(live_server + "/api/search", content=body, headers={"content-type": "application/json"})
                    statuses.append((r.status_code, r.json()["error"]))
                except httpx.TransportError as e:  # the server may close the socket while a 3 MB body is sent
                    statuses.append((None, repr(e)))

    threads = [threading.Thread(target=hostile, args=(b, n)) for b, n in ((huge, 3), (near, 20), (near, 20))]
    for t in threads:
        t.start()
    with httpx.Client(timeout=30) as c:
        while any(t.is_alive() for t in threads):
            t0 = time.perf_counter()
            assert c.get(live_server + "/api/info").status_code == 200
            waits.append(time.perf_counter() - t0)
            time.sleep(0.01)
    for t in threads:
        t.join(60)
    assert any(s == 413 for s, _ in statuses), statuses[:5]
    assert sum(s == 422 and "unknown field" in e for s, e in statuses) == 40, statuses[:5]
    assert len(waits) >= 3 and max(waits) < 1.0, sorted(waits)[-5:]


# ---------------------------------------------------------------------------------------------------------
# micro-batching


QUERIES = ["a man in a black jacket with a red backpack", "a woman in a white dress", "a person with short hair",
           "a girl wearing blue jeans and a yellow top carrying a bag", "an old man with a cane", "a man in grey",
           "a woman with long black hair in a red coat and white shoes", "a boy in shorts"]


def test_micro_batching_gives_the_same_results_as_one_at_a_time(searcher):
    ks = [5, 10, 5, 3, 10, 1, 5, 96]
    alone = [searcher.search([q], k)[0] for q, k in zip(QUERIES, ks)]
    batcher = QueryBatcher(searcher, max_batch=32, window_s=0.05, max_pending=100)

    async def together():
        return await asyncio.gather(*(batcher.search(q, k) for q, k in zip(QUERIES, ks)))

    batched = asyncio.run(together())
    assert max(batcher.batches) == len(QUERIES)  # really encoded together
    for a, b, k in zip(alone, batched, ks):
        assert len(b.hits) == k and [h.id for h in a.hits] == [h.id for h in b.hits]
        assert [h.score for h in a.hits] == pytest.approx([h.score for h in b.hits], abs=1e-5)


def test_concurrent_requests_are_batched_over_http(searcher):
    import httpx

    app = create_app(searcher, batch_window_ms=50)
    with running(app) as url:
        async def many():
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                rs = await asyncio.gather(*(c.post("/api/search", json={"query": q, "k": 4}) for q in QUERIES * 2))
            return [r.json() for r in rs]

        bodies = asyncio.run(many())
    assert max(app.state.batcher.batches) > 1
    for q, body in zip(QUERIES * 2, bodies):
        [ref] = searcher.search([q], k=4)
        assert [h["id"] for h in body["results"]] == [h.id for h in ref.hits]
    # batching off: the same answers, one forward per request
    off = TestClient(create_app(searcher, batch_max=1))
    assert off.app.state.batcher is None
    r = off.post("/api/search", json={"query": QUERIES[0], "k": 4}).json()
    assert [h["id"] for h in r["results"]] == [h["id"] for h in bodies[0]["results"]]


def test_batcher_is_bounded_and_passes_errors_to_each_request(searcher):
    batcher = QueryBatcher(searcher, max_batch=4, window_s=0.0, max_pending=2)

    async def flood():
        return await asyncio.gather(*(batcher.search("a man", 3) for _ in range(6)), return_exceptions=True)

    out = asyncio.run(flood())
    refused = [o for o in out if isinstance(o, Exception)]
    assert refused and all(getattr(e, "status", None) == 503 for e in refused)
    assert any(not isinstance(o, Exception) for o in out)

    async def bad():  # what the search raises reaches every request of the batch, and the worker goes on
        return await asyncio.gather(batcher.search("   ", 3), return_exceptions=True)

    [err] = asyncio.run(bad())
    assert isinstance(err, SearchError)

    batcher = QueryBatcher(searcher, max_batch=4, window_s=0.05, max_pending=100)

    async def one_bad_among_good():  # only the request at fault fails; the others of its batch are answered
        return await asyncio.gather(*(batcher.search(q, 2) for q in ("a man", " ", "a woman", "a boy")),
                                    return_exceptions=True)

    out = asyncio.run(one_bad_among_good())
    assert isinstance(out[1], SearchError) and all(len(out[i].hits) == 2 for i in (0, 2, 3))
    assert batcher.batches == [4]
    assert len(asyncio.run(asyncio.wait_for(batcher.search("a man", 2), 30)).hits) == 2


def test_batcher_groups_queries_by_their_search_options():
    """Queries with different extra options (e.g. a filter) are never mixed in one Searcher.search call."""
    calls = []

    class Recorder:
        def search(self, texts, ks, **options):
            calls.append((list(texts), list(ks), options))
            return [f"{t}|{k}|{options.get('where')}" for t, k in zip(texts, ks)]

    batcher = QueryBatcher(Recorder(), max_batch=8, window_s=0.05, max_pending=100)

    async def mixed():
        return await asyncio.gather(batcher.search("a", 1), batcher.search("b", 2, where="cam=1"),
                                    batcher.search("c", 3), batcher.search("d", 4, where="cam=1"),
                                    batcher.search("e", 5, where="cam=2"))

    assert asyncio.run(mixed()) == ["a|1|None", "b|2|cam=1", "c|3|None", "d|4|cam=1", "e|5|cam=2"]
    assert sorted(calls, key=str) == sorted([(["a", "c"], [1, 3], {}), (["b", "d"], [2, 4], {"where": "cam=1"}),
                                             (["e"], [5], {"where": "cam=2"})], key=str)
    assert batcher.batches == [5]


# ---------------------------------------------------------------------------------------------------------
# video indexes (lgur index --video): hits carry video, time, box; /frame/{id}; the page shows the frame


@pytest.fixture(scope="module")
def video_searcher(tmp_path_factory, tiny_checkpoint):
    """The rendered walkers video indexed with its ground-truth boxes (tests/test_video.py) and the tiny model."""
    pytest.importorskip("cv2", reason="video indexes need opencv-python-headless")
    from test_video import N_WALKERS, TruthDetector, _settings

    from lgur.data.synth import sample_identities
    from lgur.video.ingest import index_video
    from lgur.video.synthetic import render_walkers

    tmp = tmp_path_factory.mktemp("video_serve")
    truth = render_walkers(tmp / "walk.avi", sample_identities(N_WALKERS, 3), seconds=4, fps=10, seed=2)
    index_video(tiny_checkpoint, tmp / "walk.avi", tmp / "walk.lgidx", _settings(), num_workers=0, progress=False,
                detector=TruthDetector(truth, 2.0))
    return Searcher(tmp / "walk.lgidx", device="cpu")


def test_video_hits_in_the_api_and_frames_by_id_only(video_searcher):
    client = TestClient(create_app(video_searcher))
    assert client.get("/api/info").json()["video"] is True
    body = client.post("/api/search", json={"query": "a woman in a red coat", "k": 3, "per_track": True}).json()
    hits = body["results"]
    assert len(hits) == 3 and len({h["track"] for h in hits}) == 3
    for h in hits:
        assert h["video"] == "walk.avi" and 0 <= h["t"] < 4 and len(h["box"]) == 4 and h["frame_url"] == f"/frame/{h['id']}"
        assert h["span"][0] <= h["t"] <= h["span"][1] and h["frame_size"] == [640, 480]
        r = client.get(h["frame_url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert r.content == video_searcher.frame_file(h["id"]).read_bytes()
    rows = client.post("/api/search", json={"query": "a woman in a red coat", "k": 20}).json()["results"]
    assert len({h["track"] for h in rows}) < len(rows)  # without per_track one person fills several places
    for path in ("/frame/-1", "/frame/abc", f"/frame/{len(video_searcher)}", "/frame/%2e%2e%2fetc%2fpasswd", "/frame/1e3"):
        assert client.get(path).status_code == 404, path
    # a row whose frame path was edited to lead out of OUT.media/frames is refused, not served
    from lgur.search.index import column_array

    cols = video_searcher.index.files.columns
    saved = cols["frame_image"]
    try:
        for bad in ("frames/../../walk.lgidx/manifest.json", "/etc/passwd", "crops/walk.avi/x.jpg"):
            cols["frame_image"] = column_array([bad] * len(video_searcher), "str")
            assert client.get("/frame/0").status_code in (403, 404), bad
    finally:
        cols["frame_image"] = saved


@pytest.mark.slow  # Chromium
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="headless Chromium not installed (Debian: apt-get install chromium chromium-driver; "
                           "tools/ensure_chromium.sh does it)")
def test_video_page_shows_the_frame_of_a_clicked_hit(video_searcher, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1200,1000"):
        opts.add_argument(flag)
    query = "a man in a black jacket with a red backpack"
    with running(create_app(video_searcher)) as url:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        try:
            driver.set_page_load_timeout(30)
            driver.get(url + "/")
            wait = WebDriverWait(driver, 30)
            wait.until(lambda d: d.find_element(By.ID, "per-track-label").is_displayed())  # a video index
            driver.find_element(By.ID, "query").send_keys(query)
            Select(driver.find_element(By.ID, "k")).select_by_visible_text("5")
            driver.find_element(By.ID, "go").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit.video")) >= 3)
            [ref] = video_searcher.search([query], k=5, per_track=True)
            whens = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .hit .when")]
            assert len(whens) == len(ref.hits) and all(w.startswith("walk.avi 0:0") for w in whens)
            assert not driver.find_element(By.ID, "detail").is_displayed()
            driver.find_elements(By.CSS_SELECTOR, "#results .hit.video")[1].click()
            wait.until(lambda d: d.find_element(By.ID, "detail").is_displayed())
            wait.until(lambda d: d.execute_script("const i = document.getElementById('detail-img');"
                                                  "return i.complete && i.naturalWidth > 0"))
            wait.until(lambda d: d.execute_script("return document.getElementById('detail-box').offsetWidth > 0"))
            hit = ref.hits[1].video
            text = driver.find_element(By.ID, "detail-text").text
            assert text.startswith(f"#2 walk.avi at 0:0{hit['t']:.1f}") and f"frame {hit['frame']}" in text
            # the drawn box sits where the hit's box is, scaled to the shown frame
            geo = driver.execute_script(
                "const i = document.getElementById('detail-img'), b = document.getElementById('detail-box');"
                "return [i.clientWidth, b.offsetLeft, b.offsetTop, b.offsetWidth, b.offsetHeight]")
            s = geo[0] / 640
            x1, y1, x2, y2 = hit["box"]
            assert geo[1:] == pytest.approx([x1 * s, y1 * s, (x2 - x1) * s, (y2 - y1) * s], abs=2)
            driver.save_screenshot(str(tmp_path / "video_page.png"))
        finally:
            driver.quit()


def test_filtered_requests_are_batched_apart_and_answer_like_the_searcher(own_gallery):
    """`where` in the JSON body filters by a metadata column; concurrent requests with different filters are
    each answered as Searcher.search answers them alone; a bad filter is a readable 422."""
    import httpx
    import numpy as np

    index = own_gallery[0]
    m = json.loads((index / "manifest.json").read_text())
    np.save(index / m["data"] / "col-camera.npy", np.arange(m["count"], dtype=np.int64) % 3, allow_pickle=False)
    edit_manifest(index, lambda m: m["columns"].update(camera="int"))
    searcher = Searcher(index, device="cpu")
    asks = [(q, ["camera=1"] if i % 3 == 0 else "camera=2" if i % 3 == 1 else None) for i, q in enumerate(QUERIES)]
    app = create_app(searcher, batch_window_ms=50)
    with running(app) as url:
        async def many():
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                return await asyncio.gather(*(c.post("/api/search", json={"query": q, "k": 5, "where": w})
                                              for q, w in asks))

        answers = [r.json() for r in asyncio.run(many())]
    assert max(app.state.batcher.batches) > 1
    for (q, w), body in zip(asks, answers):
        [ref] = searcher.search([q], k=5, where=w)
        assert [h["id"] for h in body["results"]] == [h.id for h in ref.hits]
        if w:
            want = int(str(w[0] if isinstance(w, list) else w).split("=")[1])
            assert all(h["meta"]["camera"] == want for h in body["results"]) and body["results"]
    client = TestClient(create_app(searcher))
    for bad, says in (({"where": "nosuchcolumn=1"}, "no column"), ({"where": "camera=abc"}, "camera"),
                      ({"where": 5}, "where"), ({"where": "((("}, "where"), ({"after": [1]}, "after"),
                      ({"after": "not a time"}, "time")):
        r = client.post("/api/search", json={"query": "a man", "k": 3, **bad})
        assert r.status_code == 422 and says in r.json()["error"], (bad, r.text)


def test_parallel_workers_run_batches_at_once_with_the_same_answers(built_index):
    """search.serve_workers: batches run in several threads at once (their intervals overlap), each answer equal
    to one-at-a-time search; an explanation (exclusive turn) never overlaps a search."""
    from lgur.search.searcher import ModelTurns

    searcher = Searcher(built_index, device="cpu")
    alone = {q: [h.id for h in searcher.search([q], 5)[0].hits] for q in QUERIES}
    threads = torch.get_num_threads()
    try:
        assert searcher.parallel(2) == 2 and torch.get_num_threads() == max(1, threads // 2)
        spans, real = [], searcher.search

        def timed(texts, k, **kw):  # the real search, with its start/end recorded and a little held
            t0 = time.perf_counter()
            out = real(texts, k, **kw)
            time.sleep(0.2)
            spans.append((t0, time.perf_counter(), threading.get_ident()))
            return out

        searcher.search = timed
        batcher = QueryBatcher(searcher, max_batch=4, window_s=0.0, max_pending=100, workers=2)

        async def many():
            return await asyncio.gather(*(batcher.search(q, 5) for q in QUERIES))

        results = asyncio.run(many())
    finally:
        torch.set_num_threads(threads)
    assert [[h.id for h in r.hits] for r in results] == [alone[q] for q in QUERIES]
    assert len(spans) >= 2 and len({s[2] for s in spans}) >= 2
    assert any(a[0] < b[1] and b[0] < a[1] for a in spans for b in spans if a is not b)  # two ran at once

    turns, log = ModelTurns(2), []

    def shared(name):
        with turns.shared():
            log.append(("in", name))
            time.sleep(0.1)
            log.append(("out", name))

    def exclusive():
        with turns:
            log.append(("in", "x"))
            time.sleep(0.1)
            log.append(("out", "x"))

    ts = [threading.Thread(target=shared, args=("a",)), threading.Thread(target=exclusive),
          threading.Thread(target=shared, args=("b",))]
    for t in ts:
        t.start()
        time.sleep(0.02)
    for t in ts:
        t.join(10)
    i = log.index(("in", "x"))
    assert log[i + 1] == ("out", "x")  # nothing entered while the exclusive turn ran
    assert sum(1 for e in log[:i] if e[0] == "in") == sum(1 for e in log[:i] if e[0] == "out")  # all left first
