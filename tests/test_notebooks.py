"""The Colab notebooks execute top to bottom on CPU, so they cannot rot."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

COLAB = Path(__file__).resolve().parents[1] / "colab"


@pytest.mark.parametrize("name", ["quickstart", "tpu"])
def test_notebook_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Execute every cell; any exception or failed assertion in a cell fails the test."""
    monkeypatch.setenv("JAXCKPT_CACHE", os.environ.get("JAXCKPT_CACHE", str(tmp_path / "cache")))
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the notebooks choose their own devices
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # their mkdtemp runs land here, not in /tmp for good
    nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "jaxckpt ready" in outputs
    assert list(tmp_path.glob("jaxckpt-*")), "the notebook's run directory was not made under TMPDIR"
