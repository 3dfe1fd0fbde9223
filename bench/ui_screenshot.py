"""Screenshot of the Dagster UI's lineage after a DVC-only run: what `make ui` shows a user after `make run`.

    make run                                  # the pipeline, through DVC only
    .venv/bin/pip install playwright          # the Python driver only; the browser is Debian's chromium
    .venv/bin/python bench/ui_screenshot.py --out docs/lineage.png

Starts `dagster dev` on a free port with a temporary DAGSTER_HOME, after the same sync `make ui` runs, opens the
global asset lineage in headless Chromium (/usr/bin/chromium, `apt-get install chromium`), waits for the graph and
writes a PNG. Prints how many asset partitions the sync reported, so the picture and the count can be compared.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"{url}: the Dagster UI did not answer within {timeout:.0f} s")


def unfold_group(page, group: str) -> None:
    """The lineage opens with every asset group folded; a click on a folded group's node unfolds it."""
    try:
        page.get_by_text(group, exact=True).last.click(force=True, timeout=5000)
    except Exception as e:  # a UI that opens groups unfolded: keep the picture as it is
        print(f"group {group!r} not unfolded: {type(e).__name__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/lineage.png", help="PNG to write (default: docs/lineage.png)")
    ap.add_argument("--path", default="/asset-groups", help="UI page to capture (default: the global lineage)")
    ap.add_argument("--group", default="data", help="asset group to unfold in the picture ('' for none)")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--width", type=int, default=1800)
    ap.add_argument("--height", type=int, default=1100)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    home = tempfile.mkdtemp(prefix="daf-ui-")
    env = {**os.environ, "DAGSTER_HOME": home, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    sync = subprocess.run([sys.executable, "-m", "dagster_project", "sync"], cwd=ROOT, env=env, text=True,
                          capture_output=True)
    print(sync.stdout.strip() or sync.stderr.strip())
    if sync.returncode:
        raise SystemExit(f"sync failed: {sync.stderr.strip()}")
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "dagster", "dev", "-m", "dagster_project.definitions", "-p", str(port)],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/server_info", 180)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(base + args.path, wait_until="networkidle", timeout=120_000)
            page.wait_for_timeout(5000)  # the graph lays itself out after the data arrives
            skip = page.get_by_role("button", name="Skip")  # the first-visit newsletter dialog
            if skip.count():
                skip.first.click()
            if args.group:
                unfold_group(page, args.group)
                page.wait_for_timeout(5000)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        ui.terminate()
        ui.wait(timeout=30)


if __name__ == "__main__":
    main()
