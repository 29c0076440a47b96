"""fastvit_reduce.settings: the declared keys of the data and resolution sections."""
from __future__ import annotations

import pytest

from fastvit_reduce.config import ConfigError, load_config, resolved


def test_config_sections():
    load_config(["--data.order=quasi_random", "--resolution.step=8", "--data.rrc_scale=0.25,1"],
                sections=["data", "resolution"])
    values = resolved(["data", "resolution"])
    assert values["data.order"] == "quasi_random" and values["resolution.step"] == 8
    assert values["data.rrc_scale"] == [0.25, 1.0] and values["data.in_memory"] is True
    with pytest.raises(ConfigError, match="data.order"):
        load_config(["--data.order=sequential"], sections=["data"])
