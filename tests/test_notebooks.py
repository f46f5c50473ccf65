"""The notebooks run top to bottom on CPU (nbclient, a fresh kernel each) and are stored without
outputs. Each starts what it needs (the quickstart its own Ray cluster and Serve app)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["quickstart", "pipelines"]
CELL_TIMEOUT_S = 240          # a give-up bound per cell (Serve start-up on a busy 2-core runner), not a speed check


def load(name: str):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    nb = load(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, name
    for c in code:
        assert c.get("outputs") == [] and c.get("execution_count") is None, f"{name}: clear outputs ({c.source[:60]!r})"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name):
    nb = load(name)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, startup_timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()          # raises CellExecutionError with the failing cell's traceback
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "data" in o and "image/png" in o.data]
    assert images, f"{name} shows no image inline"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    if name == "quickstart":
        assert "404 not_found_error" in text and "is up at http://127.0.0.1:" in text
    else:
        assert "hit:" in text and "miss:" in text and "blocks run" in text
