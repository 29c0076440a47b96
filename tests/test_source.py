"""fastvit_reduce.data.source: how batches meet the step (training.overlap)."""
from __future__ import annotations

import pytest

from fastvit_reduce.config import ConfigError
from fastvit_reduce.data.source import overlap_mode


def test_overlap_none_needs_a_source_that_can_take_turns():
    assert overlap_mode("none", True) == "none" and overlap_mode("ahead", False) == "ahead"
    with pytest.raises(ConfigError, match="overlap=none"):
        overlap_mode("none", False)  # timm's loader (bench e2e) cannot
