"""Check the internal links and anchors of the built documentation site.

``mkdocs build --strict`` reports links to missing pages in the Markdown it converts; this
checks the HTML it wrote, so it also covers links inside generated API pages, the theme's own
links and every ``#anchor``: each ``href``/``src`` that points inside the site must name a file
that exists and, with a fragment, an ``id`` (or ``<a name=...>``) on that page.

    NO_MKDOCS_2_WARNING=1 mkdocs build --strict && python scripts/check_site_links.py site
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for key in ("id",) + (("name",) if tag == "a" else ()):
            if values.get(key):
                self.ids.add(values[key])
        for key in ("href", "src"):
            if values.get(key) and tag in ("a", "img", "link", "script", "source"):
                self.links.append(values[key])


def _target(page: Path, site: Path, path: str) -> Path:
    if path.startswith("/"):  # root-relative (the 404 page's links): the site is served at its root
        target = (site / unquote(path).lstrip("/")).resolve()
    else:
        target = (page.parent / unquote(path)).resolve() if path else page
    if target.is_dir():
        target = target / "index.html"
    return target


def check_site(site: Path) -> list[str]:
    """Every broken internal link of the site, as 'page: link (why)'."""
    site = site.resolve()
    pages = {path.resolve(): _parse(path) for path in site.rglob("*.html")}
    problems = []
    for page, parsed in sorted(pages.items()):
        for link in parsed.links:
            parts = urlsplit(link)
            if parts.scheme or link.startswith("//"):
                continue  # external: http(s), mailto, data
            target = _target(page, site, parts.path)
            where = f"{page.relative_to(site)}: {link}"
            if site not in target.parents and target != site:
                problems.append(f"{where} (outside the site)")
            elif not target.exists():
                problems.append(f"{where} (no such file)")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    problems.append(f"{where} (no anchor #{parts.fragment} on {target.relative_to(site)})")
    return problems


def _parse(path: Path) -> _Page:
    parsed = _Page()
    parsed.feed(path.read_text(encoding="utf-8"))
    return parsed


def main(argv: list[str]) -> int:
    site = Path(argv[0] if argv else "site")
    if not (site / "index.html").is_file():
        print(f"error: {site} holds no built site (index.html); run mkdocs build first", file=sys.stderr)
        return 2
    problems = check_site(site)
    for problem in problems:
        print(problem, file=sys.stderr)
    pages = sum(1 for _ in site.rglob("*.html"))
    print(f"{pages} pages checked, {len(problems)} broken internal link(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
