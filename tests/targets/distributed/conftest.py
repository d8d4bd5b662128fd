"""Fixtures of the distributed tests; puts this directory's helpers (dist_helpers) on sys.path."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dist_helpers import converted_t5  # noqa: E402

import moeify  # noqa: E402
from moeify.targets.distributed.export import export_distributed  # noqa: E402


@pytest.fixture(scope="session")
def t5_source(tmp_path_factory):
    """A saved tiny Switch T5 (4 experts per layer), shared by the tests of this directory."""
    path = tmp_path_factory.mktemp("src") / "switch-t5"
    moeify.save(converted_t5(), path)
    return path


@pytest.fixture(scope="session")
def dist2(t5_source, tmp_path_factory):
    """t5_source exported for 2 ranks with the default plan."""
    return export_distributed(t5_source, tmp_path_factory.mktemp("dist") / "dist2", world_size=2).path
