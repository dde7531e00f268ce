"""Fixtures for the model tests.

TEMPORARY (issue 15, delete once `rwkv_infctx/ops/wkv7/chunked.py` is merged): the WKV-7 dispatch
imports `rwkv_infctx.ops.wkv7.chunked` for the default backend "auto", and that module is written
on another branch. Until it lands, a stand-in module whose `wkv7_chunked` is the per-token reference
lets CLI commands (generate, eval-positions), which always use "auto", run RWKV-7 files. Where the
real module exists this fixture does nothing.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest

from rwkv_infctx.ops.wkv7 import wkv7_reference

CHUNKED = "rwkv_infctx.ops.wkv7.chunked"


@pytest.fixture(autouse=True)
def _wkv7_auto_falls_back_to_the_reference(monkeypatch):
    """TEMPORARY: "auto" runs the reference WKV-7 while ops/wkv7/chunked.py is not in this tree."""
    if CHUNKED in sys.modules or importlib.util.find_spec(CHUNKED) is not None:
        return
    stand_in = types.ModuleType(CHUNKED)
    stand_in.wkv7_chunked = wkv7_reference
    monkeypatch.setitem(sys.modules, CHUNKED, stand_in)
