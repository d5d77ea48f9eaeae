"""The docs: the generated reference names every CLI option and every config field, and the README stays short.

The reference pages are generated from the code at build time by docs/gen_reference.py; ``mkdocs build
--strict`` (in .ci/run) fails on a broken link or a missing page."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_BUDGET = 200


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_cli_option_is_in_the_reference():
    gen = _generator()
    page = gen.cli_markdown()
    count = 0
    for command, parser in gen.parsers():
        assert f"`{command}`" in page
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for option in action.option_strings or [action.dest]:
                assert f"`{option}`" in page, f"{command} {option} is missing from reference/cli.md"
                count += 1
    assert count > 80


def test_every_config_field_is_in_the_reference():
    from dice_ray.config import RunConfig

    gen = _generator()
    page = gen.config_markdown()

    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            yield f"{prefix}{name}", field
            for sub in gen._models_in(field.annotation):
                yield from walk(sub, f"{prefix}{name}.")

    fields = list(walk(RunConfig))
    assert len(fields) > 80
    for dotted, _field in fields:
        assert f"| `{dotted}` |" in page, f"config field {dotted} is missing from reference/config.md"
    assert "| `optim.lr` | `float` | `0.05` | `--lr` |" in page  # default and flag beside the field
    assert "`output.log`" in page and "`--log`" in page


def test_every_table_is_in_the_reference():
    from dice_ray.results import TABLES, describe_tables

    gen = _generator()
    page = gen.tables_markdown()
    assert gen.clean(describe_tables()) in page
    who_writes = page[page.index("Who writes what"):].split("\n\n")[0]
    for name in TABLES:
        assert f"`{name}.parquet`" in page
        assert f"`{name}`" in who_writes, name  # the paragraph that says which command writes it


def test_the_committed_reference_pages_are_the_generated_ones():
    """The site generates them at build time; the copies in docs/reference are what GitHub shows: kept the same
    (``python docs/gen_reference.py OUT_DIR`` writes them)."""
    gen = _generator()
    for name, make in gen.PAGES.items():
        assert (ROOT / "docs" / name).read_text() == make(), f"docs/{name} is stale: regenerate it"


def test_readme_is_short_and_points_to_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_BUDGET
    assert "python -m dice_ray.simulate" in readme and "python -m pytest -q" in readme
    for link in ("docs/getting-started.md", "docs/concepts.md"):
        assert link in readme and (ROOT / link).exists()


def test_nothing_cites_the_design_notes():
    for path in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]:
        assert "SPEC" not in path.read_text(), path
    gen = _generator()
    for name, make in gen.PAGES.items():  # the generated pages too: the code's citations point to the concepts
        assert "SPEC" not in make(), name


def test_every_docs_page_is_in_the_nav():
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))

    def pages(nav):
        for item in nav:
            for value in item.values():
                yield from pages(value) if isinstance(value, list) else [value]

    listed = set(pages(config["nav"]))
    written = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert written <= listed, written - listed
    assert {"reference/cli.md", "reference/config.md", "reference/tables.md"} <= listed  # generated


def test_pages_name_only_existing_options(tmp_path):
    """The check the docs build runs (a warning, so --strict fails): a page naming an option no parser has."""
    gen = _generator()
    assert gen.unknown_options() == []
    (tmp_path / "page.md").write_text("Run `python -m dice_ray.simulate --nodes 4 --no-such-option 3`.\n")
    readme = tmp_path / "README.md"
    readme.write_text("`--lr 0.1` and `--frobnicate`\n")
    assert gen.unknown_options(tmp_path, readme) == ["README.md: --frobnicate", "page.md: --no-such-option"]


def _slug(heading: str) -> str:
    """The anchor Python-Markdown's ``toc`` extension gives a heading (its default slugify), formatting removed."""
    import re
    import unicodedata

    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](link) -> text
    text = re.sub(r"[`*_]", "", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: Path) -> set[str]:
    import re

    found, seen = set(), {}
    fenced = False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced or not line.startswith("#"):
            continue
        explicit = re.search(r"\{\s*#([\w-]+)[^}]*\}\s*$", line)
        if explicit:
            found.add(explicit.group(1))
            continue
        slug = _slug(line.lstrip("#").strip())
        count = seen.get(slug, 0)  # toc numbers repeated headings: slug, slug_1, ...
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}_{count}")
    return found


def test_every_anchor_a_page_links_to_exists():
    """Each ``[text](page.md#anchor)`` or ``(#anchor)`` in README and docs names a heading that exists, checked here
    with the toc extension's slug rule, so the docs build does not depend on which mkdocs release validates
    anchors (issue: '#contribution-accounting' passed one release's ``--strict`` and failed another's)."""
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "docs" / "tutorial.ipynb"]
    broken = []
    for page in pages:
        for target, anchor in re.findall(r"\]\(([^)#\s]*\.md|)#([^)\s]+)\)", page.read_text()):
            linked = (page.parent / target).resolve() if target else page
            if linked.is_file() and anchor not in _anchors(linked):
                broken.append(f"{page.relative_to(ROOT)} -> {target or '(same page)'}#{anchor}")
    assert not broken, broken


def test_tools_are_pinned_and_every_install_command_uses_the_pins():
    """constraints.txt pins each tool exactly (and none of the simulator's numeric dependencies); CI, README and
    Getting started install the test and docs extras with it."""
    import re

    pins = [line.split("#")[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    pins = [p for p in pins if p]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.]+", p) for p in pins), pins
    names = {p.split("==")[0].lower() for p in pins}
    assert {"mkdocs", "mkdocs-material", "mkdocstrings", "mkdocs-jupyter", "pytest", "hypothesis"} <= names
    assert not names & {"torch", "numpy", "scipy", "ray", "pandas", "pyarrow"}
    for page in (ROOT / ".ci" / "run", ROOT / "README.md", ROOT / "docs" / "getting-started.md"):
        for command in re.findall(r"pip install [^\n`&]*\.\[(?:test|docs)[^\n`&]*", page.read_text()):
            assert "-c constraints.txt" in command, (page.name, command)
