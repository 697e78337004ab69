"""Headless-Chromium screenshot of a Prefect flow-run page with its artifacts (for the README).

    .venv/bin/python docs/screenshot.py --out docs/flow-run-artifacts.png            # latest corpus run
    .venv/bin/python docs/screenshot.py --flow-run 3ec06f0d-... --tab Artifacts --out shot.png
    .venv/bin/python docs/screenshot.py --artifact corpus-relation-histogram --out histogram.png

Needs Debian's ``chromium`` package (``apt-get install chromium``) and a running Prefect server
(``PREFECT_API_URL``). Drives Chromium over the DevTools protocol: opens the page, waits until the
UI has rendered the expected text (not a fixed sleep), then captures it. A documented tool, not a test.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--remote-debugging-port=0", "--remote-allow-origins=*"]


def latest_flow_run(api: str, flow_name: str) -> str:
    """Id of the newest completed run of ``flow_name`` on the server at ``api``."""
    body = json.dumps({"flows": {"name": {"any_": [flow_name]}},
                       "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
                       "sort": "START_TIME_DESC", "limit": 1}).encode()
    req = urllib.request.Request(f"{api}/flow_runs/filter", data=body, headers={"Content-Type": "application/json"})
    runs = json.load(urllib.request.urlopen(req, timeout=30))
    if not runs:
        sys.exit(f"screenshot: no completed {flow_name} run on {api}; trigger one first (lmlm trigger)")
    return runs[0]["id"]


def latest_artifact(api: str, key: str) -> str:
    """Id of the newest artifact with ``key``."""
    body = json.dumps({"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}).encode()
    req = urllib.request.Request(f"{api}/artifacts/filter", data=body, headers={"Content-Type": "application/json"})
    found = json.load(urllib.request.urlopen(req, timeout=30))
    if not found:
        sys.exit(f"screenshot: no artifact {key!r} on {api}")
    return found[0]["id"]


class DevTools:
    """A minimal DevTools-protocol session with one page."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=64 << 20, open_timeout=30)
        self.n = 0

    def call(self, method: str, **params) -> dict:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def text(self) -> str:
        r = self.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''", returnByValue=True)
        return r.get("result", {}).get("value") or ""


def screenshot(url: str, out: str, wait_for: list[str], width: int, height: int, timeout_s: float,
               tab: str | None = None, settle_s: float = 3.0) -> None:
    """Open ``url`` in headless Chromium, click the tab named ``tab`` once the page shows it, wait until
    every string of ``wait_for`` is on the page, save a PNG."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("screenshot: no chromium on PATH; install Debian's package: apt-get install -y chromium")
    profile = tempfile.mkdtemp(prefix="lmlm-chromium-")
    proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             f"--window-size={width},{height}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = Path(profile, "DevToolsActivePort")
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or proc.poll() is not None:
                sys.exit("screenshot: chromium did not open its DevTools port")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(p for p in pages if p.get("type") == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        tools.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        tools.call("Page.enable")
        tools.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        click = ("(() => { const t = [...document.querySelectorAll('[role=tab], .p-tab, button, a')]"
                 ".find(e => e.innerText.trim() === %s); if (t) { t.click(); return true } return false })()")
        while tab and not tools.call("Runtime.evaluate", expression=click % json.dumps(tab),
                                     returnByValue=True).get("result", {}).get("value"):
            if time.monotonic() > deadline:
                sys.exit(f"screenshot: {url} shows no tab {tab!r} within {timeout_s:g} s")
            time.sleep(0.5)
        while not all(w in tools.text() for w in wait_for):
            if time.monotonic() > deadline:
                missing = [w for w in wait_for if w not in tools.text()]
                shown = " ".join(tools.text().split())[-600:]
                sys.exit(f"screenshot: {url} did not show {missing} within {timeout_s:g} s; it shows: {shown!r}")
            time.sleep(0.5)
        time.sleep(settle_s)  # let images decode, the run graph draw and the layout settle
        shot = tools.call("Page.captureScreenshot", format="png")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(base64.b64decode(shot["data"]))
        tools.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--api", default=os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api"))
    p.add_argument("--flow-run", help="flow run id (default: the latest completed run of --flow)")
    p.add_argument("--flow", default="corpus-processing")
    p.add_argument("--tab", default="Artifacts", help="flow-run page tab: Logs, Task Runs, Artifacts, ...")
    p.add_argument("--artifact", help="capture the newest artifact with this key instead of a flow-run page")
    p.add_argument("--wait-for", action="append", default=None,
                   help="text that must be on the page before the capture (repeatable)")
    p.add_argument("--out", default="docs/flow-run-artifacts.png")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=60)
    args = p.parse_args()
    api = args.api.rstrip("/")
    ui = api.removesuffix("/api")
    if args.artifact:
        url = f"{ui}/artifacts/artifact/{latest_artifact(api, args.artifact)}"
        screenshot(url, args.out, args.wait_for or [args.artifact], args.width, args.height, args.timeout)
    else:
        url = f"{ui}/runs/flow-run/{args.flow_run or latest_flow_run(api, args.flow)}"
        screenshot(url, args.out, args.wait_for or ["Completed", "corpus-relation-histogram"], args.width,
                   args.height, args.timeout, tab=args.tab or None)
    print(f"{args.out}: {url}")


if __name__ == "__main__":
    main()
