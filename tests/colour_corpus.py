"""A small colour corpus for tests: Noto Color Emoji glyphs rendered by bench/build_emoji_corpus.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "build_emoji_corpus.py"


def _builder() -> ModuleType:
    """bench/build_emoji_corpus.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("build_emoji_corpus", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def emoji_folder(tmp_path: Path, n: int = 300, size: int = 32) -> Path:
    """tmp_path/emoji holding n RGB emoji PNGs of size x size (the same n for the same arguments);
    skips the test when the font is not installed (`make test` installs it)."""
    build = _builder()
    if not build.FONT.is_file():
        pytest.skip(f"{build.FONT} is missing: install the Debian package {build.DEBIAN_PACKAGE}")
    folder = tmp_path / "emoji"
    written = build.build_corpus(folder, size=size, limit=n, seed=0)
    assert len(written) == n, f"the font drew {len(written)} emoji, {n} were asked for"
    return folder
