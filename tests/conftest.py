"""Shared fixtures. Real clips live outside the repo; CI must fail (not skip) when they are missing."""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
VIDEOS_DIR = Path(os.environ.get("MASKLET_TEST_VIDEOS", REPO_ROOT.parent / "shared" / "videos"))


@pytest.fixture(scope="session")
def videos_dir() -> Path:
    clips = sorted(VIDEOS_DIR.glob("*.mp4"))
    if not clips:
        raise FileNotFoundError(
            f"test videos not found in {VIDEOS_DIR}; set MASKLET_TEST_VIDEOS to the folder holding the shared clips"
        )
    return VIDEOS_DIR


@pytest.fixture(scope="session")
def video_paths(videos_dir) -> list[Path]:
    return sorted(videos_dir.glob("*.mp4"))
