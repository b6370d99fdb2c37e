"""The multi-GPU benchmark commands refuse, with one readable line and a non-zero exit, on a host
with fewer GPUs than they need (their runs are for a lent multi-GPU machine)."""
from __future__ import annotations

import pytest
import torch

from epserve.cli import main

have = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("argv, need", [(["bench", "deepep"], 8), (["bench", "deepep", "--gpus", "4"], 4),
                                        (["bench", "step", "--gpus", "2"], 2),
                                        (["bench", "overlap", "--gpus", "2"], 2)])
def test_too_few_gpus_is_one_line_and_non_zero(argv, need, capsys):
    if have >= need:
        pytest.skip(f"this host has {have} GPUs")
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"needs {need} GPUs on this host, it has {have}" in err[0], err
