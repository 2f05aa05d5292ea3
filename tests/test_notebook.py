"""docs/backprop-attention.ipynb runs top to bottom: every cell asserts what it shows, so the notebook
cannot drift from the code it walks through. Needs the dev extra (nbclient, ipykernel)."""
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e '.[dev]')")
import nbformat  # noqa: E402  (installed with nbclient)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "backprop-attention.ipynb"


def test_the_backprop_notebook_runs_and_every_cell_assertion_holds():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    # Runs from the repository root, so it imports this checkout's minisft; raises on the first failing cell.
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "finite differences vs dqkv over all 126 entries" in printed
