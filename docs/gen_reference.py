"""Generate the reference pages from the code at build time (mkdocs-gen-files), so nothing is written twice.

- ``reference/cli.md``: every option of ``python -m dice_ray.simulate``, ``… analyze`` and ``… sweep``, from
  their argparse parsers (``build_parser()``);
- ``reference/config.md``: every field of the run config with its type, default and meaning, from the
  pydantic models in ``dice_ray/config.py`` (recursively from ``RunConfig``);
- ``reference/tables.md``: every column of every result table, from ``dice_ray.results.describe_tables()``.

``tests/test_docs.py`` imports this file and checks that every option and every field appears.
Run it alone (``python docs/gen_reference.py OUT_DIR``) to write the pages to a folder.
"""

from __future__ import annotations

import argparse
import functools
import html
import logging
import re
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def clean(text: str) -> str:
    """Point the code's short citations of the design notes (``(SPEC §5)``) at the concepts page instead."""
    text = re.sub(r"\(SPEC §[^)]*\)", "(see [Concepts](../concepts.md))", text)
    return re.sub(r"SPEC §[0-9–§]+:?\s*", "", text)


def _cell(text: Any) -> str:
    """``text`` as one Markdown table cell: a code span holding ``|`` becomes HTML code with ``&#124;`` (an escaped
    ``\\|`` inside backticks shows its backslash), and any other ``|`` is escaped."""
    def code(match: re.Match) -> str:
        return f"<code>{html.escape(match[1]).replace('|', '&#124;')}</code>"

    return re.sub(r"`([^`]*\|[^`]*)`", code, str(text).replace("\n", " ")).replace("|", "\\|")


def parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """(command, parser) of every command-line front end."""
    from dice_ray.cli.analyze import build_parser as analyze_parser
    from dice_ray.cli.simulate import build_parser as simulate_parser
    from dice_ray.cli.sweep import build_parser as sweep_parser

    return [("python -m dice_ray.simulate", simulate_parser()), ("python -m dice_ray.analyze", analyze_parser()),
            ("python -m dice_ray.sweep", sweep_parser())]


