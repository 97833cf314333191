"""The process a command runs in: the thread count a config asks for."""

from __future__ import annotations

import torch

from paws import runtime
from paws.config import load_config

_cores = runtime.usable_cores


def test_more_threads_than_cores_use_the_cores_and_say_so(capsys) -> None:
    before = torch.get_num_threads()
    try:
        runtime.setup(load_config(None, ["run.threads=1024", "run.device=cpu"]))
        assert torch.get_num_threads() == min(1024, _cores())
        if _cores() < 1024:
            err = capsys.readouterr().err
            assert f"run.threads is 1024 but this process has {_cores()} cores" in err
    finally:
        torch.set_num_threads(before)


def test_threads_within_the_cores_are_kept_as_asked(capsys) -> None:
    assert runtime.thread_count(1) == 1
    assert capsys.readouterr().err == ""
