"""Open the built docs site in a real headless browser: ``python scripts/check_docs_browser.py [SITE] [OUT]``.

Serves SITE (default ``site/``, from ``mkdocs build --strict``) on a loopback port, opens every
page of the navigation in Chromium (playwright driving the system's chromium, or playwright's
own), renders each to OUT/<page>.png (default ``build/docs-browser``), and fails (exit 1) on a
console error or a failed request, an image that did not load, or an API reference page without
documented objects. Writes OUT/report.json. Needs ``pip install playwright`` and a Chromium
(``apt-get install chromium``, or ``playwright install chromium``).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys

from check_links import serve  # scripts/ is sys.path[0] when run as a script

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository (benchmarks)

MAIN_PAGES = ("index.html", "getting-started.html", "choosing-a-mode.html", "performance.html", "reliability.html")


def pages(site: str) -> list[str]:
    out = []
    for root, _, files in os.walk(site):
        for name in files:
            if name.endswith(".html") and not root.startswith(os.path.join(site, "results")) and name != "404.html":
                out.append(os.path.relpath(os.path.join(root, name), site))
    return sorted(out)


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def check(site: str, out: str) -> dict:
    from playwright.sync_api import sync_playwright

    from benchmarks.harness import git_commit

    os.makedirs(out, exist_ok=True)
    report = {"checked": {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                          "commit": git_commit()},
              "pages": {}, "failures": []}
    with serve(site) as base, sync_playwright() as p:
        path = chromium_path()
        browser = p.chromium.launch(executable_path=path) if path else p.chromium.launch()
        report["checked"]["browser"] = f"Chromium {browser.version}"
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        for name in pages(site):
            problems = []
            page.on("console", lambda msg, probs=problems: probs.append(f"console {msg.type}: {msg.text}")
                    if msg.type == "error" else None)
            page.on("requestfailed", lambda req, probs=problems: probs.append(f"request failed: {req.url}"))
            page.on("response", lambda resp, probs=problems: probs.append(f"HTTP {resp.status}: {resp.url}")
                    if resp.status >= 400 else None)
            page.goto(base + name, wait_until="load")
            broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth == 0)"
                                   ".map(i => i.src)")
            problems += [f"image did not load: {src}" for src in broken]
            images = page.evaluate("document.images.length")
            objects = page.evaluate("document.querySelectorAll('.doc-object, .doc').length")
            if name.startswith("api/") and objects == 0:
                problems.append("API page without documented objects")
            text = page.evaluate("document.querySelector('article') ? document.querySelector('article')"
                                 ".innerText.length : 0")
            if text < 200:
                problems.append(f"page almost empty ({text} characters)")
            if name in MAIN_PAGES or name.startswith("api/"):
                page.screenshot(path=os.path.join(out, name.replace("/", "_").replace(".html", ".png")),
                                full_page=False)
            report["pages"][name] = {"images": images, "documented_objects": objects, "characters": text,
                                     "problems": problems}
            report["failures"] += [f"{name}: {p}" for p in problems]
            page.close()
            page = browser.new_page(viewport={"width": 1280, "height": 900})
        browser.close()
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    site = argv[0] if argv else "site"
    out = argv[1] if len(argv) > 1 else os.path.join("build", "docs-browser")
    if not os.path.isfile(os.path.join(site, "index.html")):
        print(f"check_docs_browser: {site}/index.html not found: run mkdocs build --strict first", file=sys.stderr)
        return 2
    report = check(site, out)
    n = len(report["pages"])
    for failure in report["failures"]:
        print(f"FAIL {failure}")
    print(f"{n} pages opened, {sum(p['images'] for p in report['pages'].values())} images, "
          f"{len(report['failures'])} problems; screenshots and report.json in {out}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
