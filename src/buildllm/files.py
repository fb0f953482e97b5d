"""Files: written so that a crash at any moment leaves the old file or the new one, never half of
one; and JSON read with one clear error line for whatever is wrong with it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from buildllm.errors import UserError


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; give it the usual permissions
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically (the one JSON writer of the package)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_safetensors(path: str | os.PathLike, tensors: dict) -> None:
    """Write ``tensors`` (name -> tensor) as a .safetensors file, atomically: the one weights writer.

    Tensors are made contiguous and moved to the CPU first, as safetensors needs. The metadata
    ``"format": "pt"`` tells transformers these are PyTorch tensors (it refuses files without it).
    """
    from safetensors.torch import save_file

    state = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


def read_json_object(path: str | os.PathLike, what: str = "") -> dict:
    """The JSON object in ``path``; ``UserError`` naming ``what`` the file is when it is not one."""
    label = f"{what} {path}" if what else str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {label}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{label} does not hold a JSON object")
    return data


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
