"""The docs stay true: every results file has a page that renders it, every page's file exists,
no figure reaches README.md but through the generated block, and the house rules hold."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _pages_module():
    spec = importlib.util.spec_from_file_location("gen_pages", ROOT / "docs" / "gen_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the pages; builds nothing outside mkdocs
    return module


PAGES = _pages_module()


def test_every_results_file_has_a_page():
    shown = {source for source, _, _ in PAGES.PAGES.values()}
    files = {p.name for p in RESULTS.iterdir() if p.suffix == ".json" or p.is_dir()}
    assert files - shown == set(), "results files no docs page shows"


@pytest.mark.parametrize("name", sorted(PAGES.PAGES))
def test_every_results_page_renders_its_tables(name):
    page = PAGES.results_page(name, *PAGES.PAGES[name])
    assert page.startswith("# ") and "python benchmarks/" in page
    assert re.search(r"^\|[-|]+\|$", page, re.M), "a results page without a table"


def test_a_missing_results_file_fails_the_page(tmp_path, monkeypatch):
    monkeypatch.setattr(PAGES, "RESULTS", tmp_path)
    with pytest.raises(FileNotFoundError, match="recommend.json"):
        PAGES.results_page("recommend", *PAGES.PAGES["recommend"])


def test_the_generic_page_shows_the_summary_figures():
    table = PAGES.generic({"summary": {"recall@10": 0.0123456, "users": 3}, "hardware": "x"})
    assert "| recall@10 | 0.01235 |" in table and "| users | 3 |" in table


def test_the_house_rules_hold():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 150, f"README.md has {len(readme)} lines"
    benchmarks = sorted((ROOT / "benchmarks").glob("*.py"))
    assert not [p.name for p in benchmarks if "sys.path.insert" in p.read_text()]
    imports_tests = re.compile(r"^\s*(from|import) (tests|cloud_server|cloud_client)\b", re.M)
    assert not [p.name for p in benchmarks if imports_tests.search(p.read_text())]
    skips = sum(
        p.read_text().count("fmt: skip")
        for folder in (
            "app",
            "benchmarks",
            "cloud_api",
            "device_agent",
            "personalization",
            "protocol",
            "tests",
            "docs",
        )
        for p in (ROOT / folder).rglob("*.py")
    )
    assert skips <= 20, f"{skips} `# fmt: skip` markers"


def test_readmes_headline_table_is_the_one_its_results_give():
    from benchmarks import headline

    readme = (ROOT / "README.md").read_text()
    assert headline.block() in readme, "run: python benchmarks/headline.py --readme"
