"""Pipeline: Chaperone's addons registered as one mitmproxy addon behave exactly as the same
addons registered one by one (order, async hooks, a failing child, options), and mitmproxy
visits it once per event."""

from __future__ import annotations

import asyncio
import logging

import pytest
from mitmproxy import exceptions, hooks
from mitmproxy.test import taddons, tflow

from chaperone_sidecar.addons.pipeline import Pipeline


class Logs:
    def __init__(self, name, log):
        self.name_, self.log = name, log

    def requestheaders(self, flow):
        self.log.append((self.name_, "requestheaders"))


class AsyncChild(Logs):
    async def request(self, flow):
        await asyncio.sleep(0)
        self.log.append((self.name_, "request"))


class Failing(Logs):
    def request(self, flow):
        raise RuntimeError("boom")


class WithOption:
    def load(self, loader):
        loader.add_option("pipeline_test_limit", int, 3, "a test option")

    def configure(self, updated):
        from mitmproxy import ctx

        if "pipeline_test_limit" in updated and ctx.options.pipeline_test_limit < 0:
            raise exceptions.OptionsError("pipeline_test_limit must not be negative")


def test_children_run_in_order_awaited_and_a_failure_does_not_stop_the_rest(caplog):
    log: list = []
    pipeline = Pipeline([Logs("a", log), Failing("b", log), AsyncChild("c", log)])
    # Hooks exist only where a child has one.
    assert hasattr(pipeline, "requestheaders") and hasattr(pipeline, "request")
    assert not hasattr(pipeline, "response") and not hasattr(pipeline, "update")
    flow = tflow.tflow()

    async def main():
        with taddons.context(pipeline) as tctx:
            await tctx.master.addons.handle_lifecycle(hooks.UpdateHook([flow]))  # nothing to do
            from mitmproxy.proxy.layers.http import HttpRequestHeadersHook, HttpRequestHook

            with caplog.at_level(logging.ERROR, logger="chaperone.addons"):
                await tctx.master.addons.handle_lifecycle(HttpRequestHeadersHook(flow))
                await tctx.master.addons.handle_lifecycle(HttpRequestHook(flow))

    asyncio.run(main())
    assert log == [("a", "requestheaders"), ("b", "requestheaders"), ("c", "requestheaders"),
                   ("c", "request")]  # b's request raised; c's still ran
    assert "Addon error: boom (Failing.request)" in caplog.text and "RuntimeError" in caplog.text


class ReturnsAwaitable(Logs):
    def request(self, flow):  # not a coroutine function, but hands back an awaitable
        async def later():
            self.log.append((self.name_, "request"))
        return later()


class FailsAsync(Logs):
    async def request(self, flow):
        raise RuntimeError("async boom")


def test_coroutine_children_are_awaited_without_asking_isawaitable(monkeypatch):
    """Issue 16: the dispatcher knows which children are coroutine functions; isawaitable is
    asked only of what other handlers return (and a sync handler's awaitable is awaited)."""
    import inspect

    asked: list = []
    real = inspect.isawaitable
    monkeypatch.setattr(inspect, "isawaitable", lambda obj: asked.append(obj) or real(obj))
    log: list = []
    pipeline = Pipeline([AsyncChild("a", log), ReturnsAwaitable("b", log), FailsAsync("c", log),
                         AsyncChild("d", log)])
    asyncio.run(pipeline.request(tflow.tflow()))
    assert log == [("a", "request"), ("b", "request"), ("d", "request")]
    assert len(asked) == 1  # b's result only


def test_options_of_children_are_loaded_and_validated():
    with taddons.context(Pipeline([WithOption()])) as tctx:
        assert tctx.options.pipeline_test_limit == 3
        tctx.configure(tctx.master.addons.get("chaperone"), pipeline_test_limit=5)
        assert tctx.options.pipeline_test_limit == 5
        with pytest.raises(exceptions.OptionsError, match="must not be negative"):
            tctx.configure(tctx.master.addons.get("chaperone"), pipeline_test_limit=-1)


def test_an_async_load_or_configure_is_refused_at_construction():
    class AsyncConfigure:
        async def configure(self, updated):
            pass

    with pytest.raises(TypeError, match="configure is called synchronously"):
        Pipeline([AsyncConfigure()])


def test_the_real_addons_in_order_and_get():
    from chaperone_sidecar.addons import ADDON_ORDER, build_addons
    from chaperone_sidecar.config import SidecarConfig
    from chaperone_sidecar.services import SidecarServices
    from chaperone_sidecar.sources import Sources

    services = SidecarServices(config=SidecarConfig(standalone=True), sources=Sources("ns"))
    children = build_addons(services)
    pipeline = Pipeline(children)
    assert [type(c) for c in pipeline.children] == list(ADDON_ORDER)
    mask = next(c for c in children if type(c).__name__ == "Mask")
    assert pipeline.get("mask") is mask and pipeline.get("nope") is None
    for hook in ("requestheaders", "request", "responseheaders", "response", "error", "running", "done"):
        assert callable(getattr(pipeline, hook)), hook
