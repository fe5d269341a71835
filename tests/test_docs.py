"""The documentation site (mkdocs.yml, docs/): it builds with ``mkdocs build --strict``, every
internal link and anchor of the built site resolves, and the Getting-started page renders in
headless Chromium with its title and the two commands of README."""
from __future__ import annotations

import html.parser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from workers import harness

README = harness.REPO / "README.md"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
                          cwd=harness.REPO, capture_output=True, text=True, timeout=300,
                          env={**harness.base_env(), "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("name"):
            self.ids.add(a["name"])
        if tag in ("a", "link") and a.get("href"):
            self.links.append(a["href"])
        if tag in ("img", "script") and a.get("src"):
            self.links.append(a["src"])


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(errors="replace"))
    return page


def _target(site: Path, page: Path, href: str) -> tuple[Path, str]:
    parts = urlsplit(href)
    path = unquote(parts.path)
    base = site if path.startswith("/") else page.parent     # 404.html links from the root
    target = (base / path.lstrip("/")).resolve() if path else page
    if target.is_dir() or path.endswith("/"):
        target = target / "index.html"
    return target, unquote(parts.fragment)


def test_the_site_builds_strict_and_every_internal_link_and_anchor_resolves(site):
    pages = {p.resolve(): _parse(p) for p in site.rglob("*.html")}
    assert len(pages) >= 20, sorted(str(p) for p in pages)
    broken = []
    for path, page in pages.items():
        for href in page.links:
            parts = urlsplit(href)
            if parts.scheme or href.startswith("//") or href.startswith("mailto:"):
                continue                           # outside the site
            target, fragment = _target(site, path, href)
            if not target.exists():
                broken.append(f"{path.relative_to(site)}: {href} (no {target.name})")
                continue
            if fragment and target.suffix == ".html":
                ids = pages[target.resolve()].ids if target.resolve() in pages else set()
                if fragment not in ids:
                    broken.append(f"{path.relative_to(site)}: {href} (no anchor #{fragment})")
    assert not broken, "\n".join(broken[:40])


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)\n```", README.read_text(), re.S)
    return [b.strip() for b in blocks[:2]]


def test_the_docs_give_readme_s_two_commands(site):
    commands = _readme_commands()
    assert len(commands) == 2 and "pytest" in commands[1], commands
    text = (harness.REPO / "docs" / "getting-started.md").read_text()
    for c in commands:
        assert c in text, f"docs/getting-started.md lacks README's command {c!r}"


@pytest.mark.timeout(120)
def test_getting_started_renders_in_headless_chromium(site, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium here (Debian's `chromium`; .ci/run installs it)")
    page = site / "getting-started" / "index.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000"]
    env = {**harness.base_env(), "HOME": str(tmp_path)}
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=90, env=env)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert re.search(r"<title>Getting started - adaptrun</title>", dom.stdout), dom.stdout[:500]
    text = html.unescape(re.sub(r"<[^>]+>", "", dom.stdout))
    for c in _readme_commands():
        assert c in text, f"the rendered page lacks {c!r}"
    shot = Path(os.environ.get("ADAPTRUN_DOCS_SCREENSHOT", tmp_path / "getting-started.png"))
    snap = subprocess.run([browser, *flags, "--window-size=1280,1800", f"--screenshot={shot}",
                           page.as_uri()], capture_output=True, text=True, timeout=90, env=env)
    assert snap.returncode == 0 and shot.stat().st_size > 10_000, snap.stderr[-2000:]
