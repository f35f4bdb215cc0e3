"""A stand-in for the capture engine, shared by the probe tests: it records the handlers a probe registers (with
their layers, query selectors and logits declarations) so that planted tensors can be fed to them directly."""

from __future__ import annotations

from types import SimpleNamespace


class FakeCapture:
    """Records ``on(site, fn, ...)`` calls as ``handlers`` (``site``, ``fn``, ``layers``, ``queries``, ``logits``)."""

    def __init__(self):
        self.handlers: list[SimpleNamespace] = []

    def on(self, site, fn, *, layers=None, queries=None, logits="all"):
        self.handlers.append(
            SimpleNamespace(
                site=site, fn=fn, layers=None if layers is None else set(layers), queries=queries, logits=logits
            )
        )
        return self

    def of(self, site: str) -> list[SimpleNamespace]:
        """The handlers registered on ``site``, in order."""
        return [h for h in self.handlers if h.site == site]
