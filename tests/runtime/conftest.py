"""Runtime fixtures: the `overlap` fixture runs a test with async scheduling off and on."""

from __future__ import annotations

import pytest

from kiln.runtime.engine import LLMEngine


@pytest.fixture(params=[False, True], ids=["sync", "overlap"])
def overlap(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Every LLMEngine the test builds (directly, or through LLM / AsyncLLMEngine) gets async_scheduling
    = the parameter unless the test sets it; tokens and finishes must not depend on it."""
    init = LLMEngine.__init__

    def with_mode(self: LLMEngine, *args, **kwargs) -> None:
        kwargs.setdefault("async_scheduling", request.param)
        init(self, *args, **kwargs)

    monkeypatch.setattr(LLMEngine, "__init__", with_mode)
    return request.param
