"""Shared test fixtures: where the real data lives, and the tiny model configs the tests use."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the repository (read-only; never copied into the repo).
SHARED_DATA = Path(os.environ.get("MINISFT_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "instruction-data.json").is_file():
        pytest.fail(f"the shared data folder {SHARED_DATA} is missing: it must sit beside the repository "
                    "as ../shared/data (or set MINISFT_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _tiktoken_cache():
    # The GPT-2 tokenizer offline: tiktoken reads its files from this cache instead of the network.
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken_cache"))
