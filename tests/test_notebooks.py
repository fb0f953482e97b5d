"""The walkthrough notebooks: in the stages' order, stored without outputs, shown in the README, and
each one runs top to bottom (an error in any cell fails its test) and draws the pictures it names."""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import buildllm

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
STAGES = ["01_tokenizing_text", "02_embeddings_and_windows", "03_attention", "04_gpt_architecture",
          "05_pretraining", "06_randomness_control", "07_openai_gpt2_weights", "08_finetuning",
          "09_llama_and_qwen"]


def pictures_of(notebook: nbformat.NotebookNode) -> list[str]:
    """The pictures the README may show: cells tagged ``picture:NAME`` (notebooks/pictures.py)."""
    return [tag.removeprefix("picture:") for cell in notebook.cells
            for tag in cell.metadata.get("tags", []) if tag.startswith("picture:")]


def test_one_notebook_per_stage_in_order():
    assert [path.stem for path in NOTEBOOKS] == STAGES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for i, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name}, cell {i}: clear its outputs before committing (Jupyter: Edit > Clear Outputs of All Cells)")


def test_the_readme_links_each_notebook_with_one_of_its_pictures():
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        pictures = pictures_of(nbformat.read(path, as_version=4))
        assert pictures, f"{path.name} has no cell tagged picture:NAME"
        for name in pictures:
            assert (ROOT / "docs" / "img" / f"{name}.png").is_file(), f"run python notebooks/pictures.py {path.stem}"
        assert f"](notebooks/{path.name})" in readme, f"the README does not link {path.name}"
        shown = set(re.findall(r"!\[[^\]]*\]\(docs/img/([\w-]+)\.png\)", readme))
        assert shown & set(pictures), f"the README shows none of {path.name}'s pictures {pictures}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder for all the notebooks, as for a reader who runs them in order: notebook 6 picks up
    notebook 5's finished run there instead of training it again."""
    return tmp_path_factory.mktemp("notebooks")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_runs_top_to_bottom(path, workdir, monkeypatch):
    # Jupyter's own inline backend: headless, and each drawn figure becomes a PNG output to check.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # The notebooks' models are tiny: one thread, as in the rest of the suite (conftest.one_thread).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The kernel imports the buildllm under test, whatever folder it runs in.
    src = str(Path(buildllm.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(path, as_version=4)
    # Raises CellExecutionError, naming the cell, at the first error.
    NotebookClient(notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    for cell in notebook.cells:
        if any(tag.startswith("picture:") for tag in cell.metadata.get("tags", [])):
            images = [out for out in cell.outputs if "image/png" in out.get("data", {})]
            assert len(images) == 1, f"{path.name}: the cell tagged {cell.metadata.tags} drew {len(images)} pictures"
