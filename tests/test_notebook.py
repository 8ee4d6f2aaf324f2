"""The demo notebook runs top to bottom (its own asserts check the edit)."""
import nbformat
from nbclient import NotebookClient

from tests.conftest import REPO, TEST_STATS_SAMPLES


def test_notebook_executes():
    notebook = nbformat.read(REPO / "notebooks" / "memit.ipynb", as_version=4)
    # Parameter injection: the suite's statistics sample count, so the cached statistics are reused.
    (cell,) = [c for c in notebook.cells if "MEMITHyperParams.preset" in c.source]
    cell.source = cell.source.replace(
        "hparams.layers, hparams.mom2_update_weight", f"hparams.mom2_n_samples = {TEST_STATS_SAMPLES}"
    )
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    assert "After the edit" in outputs and "'LeBron James plays the sport of': ' football'" in outputs
