"""`dvc plots show` / `dvc plots diff` render offline through the shipped template `.dvc/plots/offline.html`.

What "no external URL" means here, honestly: the page must make the browser fetch nothing from the
network when it is opened. The browser fetches what the HTML references as a resource: `<script src>`,
`<link href>`, `<img src>`, `<iframe src>`, `<source src>`, `<object data>`, `<embed src>`, CSS `url(...)`
and `@import`, a `<meta http-equiv="refresh">` target, and a `//# sourceMappingURL` comment (fetched by
devtools). Those are checked on the whole page, including the inlined code. We do not ban every
`http(s)://` string: the inlined vega bundles contain URL strings that are never requested when
rendering local data (schema identifiers such as `https://vega.github.io/schema/...`, which vega-embed
only parses to pick a parser, links in error messages, default `loader` base settings used only when a
spec asks for remote data; our specs carry their data inline: `"data": {"values": [...]}`). So the test
also checks that every vega spec on the page has inline data and no `url` data source, and that the
three libraries are defined inline (`<script>` elements without `src`).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from .tiny import REPO, run

TEMPLATE = REPO / ".dvc/plots/offline.html"

RESOURCE_PATTERNS = {
    "src/href/data/action/poster attribute": re.compile(
        r"""<[a-zA-Z][^>]*\s(?:src|href|data|action|poster|srcset)\s*=\s*["']?\s*(?:https?:)?//[^\s"'>]*""",
        re.I,
    ),
    "css url()": re.compile(r"""url\(\s*["']?\s*(?:https?:)?//[^\s"')]*""", re.I),
    "css @import": re.compile(r"""@import\s+(?:url\()?\s*["']?\s*(?:https?:)?//[^\s"');]*""", re.I),
    "meta refresh to a url": re.compile(r"""<meta[^>]+http-equiv\s*=\s*["']?refresh[^>]+url\s*=""", re.I),
    "source map": re.compile(r"sourceMappingURL="),
}


def external_references(html: str) -> list[str]:
    """The resource references in `html` that a browser would fetch from another host."""
    found = []
    for what, pattern in RESOURCE_PATTERNS.items():
        found += [f"{what}: {m.group(0)[:120]}" for m in pattern.finditer(html)]
    return found


def test_template_is_offline_and_keeps_dvc_placeholder():
    html = TEMPLATE.read_text(encoding="utf-8")
    assert "{plot_divs}" in html  # dvc-render refuses a template without it
    config = (REPO / ".dvc/config").read_text()
    assert re.search(r"html_template\s*=\s*plots/offline.html", config)  # relative to .dvc/: the default
    assert "{scripts}" not in html  # where dvc-render would insert its CDN <script src> tags
    assert external_references(html) == []
    for name in ("vega@5", "vega-lite@5", "vega-embed@6"):
        assert f"/* {name}." in html, name
    for licence in ("vega", "vega-lite", "vega-embed"):
        text = (TEMPLATE.parent / "LICENSES" / f"{licence}.LICENSE").read_text()
        assert "Redistribution and use in source and binary forms" in text, licence


def test_external_references_detector_catches_dvc_default_page():
    """The detector must flag what dvc-render's own default page does (CDN scripts)."""
    from dvc_render.vega import VegaRenderer

    refs = external_references(VegaRenderer.SCRIPTS)
    assert len(refs) == 3 and all("cdn.jsdelivr.net" in r for r in refs)


def _plots_repo(tmp_path: Path) -> Path:
    """A git+dvc repo with one plots CSV (the layout `plot` writes) and the shipped template and config."""
    repo = tmp_path / "repo"
    repo.mkdir()
    run(repo, "git", "init", "-q")
    run(repo, "dvc", "init", "-q")
    shutil.copytree(REPO / ".dvc/plots", repo / ".dvc/plots")
    run(repo, "dvc", "config", "plots.html_template", "plots/offline.html")
    (repo / "plots").mkdir()
    csv = repo / "plots/accuracy_test_conflicting.csv"
    csv.write_text("name,split,accuracy,std\nfull,test_conflicting,40.0,1.0\ndm,test_conflicting,20.0,2.0\n")
    (repo / "dvc.yaml").write_text(
        "plots:\n  - plots/accuracy_test_conflicting.csv:\n      template: bar_horizontal\n"
        "      x: accuracy\n      y: name\n"
    )
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "plots")
    csv.write_text("name,split,accuracy,std\nfull,test_conflicting,41.0,1.0\ndm,test_conflicting,25.0,2.0\n")
    return repo


def _specs(html: str) -> list[dict]:
    return [json.loads(m) for m in re.findall(r"var spec = (\{.*?\});\s*vegaEmbed", html, re.S)]


@pytest.mark.parametrize("command", [["show"], ["diff", "HEAD"]])
def test_dvc_plots_page_has_no_external_url(tmp_path, command):
    repo = _plots_repo(tmp_path)
    run(repo, "dvc", "plots", *command, "-o", "out")
    html = (repo / "out/index.html").read_text(encoding="utf-8")
    assert "cdn.jsdelivr.net" not in html
    assert external_references(html) == []
    assert re.search(r"<script[^>]*\ssrc\s*=", html) is None
    specs = _specs(html)
    assert specs, "no vega spec on the page"
    for spec in specs:
        data = spec["data"]
        assert "values" in data and "url" not in data, data.keys()
        assert len(data["values"]) == (2 if command == ["show"] else 4)  # diff: workspace and HEAD
