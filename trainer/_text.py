"""Which files of ``data.path`` are text: the byte-level and the tokenizer-backed sources read the same."""
from __future__ import annotations

from pathlib import Path

from trainer._errors import DataError

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".yaml", ".yml", ".csv", ".html", ".c", ".h")


def text_files(path: str | Path) -> list[Path]:
    """``path`` itself if it is a file, else the text files under it, sorted.

    Raises:
      DataError: ``path`` does not exist.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data.path {str(path)!r} does not exist; point it at a text file or folder")
    return [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES)
