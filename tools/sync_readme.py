"""Rewrite the README's config reference from the config dataclasses (the test keeps them equal)."""

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spa_ray.pipeline.config import SPAConfig  # noqa: E402
from spa_ray.config.tree import reference_markdown  # noqa: E402

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def render(readme: str) -> str:
    block = f"{START}\n{reference_markdown(SPAConfig)}\n{END}"
    return re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, readme, flags=re.S)


if __name__ == "__main__":
    path = REPO / "README.md"
    path.write_text(render(path.read_text()))
