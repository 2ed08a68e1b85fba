"""mkdocs hook: files of the repository outside docs/ in the site. The home page is README.md (its
links rewritten for the site), the benchmark results (benchmarks/results) become results/<name>
and CHANGELOG.md changelog.md, so that the pages link to the measurements they quote and the
strict build checks those links."""

from __future__ import annotations

import os
import re

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
# README's links, repository-relative, as the site's
README_LINKS = ((r"\]\(docs/", "]("), (r"\]\(benchmarks/results/", "](results/"), (r"\]\(CHANGELOG\.md\)", "](changelog.md)"),
                (r"\[LICENSE\]\(LICENSE\)", "LICENSE"))


def home_page() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    for pattern, repl in README_LINKS:
        text = re.sub(pattern, repl, text)
    return text


def on_files(files, config):
    files.append(File.generated(config, "index.md", content=home_page()))
    for name in sorted(os.listdir(RESULTS)):
        if name.endswith((".md", ".png", ".json")):
            files.append(File.generated(config, f"results/{name}", abs_src_path=os.path.join(RESULTS, name)))
    files.append(File.generated(config, "changelog.md", abs_src_path=os.path.join(ROOT, "CHANGELOG.md")))
    return files
