"""Point docs/backprop.md's links to backends/numpy_backend.py at the current line of each
function they name (run after editing the numpy backend; tests/test_study.py checks the links).

    python tools/relink_docs.py
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC, SOURCE = ROOT / "docs" / "backprop.md", ROOT / "backends" / "numpy_backend.py"
LINK = re.compile(r"\[`(\w+)`\]\(\.\./backends/numpy_backend\.py#L\d+\)")


def main() -> None:
    lines = SOURCE.read_text(encoding="utf-8").splitlines()
    where = {m.group(1): i + 1 for i, line in enumerate(lines) if (m := re.match(r"\s*def (\w+)\(", line))}
    text = DOC.read_text(encoding="utf-8")
    DOC.write_text(LINK.sub(lambda m: f"[`{m.group(1)}`](../backends/numpy_backend.py#L{where[m.group(1)]})", text),
                   encoding="utf-8")


if __name__ == "__main__":
    main()
