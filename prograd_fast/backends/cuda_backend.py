"""Placeholder until the cuda kernels land: reports itself unavailable."""

from __future__ import annotations


class _Missing:
    name = "cuda"

    def available(self) -> str | None:
        return "the cuda backend is not built in this version"

    def unsupported(self, step) -> str | None:
        return self.available()

    def step(self, step):
        raise RuntimeError(self.available())


BACKEND = _Missing()
