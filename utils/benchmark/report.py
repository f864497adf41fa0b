"""The benchmark's figures as a Markdown table."""

from __future__ import annotations

from typing import Any

from utils.benchmark.registry import SECTIONS


def _cell(value: Any, unit: str = "") -> str:
    """A figure as table text: "-" for a skipped one, two decimals below 100."""
    if value is None or value == "":
        return "-" if value is None else ""
    return f"{value:,.2f}{unit}" if unit or value < 100 else f"{value:,.0f}"


def markdown_table(doc: dict[str, Any]) -> str:
    """The figures as a Markdown table, under a line naming the machine they came from."""
    info, settings = doc["machine"], doc["settings"]
    rows = [row for section in SECTIONS for row in section.rows(doc)]
    return "\n".join(
        [
            f"Measured on {info['device']} ({info['cpu_count']} CPUs, {settings['threads']} torch "
            f"threads), torch {info['torch']}, commit {info['commit']}, {info['date']}: ResNet-"
            f"{settings['depth']} ({settings['arch']}), {settings['img_h']}x{settings['img_w']}, "
            f"{settings['images_per_step']} images per step.",
            "",
            "| measure | fast | plain | ratio |",
            "|---|---|---|---|",
            *(f"| {what} | {_cell(a)} | {_cell(b)} | {_cell(r, 'x')} |" for what, a, b, r in rows),
        ]
    )
