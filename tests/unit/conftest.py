"""Unit tests run without Ray or NATS: refuse them, like Ray Serve's unit suite does."""

import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unit tests must not start Ray; move the test to tests/integration")

    monkeypatch.setattr(ray, "init", refuse)
