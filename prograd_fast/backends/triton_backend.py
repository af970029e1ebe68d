"""Placeholder until the triton kernels land: reports itself unavailable."""

from __future__ import annotations


class _Missing:
    name = "triton"

    def available(self) -> str | None:
        return "the triton backend is not built in this version"

    def unsupported(self, step) -> str | None:
        return self.available()

    def step(self, step):
        raise RuntimeError(self.available())


BACKEND = _Missing()
