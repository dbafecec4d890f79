"""`lgur serve`: JSON API validation, image serving by id only, and the page driven by headless Chromium."""
from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient

from lgur.search.searcher import Searcher
from lgur.search.server import create_app
from test_search_index import built_index, tiny_checkpoint  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def searcher(built_index) -> Searcher:  # noqa: F811
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
def test_search_api_rejects_bad_input(client, body):
    r = client.post("/api/search", json=body)
    assert r.status_code == 422
    assert isinstance(r.json()["error"], str) and r.json()["error"]


def test_search_api_rejects_non_json(client):
    for content, ctype in ((b"query=a+man&k=5", "application/x-www-form-urlencoded"),
                           (b"{not json", "application/json"), (b"", "application/json")):
        r = client.post("/api/search", content=content, headers={"content-type": ctype})
        assert 400 <= r.status_code < 500 and "error" in r.json()
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


@pytest.fixture(scope="module")
def live_server(searcher):
    import uvicorn

    sock = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(searcher), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="headless Chromium not installed (Debian: apt-get install chromium chromium-driver; "
                           "tools/ensure_chromium.sh does it)")
def test_page_in_headless_chromium(live_server, searcher):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

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
        # an empty query is refused in the page without a request
        driver.find_element(By.ID, "query").clear()
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: "type a description" in d.find_element(By.ID, "status").text)
    finally:
        driver.quit()
