"""The configuration reference table (README), generated from the schema itself.

A test checks that the README holds exactly this table, so the documentation
cannot drift from the code.
"""

from __future__ import annotations

from pydantic import BaseModel

from raytune_it.config.schema import JobConfig


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return ""
    else:
        value = field.default
    return f"`{value!r}`" if value is not None else "unset"


def config_reference_markdown() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, field in JobConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if not annotation.model_fields:
                lines.append(f"| `{name}.*` | | {(annotation.__doc__ or '').strip()} |")
            for key, sub in annotation.model_fields.items():
                lines.append(f"| `{name}.{key}` | {_default(sub)} | {sub.description or ''} |")
        else:
            lines.append(f"| `{name}` | {_default(field)} | {field.description or ''} |")
    return "\n".join(lines) + "\n"


START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def table_in(text: str) -> str | None:
    """The table between the reference markers of a Markdown text, or None without both markers."""
    if START not in text or END not in text.partition(START)[2]:
        return None
    return text.partition(START)[2].partition(END)[0].removeprefix("\n")


def update_file(path: str) -> None:
    """Replace the table between the reference markers in a Markdown file."""
    from pathlib import Path

    target = Path(path)
    text = target.read_text(encoding="utf-8")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    target.write_text(f"{head}{START}\n{config_reference_markdown()}{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--update":
        update_file(sys.argv[2])
    else:
        print(config_reference_markdown(), end="")
