"""Test helper, launched by torchrun in tests/test_distributed.py: the real ``samft`` command line, except
that rank 1 fails with a DataError in its second optimizer step (a stand-in for an unreadable image)."""

import os
import sys

import samft.engine.train.loop as train_module
from samft.cli import main
from samft.errors import DataError

_real_step = train_module.train_step
_calls = {"n": 0}


def _failing_step(*args, **kwargs):
    _calls["n"] += 1
    if os.environ.get("RANK") == "1" and _calls["n"] == 2:
        raise DataError("broken.png: not an image (deliberate failure on rank 1)")
    return _real_step(*args, **kwargs)


train_module.train_step = _failing_step
sys.argv = ["samft", *sys.argv[1:]]
main()