def parser_markdown(command: str, parser: argparse.ArgumentParser) -> str:
    """One section per command: usage, then a table of its arguments."""
    parser.formatter_class = functools.partial(argparse.HelpFormatter, width=80)  # not the terminal's width
    lines = [f"## `{command}`", "", parser.description or "", "", "```text", parser.format_usage().strip(), "```",
             "", "| option | value | meaning |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}` (positional)"
        if action.choices:
            value = " \\| ".join(f"`{c}`" for c in action.choices)
        elif action.nargs == 0:
            value = "(switch)"
        else:
            value = f"`{action.metavar or action.dest.upper()}`"
        help_text = (action.help or "").replace("%%", "%")
        lines.append(f"| {names} | {value} | {_cell(help_text)} |")
    return "\n".join(lines) + "\n"


def cli_markdown() -> str:
    sections = [parser_markdown(command, parser) for command, parser in parsers()]
    return ("# Command line\n\nGenerated from the argparse parsers at build time. Every `simulate` option sets the "
            "[config field](config.md) named in brackets; `--config FILE` loads a YAML config first and "
            "`--set a.b=value` sets any field.\n\n" + clean("\n".join(sections)))


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (``X``, ``X | None``, ``list[X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return text or str(annotation).replace("typing.", "")


def config_fields(model: type[BaseModel] = None, prefix: str = "") -> list[tuple[str, Any, Any, str, type]]:
    """(dotted name, annotation, default, description, owning model) of every config field, depth first."""
    if model is None:
        from dice_ray.config import RunConfig

        model = RunConfig
    rows = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        default = field.default_factory() if field.default_factory else field.default
        rows.append((dotted, field.annotation, default, field.description or "", model))
        for sub in _models_in(field.annotation):
            rows += config_fields(sub, f"{dotted}.")
    return rows


def _flags() -> dict[str, list[str]]:
    from dice_ray.cli.simulate import OPTIONS, SWITCHES

    flags: dict[str, list[str]] = {}
    for flag, dotted, _ in [*OPTIONS, *SWITCHES]:
        flags.setdefault(dotted, []).append(flag)
    return flags


def config_markdown() -> str:
    flags = _flags()
    lines = ["# Run config", "",
             "Generated from the pydantic models in `dice_ray/config.py` at build time. A YAML file "
             "(`configs/*.yaml`, `--config FILE`), `dice_ray.RunConfig(...)` and `--set a.b=value` all name the "
             "fields below by their dotted names; unknown keys are refused.", ""]
    sections: dict[str, list[tuple]] = {}
    for row in config_fields():
        sections.setdefault(row[0].rsplit(".", 1)[0] if "." in row[0] else "", []).append(row)
    for parent, rows in sections.items():
        doc = " ".join((rows[0][4].__doc__ or "").strip().split("\n\n")[0].split())
        lines += ["", f"## `{parent or 'top level'}`", "", doc, "",
                  "| field | type | default | CLI | meaning |", "|---|---|---|---|---|"]
        for dotted, annotation, default, description, _model in rows:
            lines.append(_config_row(flags, dotted, annotation, default, description))
    return clean("\n".join(lines) + "\n")


def _config_row(flags: dict[str, list[str]], dotted: str, annotation: Any, default: Any, description: str) -> str:
    """One table row: field, type, default, the CLI flags that set it, meaning."""
    if _models_in(annotation) and not isinstance(default, (list, dict)) and default is not None:
        default_text = "(section)"
    else:
        default_text = f"`{default!r}`"
    cli = ", ".join(f"`{f}`" for f in flags.get(dotted, []))
    return (f"| `{dotted}` | {_cell(f'`{_type_name(annotation)}`')} | {_cell(default_text)} | {cli} | "
            f"{_cell(description)} |")


TABLES_INTRO = """# Result tables

Generated from the schemas in `dice_ray/results.py` at build time (the one module that defines the tables).
Every result is a Parquet table; each column's meaning is also stored in the file's own schema
(`pyarrow.parquet.read_schema(path)`). Open them with pandas, polars or DuckDB:

```python
import pandas as pd
rounds = pd.read_parquet("runs/my-run/rounds.parquet")
rounds.groupby("round")[["train_loss", "heldout_acc", "consensus_distance"]].mean()
```

```sql
-- duckdb
SELECT round, avg(heldout_acc) AS acc, any_value(consensus_distance) AS cd
FROM 'runs/my-run/rounds.parquet' WHERE heldout_acc IS NOT NULL GROUP BY round ORDER BY round;
```

Who writes what: `simulate` writes `rounds`, `nodes` and, with the methods on, `influence` and `dice`
(`--influence`), `proximal` (`--proximal`), `rewiring` (`--rewire`), `contributions` and `shares` (`--ledger`),
`loo` and `shapley` (`--loo`, `--shapley K`); `python -m dice_ray.analyze` writes `alignment`, `cascade`,
`pairwise`, `anomaly`, `suspects`, `collaborators` and `contributions_report`; `python -m dice_ray.sweep` writes
`trials`, with one column per swept field and one per trial metric after the columns below.

Tables are written atomically (a temporary file, fsync, rename). The per-round tables (`rounds`, `proximal`,
`contributions`) grow as part files under `checkpoints/` and become whole tables only when training completes;
`manifest.json` says `"status": "complete"` only at the end.

"""


def tables_markdown() -> str:
    from dice_ray.results import describe_tables

    return TABLES_INTRO + clean(describe_tables()) + "\n"


# Options of other programs that the pages mention (bench scripts, Ray, pip, TensorBoard, MLflow, Chromium).
OTHER_OPTIONS = {"--index-url", "--working-dir", "--logdir", "--backend-store-uri", "--whole-run", "--repeats",
                 "--strict", "--headless"}


def _ray_options() -> set[str]:
    """The options of the Ray commands the pages show (``ray start``, ``ray stop``), from Ray's own parser."""
    from ray.scripts.scripts import start, stop

    return {o for command in (start, stop) for p in command.params for o in p.opts if o.startswith("--")}


def _bench_options() -> set[str]:
    """The options the scripts in ``bench/`` declare (``add_argument("--x", ...)``), read from their source."""
    return {o for path in (ROOT / "bench").glob("*.py")
            for o in re.findall(r"add_argument\(\s*\"(--[a-z][a-z0-9-]*)\"", path.read_text())}


def _method_flags(line: str) -> set[str]:
    """The flags ``python -m dice_ray.simulate`` generates for the methods a command line imports (``--imports
    toy_method``: the example method of ``tests/``)."""
    from dice_ray.cli.simulate import method_options
    from dice_ray.config import import_modules

    named = re.search(r"--imports\s+([\w.,]+)", line)
    if not named:
        return set()
    sys.path.insert(0, str(ROOT / "tests"))
    import_modules(named.group(1).split(","))
    return {flag for flag, *_ in method_options()}


def unknown_options(docs: Path = ROOT / "docs", readme: Path = ROOT / "README.md") -> list[str]:
    """'page: option' for every ``--option`` a page names that no parser has: in a ``python -m dice_ray.X`` command
    (checked against X's parser) or in inline code (checked against all of them)."""
    known = {command.split()[-1]: {o for a in parser._actions for o in a.option_strings}
             for command, parser in parsers()}
    every = set().union(*known.values()) | OTHER_OPTIONS | _ray_options() | _bench_options()
    problems = []
    for path in [readme, *sorted(docs.rglob("*.md"))]:
        text = path.read_text().replace("\\\n", " ")  # shell line continuations
        for line in text.splitlines():
            command = re.search(r"python -m (dice_ray\.(?:simulate|analyze|sweep))\b(.*)", line)
            if command:
                flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", command.group(2).split("#")[0].split("`")[0]))
                unknown = flags - known[command.group(1)]
                unknown -= _method_flags(line) if unknown else set()  # (imported only when some flag needs it)
                problems += [f"{path.name}: {f}" for f in unknown]
            for code in re.findall(r"`([^`]*)`", line):
                flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", code))
                problems += [f"{path.name}: {f}" for f in flags - every]
    return sorted(set(problems))


PAGES = {"reference/cli.md": cli_markdown, "reference/config.md": config_markdown,
         "reference/tables.md": tables_markdown}
# figures that live beside the sweep files; copied into the site, not into docs/
FIGURES = {"results/lr_batch.png": ROOT / "sweeps" / "lr_batch.png",
           "results/anomaly_fraction.png": ROOT / "sweeps" / "anomaly_fraction.png"}


def write(folder: Path) -> None:
    for name, make in PAGES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(make())


if __name__ == "__main__" and len(sys.argv) > 1:
    write(Path(sys.argv[1]))
else:
    try:
        import mkdocs_gen_files
    except ImportError:  # imported by the tests without mkdocs
        mkdocs_gen_files = None
    if mkdocs_gen_files is not None and __name__ != "gen_reference":
        for _name, _make in PAGES.items():
            with mkdocs_gen_files.open(_name, "w") as _file:
                _file.write(_make())
            mkdocs_gen_files.set_edit_path(_name, "gen_reference.py")
        for _problem in unknown_options():  # a warning fails `mkdocs build --strict`
            logging.getLogger("mkdocs.plugins.gen_reference").warning("unknown command-line option: %s", _problem)
        for _name, _source in FIGURES.items():
            if _source.exists():
                with mkdocs_gen_files.open(_name, "wb") as _file:
                    _file.write(_source.read_bytes())
