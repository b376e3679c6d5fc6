"""Screenshots of every page of `crackscan serve` on a copy of an SQLite crack database (the
demo's), in Debian's Chromium driven by Playwright: the tunnels and runs, the lining map (whole
run, then zoomed onto the longest crack with its popup), the crack page before and after a
review, and two inspections compared (when the database holds two runs).

    python docs/results/2026-12-06-web-screenshots.py crackscan-demo/crackscan.db docs/web
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright


def main(database: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "crackscan.db"  # the review below must not touch the original
        shutil.copy(database, copy)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "crackscan", "serve", "--db",
                                   f"sqlite:///{copy}", "--port", str(port)])
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(100):
                try:
                    urllib.request.urlopen(f"{base}/healthz", timeout=1)
                    break
                except OSError:
                    time.sleep(0.2)
            runs = json.loads(urllib.request.urlopen(f"{base}/api/runs").read())
            run = runs[-1]["id"]
            cracks = json.loads(urllib.request.urlopen(
                f"{base}/api/runs/{run}/cracks?chainage=-1e6:1e6&arc=-1e7:1e7").read())["cracks"]
            crack = max(cracks, key=lambda c: c["length_mm"])
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                            args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1280, "height": 760})
                page.goto(f"{base}/")
                page.wait_for_selector("tbody tr")
                page.screenshot(path=str(out / "runs.png"))
                page.goto(f"{base}/runs/{run}")
                page.wait_for_function("document.querySelector('#status').dataset.ready")
                page.wait_for_timeout(300)
                page.screenshot(path=str(out / "map.png"))
                middle = crack["polyline"][len(crack["polyline"]) // 2]
                page.evaluate("([c, a]) => crackscanMap.setView([a / 1000, c], 10)", middle)
                page.wait_for_timeout(1500)
                point = page.evaluate(
                    "([c, a]) => { const p = crackscanMap.latLngToContainerPoint([a / 1000, c]);"
                    " const r = document.querySelector('#map').getBoundingClientRect();"
                    " return [p.x + r.left, p.y + r.top]; }", middle)
                page.mouse.click(*point)
                page.wait_for_selector(".leaflet-popup-content")
                page.wait_for_timeout(400)
                page.screenshot(path=str(out / "map-crack.png"))
                page.goto(f"{base}/runs/{run}/cracks/{crack['number']}")
                page.wait_for_function("[...document.querySelectorAll('#evidence img.photo')]"
                                       ".every(i => i.complete && i.naturalWidth > 0)")
                page.wait_for_timeout(800)
                page.screenshot(path=str(out / "crack.png"), full_page=True)
                page.check("input[value=confirmed]")
                page.fill("textarea[name=note]", "seen on site, 2026-12-06")
                page.fill("input[name=reviewer]", "A. Inspector")
                page.click("button[type=submit]")
                page.wait_for_selector("#title >> text=confirmed")
                page.screenshot(path=str(out / "crack-reviewed.png"))
                if len(runs) > 1:
                    page.goto(f"{base}/compare?before={runs[0]['id']}&after={run}")
                    page.wait_for_selector("#changes-table")
                    page.wait_for_timeout(400)
                    page.screenshot(path=str(out / "compare.png"), full_page=True)
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=10)
    print(f"screenshots of {database} in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
