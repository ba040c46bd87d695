from pathlib import Path

from raytune_it.config.reference import config_reference_markdown, table_in

ROOT = Path(__file__).parents[1]


def test_readme_config_reference_matches_the_schema():
    """The README holds exactly the generated table: no row missing, changed or left over."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert table_in(readme) == config_reference_markdown(), (
        "README's configuration table is stale: regenerate it with "
        "python -m raytune_it.config.reference --update README.md")


def test_a_stale_row_left_in_the_table_is_caught():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    stale = readme.replace(config_reference_markdown(), config_reference_markdown() + "| `lora.int8` | | gone |\n")
    assert stale != readme and table_in(stale) != config_reference_markdown()


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for command in ("python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e .",
                    "pip install -c constraints.txt -e '.[test,trackers,lint]' && ruff check . && mypy && "
                    "python -m pytest --durations=25"):
        assert command in readme and command in ci
