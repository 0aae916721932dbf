"""Test-session settings.

- Every on-disk cache goes to a temporary folder, never the user's.
- Torch runs on one thread: the test models are tiny, so threads only add synchronisation, and on a busy
  2-core machine two threads per process wait on each other (a forward measured 1 ms on one thread and
  0.5 s on two). Child processes inherit the setting through OMP_NUM_THREADS.
- A run draws ``curves.png`` at each evaluation and at its end, which costs about a second of CPU: only
  tests marked ``curves`` (those that look at it) draw it; elsewhere the drawing is skipped.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _isolated_user_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("user-cache")
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(autouse=True)
def _curves_only_where_asked(request, monkeypatch):
    if request.node.get_closest_marker("curves") is None:
        import dpo.train.curves

        monkeypatch.setattr(dpo.train.curves, "write_run_curves", lambda run_dir, log=None: None)
