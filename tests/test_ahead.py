"""fastvit_reduce.data.ahead: the batch-ahead thread."""
from __future__ import annotations

import torch

from fastvit_reduce.data.ahead import Ahead


def test_batch_ahead_thread_runs_torch_on_one_thread():
    """The stepping thread's OpenMP team must stay the only one (loaders.one_torch_thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ahead = Ahead(lambda: (torch.get_num_threads() for _ in range(3)))
        seen = list(ahead)
        ahead.close()
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
