"""The digest that names a model folder: the same model is the same digest wherever it lies.

The coordinator's plan names its model by this digest (`task.model_digest`), never by where
the coordinator keeps it: a deployed site loads its own copy (its own `task.model`, or the
bundled all-MiniLM-L6-v2) and declines with kind `model` when the digests differ, before it
reads a record. The digest is sha256 over, in this order, each file's name, size and bytes:
config.json, the weights `from_pretrained` reads (the first of task.model.WEIGHT_FILES present,
or config.json's `transformers_weights`; an index is followed by its shards, sorted), and the
tokenizer files present (the vocabulary decides what the model reads). Hashing a 90 MB folder
takes a fraction of a second; the result is kept per folder, keyed by every file's (size,
mtime), so a file changed in place is hashed again.

`fedshield model-digest DIR` prints it (site operators check their copy with it).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from fedshield.task.model import WEIGHT_FILES, ModelError, check_model_folder

TOKENIZER_DIGEST_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
CHUNK = 1 << 20


def digest_files(folder: Path) -> list[Path]:
    """The files the digest covers, in digest order (the folder is assumed checked)."""
    config = folder / "config.json"
    files = [config]
    try:
        explicit = json.loads(config.read_text(encoding="utf-8")).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        explicit = None
    weights = explicit if isinstance(explicit, str) else next(
        (n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is not None:
        files.append(folder / weights)
        if weights.endswith(".index.json"):
            try:
                shards = json.loads((folder / weights).read_text(encoding="utf-8")).get("weight_map", {})
            except (OSError, ValueError, AttributeError):
                shards = {}
            files += [folder / s for s in sorted({str(v) for v in shards.values()})]
    files += [folder / n for n in TOKENIZER_DIGEST_FILES if (folder / n).is_file()]
    return files


# resolved folder -> (((name, size, mtime_ns), ...), digest)
_CACHE: dict[str, tuple[tuple[tuple[str, int, int], ...], str]] = {}


def folder_digest(folder: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a model folder's config, weights and tokenizer files (module docstring)."""
    path = Path(folder).resolve()
    files = digest_files(path)
    try:
        stats = tuple((f.name, st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()])
    except OSError as e:
        raise ModelError(f"task.model={str(folder)!r}: cannot read {e.filename}: {e.strerror}") from None
    kept = _CACHE.get(str(path))
    if kept is not None and kept[0] == stats:
        return kept[1]
    h = hashlib.sha256()
    for f, (name, size, _) in zip(files, stats, strict=True):
        h.update(f"{name}\0{size}\0".encode())
        try:
            with open(f, "rb") as stream:
                while chunk := stream.read(CHUNK):
                    h.update(chunk)
        except OSError as e:
            raise ModelError(f"task.model={str(folder)!r}: cannot read {name}: {e.strerror}") from None
    if len(_CACHE) >= 16:
        _CACHE.clear()
    _CACHE[str(path)] = (stats, h.hexdigest())
    return h.hexdigest()


def checked_digest(folder: str | os.PathLike[str]) -> str:
    """The digest of a folder checked as a model folder first (one line if it is not one)."""
    return folder_digest(check_model_folder(folder, where=f"model folder {str(folder)!r}"))
