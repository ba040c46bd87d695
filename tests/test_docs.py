from pathlib import Path

from raytune_it.config.reference import config_reference_markdown

ROOT = Path(__file__).parents[1]


def test_readme_config_reference_matches_the_schema():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert config_reference_markdown() in readme, (
        "README's configuration table is stale: regenerate it with "
        "python -m raytune_it.config.reference --update README.md")


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for command in ("python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e .",
                    "pip install -c constraints.txt -e '.[test,trackers]' && python -m pytest"):
        assert command in readme and command in ci
