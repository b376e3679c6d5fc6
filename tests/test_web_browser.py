"""The web application in a real Chromium (Debian's, driven by Playwright): two inspections of a
synthetic tunnel stored by the pipeline, ``crackscan serve`` started as a process, and the pages
used as an inspector would: the tunnel's runs, the lining map panned, zoomed and shared by its
address, a crack opened by a click on the map, its photos, a review submitted, two inspections
compared. Screenshots go to the test's folder (and $CRACKSCAN_SCREENSHOTS when set)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from support import crackscan

CHROMIUM = "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Two runs of one 2 s synthetic drive of tunnel T (the bundled lining model), served."""
    folder = tmp_path_factory.mktemp("web")
    crackscan("synth", "--out", folder / "drive.mp4", "--seconds", "2", "--seed", "5")
    db = f"sqlite:///{folder / 'crackscan.db'}"
    runs = [json.loads(crackscan("run", "--source", folder / "drive.mp4", "--db", db,
                                 "--tunnel", "T", "--vehicle", "V1", "--workers", "1",
                                 "--format", "json").stdout)["id"] for _ in range(2)]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "crackscan", "serve", "--db", db,
                              "--port", str(port)], stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=1).read()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"crackscan serve did not start: {server.stderr.read()}")
            time.sleep(0.2)
    yield {"base": base, "runs": runs, "folder": folder}
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(site):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    assert errors == [], errors  # no script failed on any page
    page.close()


def shoot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("CRACKSCAN_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)


def wait_for_map(page, before: str | None = None) -> str:
    """The map's status once a view newer than ``before`` was drawn; returns it."""
    page.wait_for_function("(b) => { const s = document.querySelector('#status');"
                           " return s.dataset.ready && s.dataset.ready !== b; }",
                           arg=before or "", timeout=20000)
    return page.text_content("#status")


def api(site, path: str):
    return json.loads(urllib.request.urlopen(site["base"] + path, timeout=10).read())


def test_the_tunnel_its_runs_and_the_lining_map(site, browser, page, tmp_path):
    first, second = site["runs"]
    page.goto(site["base"] + "/")
    page.wait_for_selector(f"tr[data-run='{first}']")
    assert page.text_content("h2") == "T"
    assert page.locator("tbody tr").count() == 2
    shoot(page, tmp_path, "runs")
    page.click(f"tr[data-run='{second}'] >> text=map")
    status = wait_for_map(page)
    found = api(site, f"/api/runs/{second}")["physical_by_severity"]
    assert f"{sum(found.values())} cracks drawn" in status, status
    shoot(page, tmp_path, "map")
    # zoom in twice and pan: the view is in the address ...
    ready = page.get_attribute("#status", "data-ready")
    page.evaluate("crackscanMap.setZoom(crackscanMap.getZoom() + 2)")
    ready_status = wait_for_map(page, ready)
    ready = page.get_attribute("#status", "data-ready")
    page.mouse.move(640, 450)
    page.mouse.down()
    page.mouse.move(440, 450, steps=5)
    page.mouse.up()
    wait_for_map(page, ready)
    shared = page.url
    view = dict(p.split("=") for p in shared.split("?")[1].split("&"))
    assert {"c", "a", "z"} <= set(view), shared
    assert ready_status != page.text_content("#status")  # the pan moved the chainage shown
    # ... so the same address opens the same view
    other = browser.new_page(viewport={"width": 1280, "height": 800})
    other.goto(shared)
    other.wait_for_function("document.querySelector('#status').dataset.ready")
    assert other.text_content("#status").split(" · ")[0] == \
        page.text_content("#status").split(" · ")[0]
    other.close()
    # a filter: only the widest class
    widest = api(site, f"/api/runs/{second}")["severity_classes"][-1]["name"]
    ready = page.get_attribute("#status", "data-ready")
    page.select_option("select[name=severity]", widest)
    wait_for_map(page, ready)
    assert f"severity={widest}" in page.url


def test_a_crack_opened_from_the_map_reviewed_and_left_out(site, page, tmp_path):
    run = site["runs"][0]
    cracks = api(site, f"/api/runs/{run}/cracks?chainage=-100:100&arc=-100000:100000")["cracks"]
    crack = max(cracks, key=lambda c: c["length_mm"])
    page.goto(f"{site['base']}/runs/{run}")
    wait_for_map(page)
    # centre the crack at a high zoom and click its polyline (drawn on a canvas)
    middle = crack["polyline"][len(crack["polyline"]) // 2]
    ready = page.get_attribute("#status", "data-ready")
    page.evaluate("([c, a]) => crackscanMap.setView([a / 1000, c], 9)", middle)
    wait_for_map(page, ready)
    point = page.evaluate("([c, a]) => { const p = crackscanMap.latLngToContainerPoint("
                          "[a / 1000, c]); const r = document.querySelector('#map')"
                          ".getBoundingClientRect(); return [p.x + r.left, p.y + r.top]; }",
                          middle)
    page.mouse.click(*point)
    page.wait_for_selector(".leaflet-popup-content")
    assert f"crack {crack['number']}" in page.text_content(".leaflet-popup-content")
    shoot(page, tmp_path, "map-popup")
    page.click(f".leaflet-popup-content >> text=open crack {crack['number']}")
    page.wait_for_selector("#measurements")
    assert page.url.endswith(f"/runs/{run}/cracks/{crack['number']}")
    # every detection's evidence: a photo with its mask, loaded
    page.wait_for_function("[...document.querySelectorAll('#evidence img.photo')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    photos = page.locator("#evidence img.photo").count()
    assert photos == crack["detections"] and photos > 0
    assert page.locator("#history tr").count() == 3  # header, this run, the other
    shoot(page, tmp_path, "crack")
    # the inspector rejects it as a joint
    page.check("input[value=rejected]")
    page.select_option("select[name=reason]", "joint")
    page.fill("textarea[name=note]", "ring joint at the segment edge")
    page.fill("input[name=reviewer]", "A. Inspector")
    page.click("button[type=submit]")
    page.wait_for_selector("#title >> text=rejected (joint)")
    assert "A. Inspector" in page.text_content("#reviews")
    shoot(page, tmp_path, "crack-reviewed")
    stored = api(site, f"/api/runs/{run}/cracks/{crack['number']}")
    assert (stored["verdict"], stored["verdict_reason"]) == ("rejected", "joint")
    left = api(site, f"/api/runs/{run}/cracks?chainage=-100:100&arc=-100000:100000")["cracks"]
    assert crack["number"] not in [c["number"] for c in left]


def test_two_inspections_compared(site, page, tmp_path):
    first, second = site["runs"]
    page.goto(f"{site['base']}/compare?before={first}&after={second}")
    page.wait_for_selector("#changes-table")
    summary = page.text_content("#summary")
    report = api(site, f"/api/compare?before={first}&after={second}")
    assert f"{report['summary']['matched']} matched" in summary
    assert page.locator("#changes-table tr").count() == 1 + report["summary"]["matched"] + \
        report["summary"]["new"] + report["summary"]["gone"]
    shoot(page, tmp_path, "compare")
