"""Pipeline: Chaperone's addons behind one mitmproxy addon, dispatched without the fan-out.

mitmproxy hands every hook to every registered addon - ``trigger_event`` walks the chain and,
per addon, enters ``safecall``, creates a coroutine and traverses the addon for a method of
that name - whether or not the addon has one. A flow raises ~8 such events (four HTTP hooks,
each followed by an ``update``) plus the connection's TLS and connect hooks, and Chaperone's
eight addons answer only a few of them, so most of that work finds nothing. Registered as one
addon, the pipeline costs one visit per event, and its methods exist only for hooks some
child implements, each calling exactly those children in the documented order.

Semantics are mitmproxy's own, child by child: handlers run in order, awaited when they return
an awaitable; an exception is logged ("Addon error: ...", with its traceback) and the next
child still runs, as ``safecall`` does, so a failing Mask never keeps Record from recording;
``AddonHalt`` and ``OptionsError`` propagate (the latter rejects a bad option value in
``configure``). ``load`` and ``configure`` are called synchronously, as mitmproxy requires.

The children are not registered with mitmproxy (no ``addons`` attribute, which mitmproxy
would traverse on every event again), so ``master.addons.get`` knows only ``chaperone``; use
:meth:`Pipeline.get` for a child.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

from mitmproxy import exceptions, hooks

__all__ = ["Pipeline"]

log = logging.getLogger("chaperone.addons")

_PROPAGATE = (exceptions.AddonHalt, exceptions.OptionsError)


def _failed(child: Any, hook: str, exc: BaseException) -> None:
    log.error("Addon error: %s (%s.%s)", exc, type(child).__name__, hook, exc_info=exc)


def _sync_dispatcher(hook: str, handlers: list[tuple[Any, Callable]]) -> Callable:
    def dispatch(*args: Any) -> None:
        for child, handler in handlers:
            try:
                handler(*args)
            except _PROPAGATE:
                raise
            except Exception as exc:  # noqa: BLE001 - mitmproxy's safecall, per child
                _failed(child, hook, exc)
    return dispatch


def _async_dispatcher(hook: str, handlers: list[tuple[Any, Callable]]) -> Callable:
    # Coroutine functions are awaited without asking ``inspect.isawaitable`` (a Python-level
    # check per child and hook, ~30 per flow; issue 16); other handlers as mitmproxy does.
    plan = [(child, handler, inspect.iscoroutinefunction(handler)) for child, handler in handlers]

    async def dispatch(*args: Any) -> None:
        for child, handler, is_coroutine in plan:
            try:
                if is_coroutine:
                    await handler(*args)
                    continue
                result = handler(*args)
                if result is not None and inspect.isawaitable(result):
                    await result
            except _PROPAGATE:
                raise
            except Exception as exc:  # noqa: BLE001 - mitmproxy's safecall, per child
                _failed(child, hook, exc)
    return dispatch


class Pipeline:
    """The addons of :func:`~chaperone_sidecar.addons.build_addons`, as one mitmproxy addon."""

    name = "chaperone"

    def __init__(self, children: Iterable[Any]) -> None:
        self.children = list(children)
        names = {n for child in self.children for n in dir(child) if n in hooks.all_hooks}
        for hook in sorted(names):
            handlers = [(child, getattr(child, hook)) for child in self.children
                        if callable(getattr(child, hook, None))]
            if not handlers:
                continue
            is_async = any(inspect.iscoroutinefunction(h) for _, h in handlers)
            if is_async and hook in ("load", "configure"):
                raise TypeError(f"{hook} is called synchronously by mitmproxy; an async one cannot be")
            make = _async_dispatcher if is_async else _sync_dispatcher
            setattr(self, hook, make(hook, handlers))

    def get(self, name: str) -> Any:
        """The child addon whose class is ``name`` (case-insensitive), or None."""
        return next((c for c in self.children if type(c).__name__.lower() == name.lower()), None)

    def __repr__(self) -> str:
        return f"Pipeline({', '.join(type(c).__name__ for c in self.children)})"
