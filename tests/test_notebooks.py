"""The notebooks run top to bottom in a real Jupyter kernel (nbclient) on the embedded model, and
every figure they draw is a real, non-blank PNG."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(name: str, tmp_path: Path) -> list[bytes]:
    """Execute notebooks/<name> in a python3 kernel; the PNGs of its outputs."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(REPO / "notebooks" / name), as_version=4)
    client = NotebookClient(
        nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    return [
        base64.b64decode(out["data"]["image/png"])
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]


def _check_figures(pngs: list[bytes], expected: int) -> None:
    """Each image is a PNG of a real plot: decodable, at least 300x200, and not one flat colour."""
    import matplotlib.image as mpimg

    assert len(pngs) == expected, len(pngs)
    for png in pngs:
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(io.BytesIO(png), format="png")
        assert img.shape[0] >= 200 and img.shape[1] >= 300, img.shape
        assert float(img[..., :3].std()) > 0.01  # axes, bars and text, not a blank canvas


@pytest.mark.slow
def test_activation_outliers_notebook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, embedded_dir: Path, pride: Path
) -> None:
    """Statistics, two real calibration runs (SmoothQuant, AWQ) with before/after plots, the
    sensitivity ranking and one linear's histograms, on 2 windows."""
    monkeypatch.setenv("QUANTLAB_DATA_DIR", str(pride.parents[1]))
    monkeypatch.setenv("QUANTLAB_NOTEBOOK_WINDOWS", "2")
    monkeypatch.setenv("QUANTLAB_NOTEBOOK_CAL", "2")
    monkeypatch.setenv("QUANTLAB_NOTEBOOK_OUT", str(tmp_path / "runs"))
    _check_figures(_run("activation_outliers.ipynb", tmp_path), 4)
    for name in ("smoothquant", "awq"):
        assert (tmp_path / "runs" / name / "quantlab" / "quant_state.json").is_file()


def test_compare_variants_notebook(tmp_path: Path) -> None:
    """The committed SmolLM2 report.json, two variants: model rows, layer curves, SQNR scatter."""
    _check_figures(_run("compare_variants.ipynb", tmp_path), 2)
