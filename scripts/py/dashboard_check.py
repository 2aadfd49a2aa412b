#!/usr/bin/env python3
"""Drives the serve node's dashboard in headless Chromium for node/tests/dashboard.rs.

Usage: dashboard_check.py --url URL --token TOKEN --ticker T --interval I
                          --promote V --screenshot PATH

Debian's Chromium (/usr/bin/chromium, installed by scripts/setup.sh) is
driven through Playwright's Python API (no browser download).  The page
must load with no console error and no uncaught exception, draw a chart
for the served model and list it in the model table.  Then version V is
promoted through the page's own API (POST /ml/models/T/I/promote with the
admin token) and, without a reload, the page must show V in the chart's
title, the table, the banner (the /events stream) and the cluster's event
list (the coordinator's promotion event).  A full-page
screenshot goes to PATH.

Prints one JSON line (what it saw); exit status 0 when every check holds,
1 when one fails, 2 on any other problem.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request

from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def promote(url: str, token: str, ticker: str, interval: str, version: int) -> dict:
    req = urllib.request.Request(
        f"{url}/ml/models/{ticker}/{interval}/promote?version={version}",
        method="POST",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--ticker", required=True)
    ap.add_argument("--interval", required=True)
    ap.add_argument("--promote", required=True, type=int)
    ap.add_argument("--screenshot", required=True)
    a = ap.parse_args()

    seen: dict = {"console_errors": [], "checks": []}
    failed: list[str] = []

    def check(name: str, ok: bool) -> None:
        seen["checks"].append({name: ok})
        if not ok:
            failed.append(name)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on(
                "console",
                lambda m: seen["console_errors"].append(m.text) if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: seen["console_errors"].append(f"uncaught: {e}"))
            page.goto(a.url + "/", wait_until="load")
            chart = f'.chart[data-ticker="{a.ticker}"][data-interval="{a.interval}"]'
            row = f'#models tr[data-ticker="{a.ticker}"][data-interval="{a.interval}"]'
            try:
                page.wait_for_selector('body[data-ready="true"]', timeout=30_000)
                page.wait_for_selector(f"{chart} canvas", timeout=30_000)
                page.wait_for_selector(row, timeout=30_000)
                page.wait_for_selector("#live.on", timeout=30_000)
            except PlaywrightTimeout as e:
                check(f"the page loaded: {e}", False)
            seen["before"] = {
                "chart_version": page.get_attribute(chart, "data-version"),
                "table_version": page.get_attribute(row, "data-version"),
                "charts": page.locator(".chart canvas").count(),
                "model_rows": page.locator("#models tbody tr").count(),
            }
            check("a chart", seen["before"]["charts"] >= 1)
            check("the model table", seen["before"]["model_rows"] >= 1)
            check("not yet the promoted version", seen["before"]["chart_version"] != str(a.promote))

            seen["promoted"] = promote(a.url, a.token, a.ticker, a.interval, a.promote)
            started = time.monotonic()
            v = str(a.promote)
            try:
                page.wait_for_selector(f'{chart}[data-version="{v}"]', timeout=30_000)
                page.wait_for_selector(f'{row}[data-version="{v}"]', timeout=30_000)
                page.wait_for_selector(f'#banner[data-version="{v}"]', timeout=30_000)
                # The coordinator's event of the promotion, in the cluster's events.
                page.wait_for_selector("#events li.ev-promoted_by_operator", timeout=30_000)
                seen["updated_after_s"] = round(time.monotonic() - started, 2)
                check("updated without a reload", True)
            except PlaywrightTimeout as e:
                check(f"updated without a reload: {e}", False)
            seen["banner"] = page.text_content("#banner")
            seen["chart_title"] = page.text_content(f"{chart} h3")
            page.wait_for_timeout(300)
            page.screenshot(path=a.screenshot, full_page=True)
        finally:
            browser.close()
    check("no console errors", not seen["console_errors"])
    seen["failed"] = failed
    print(json.dumps(seen))
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # a problem other than a failed check
        print(f"dashboard_check: {e}", file=sys.stderr)
        sys.exit(2)
