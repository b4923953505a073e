"""Writes quickstart.ipynb from quickstart.py (one code cell per numbered step, outputs cleared),
so that the notebook and the script never differ; python/tests checks that they agree.

    python examples/python/notebook.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def notebook(script: str) -> dict:
    """The notebook of `script`: its docstring as a markdown cell, then a code cell per step."""
    end = script.index('"""', 3) + 3
    doc = script[3 : end - 3].strip()
    doc = "\n".join(line for line in doc.splitlines() if "quickstart.py [OUT" not in line)
    body = script[end:]
    # In a notebook: the repository from the working directory, the output beside it, inline plots.
    body = body.replace("import sys\n", "").replace('matplotlib.use("Agg")\n', "")
    body = body.replace(
        "REPO = Path(__file__).resolve().parents[2]",
        'REPO = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "examples" / "data").is_dir())',
    )
    body = body.replace(
        'out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "out" / "python-quickstart"',
        'out = REPO / "out" / "python-quickstart"',
    )
    body = body.replace(
        "# Training epochs (the demo, which has trained the same model from the command line, runs 30).\n"
        "epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 100",
        "epochs = 100",
    )
    cells = [{"cell_type": "markdown", "metadata": {}, "source": _lines("# cpa-stream quickstart\n\n" + doc)}]
    for part in re.split(r"\n(?=# \d\. )", body):
        part = part.strip("\n")
        if part:
            cells.append({"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                          "source": _lines(part)})
    return {
        "cells": cells,
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                     "language_info": {"name": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def _lines(text: str) -> list[str]:
    lines = text.splitlines()
    return [line + "\n" for line in lines[:-1]] + lines[-1:]


def render(script_path: Path = HERE / "quickstart.py") -> str:
    return json.dumps(notebook(script_path.read_text()), indent=1) + "\n"


if __name__ == "__main__":
    target = HERE / "quickstart.ipynb"
    target.write_text(render())
    print(f"wrote {target}", file=sys.stderr)
