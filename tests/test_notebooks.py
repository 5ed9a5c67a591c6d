"""The notebooks of ``notebooks/``: each ``.ipynb`` is the jupytext pair of its ``.py`` script, stored
without outputs, so that diffs stay readable. (pytest runs the notebooks themselves through nbmake:
``--nbmake`` and ``notebooks`` are in the pytest options of pyproject.toml.)

The ``.py`` files (jupytext "percent" format) are the source. After editing one, regenerate its
notebook, outputs stripped: ``jupytext --to ipynb notebooks/NN_name.py``. After editing a notebook in
Jupyter without jupytext's pairing, ``jupytext --sync notebooks/NN_name.ipynb`` brings the script up
to date; then regenerate the notebook as above to drop its outputs.
"""

from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
IPYNBS = sorted(NOTEBOOKS.glob("*.ipynb"))


def test_every_notebook_has_its_script():
    scripts = {p.stem for p in NOTEBOOKS.glob("*.py")}
    notebooks = {p.stem for p in IPYNBS}
    assert notebooks, f"no notebooks in {NOTEBOOKS}"
    assert notebooks == scripts, (f"unpaired: notebooks without a script {sorted(notebooks - scripts)}, "
                                  f"scripts without a notebook {sorted(scripts - notebooks)}")


@pytest.mark.parametrize("path", IPYNBS, ids=lambda p: p.name)
def test_notebook_is_in_sync_with_its_script(path: Path):
    notebook = nbformat.read(path, as_version=4)
    script = jupytext.read(path.with_suffix(".py"))
    cells = [(c.cell_type, c.source) for c in notebook.cells]
    expected = [(c.cell_type, c.source) for c in script.cells]
    assert cells == expected, (f"{path.name} and {path.with_suffix('.py').name} differ: run "
                               f"`jupytext --sync notebooks/{path.name}`, then `jupytext --to ipynb "
                               f"notebooks/{path.with_suffix('.py').name}`")
    assert notebook.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", "not a jupytext pair"


@pytest.mark.parametrize("path", IPYNBS, ids=lambda p: p.name)
def test_notebook_has_no_stored_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(notebook.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} have outputs or execution counts; strip them with "
                       f"`jupytext --to ipynb notebooks/{path.with_suffix('.py').name}`")
