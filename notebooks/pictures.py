"""Run the notebooks and save the pictures the README shows: ``python notebooks/pictures.py [NAME ...]``.

A code cell tagged ``picture:NAME`` gives its first image to ``docs/img/NAME.png``. The notebooks
run in a temporary folder (what they write goes there) and stay without outputs themselves.
"""

import base64
import os
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent
PICTURES = NOTEBOOKS.parent / "docs" / "img"


def save_pictures(notebook: Path, workdir: str) -> list[Path]:
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": workdir}}).execute()
    saved = []
    for cell in nb.cells:
        for tag in cell.metadata.get("tags", []):
            if tag.startswith("picture:"):
                png = next(out["data"]["image/png"] for out in cell.outputs if "image/png" in out.get("data", {}))
                path = PICTURES / f"{tag.removeprefix('picture:')}.png"
                path.write_bytes(base64.b64decode(png))
                saved.append(path)
    return saved


def main(names: list[str]) -> None:
    PICTURES.mkdir(parents=True, exist_ok=True)
    # The kernels import this checkout's buildllm, whatever folder they run in.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NOTEBOOKS.parent / "src"), os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as workdir:
        for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
            if not names or notebook.stem in names:
                for path in save_pictures(notebook, workdir):
                    print(path.relative_to(NOTEBOOKS.parent))


if __name__ == "__main__":
    main(sys.argv[1:])
