"""A flow's finished span handed to the tracer's span processors without the SDK's ``Span``.

Why: the Telemetry addon creates one span per flow when the flow has ended, with its start and
end times and ~25 attributes. Through ``Tracer.start_span`` + ``end`` the SDK builds a mutable
``Span`` with a lock, validates every attribute into ``BoundedAttributes`` (a type check and a
copy per value) and then copies it into a ``ReadableSpan`` for the processors - the largest
part of telemetry's CPU per flow on the event loop once export and metrics were cheap
(docs/benchmarks.md, "Telemetry, session 5": ~50-75 µs of the hook's CPU per flow under load).

:meth:`FlowSpans.emit` does what ``start_span`` + ``end`` do for such a span, in the SDK's order
(opentelemetry-sdk 1.45, pinned in constraints.txt): the parent from the current context, the
trace id from it or the provider's id generator, the provider's sampler (so
``OTEL_TRACES_SAMPLER`` holds; a sampler's own attributes and trace state are kept), the trace
flags (sampled, random trace id), the span id, and one ``ReadableSpan`` given to the processors'
``on_end``. The attributes are the sampler's result as the SDK would hold them: values of the
plain types (str, int, float, bool) are kept as they are (a str cut at the span attribute
length limit, as ``BoundedAttributes`` cuts it); anything else, or more attributes than the
count limit, goes through ``BoundedAttributes`` itself. It falls back to ``start_span`` +
``end`` whenever the shortcut would not be the same: a tracer that is not the SDK's, a tracer
switched off by its configurator, the SDK's self-metrics on
(``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED``), or a span processor other than the SDK's batch
and simple ones (theirs do nothing at start; another's ``on_start`` would be skipped).
``tests/sidecar/runtime/test_flow_spans.py`` compares both paths span by span.

The SDK's trace package is used only when it is already loaded (``telemetry_setup`` imports
it when spans are exported): a no-op tracer never brings it into an idle process.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.trace import SpanKind, Status, StatusCode, TraceFlags

__all__ = ["FlowSpans"]

_UNSET = Status(StatusCode.UNSET)
_PLAIN = (str, int, float, bool)
_METRICS_ENV = "OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED"


class FlowSpans:
    """Finished spans for ``tracer`` (see the module docstring)."""

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer
        self.direct = False
        self.noop_start: tuple[type, ...] = ()
        sdk = sys.modules.get("opentelemetry.sdk.trace")
        if sdk is None or not isinstance(tracer, sdk.Tracer):
            return
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        self.readable = sdk.ReadableSpan
        from opentelemetry.sdk.trace import sampling

        # the SDK's default sampler (and OTEL_TRACES_SAMPLER=parentbased_always_on): without a
        # parent it defers to its root, ALWAYS_ON - answered in emit without the call
        self.parent_based = tuple(getattr(sampling, n) for n in ("ParentBased", "_ParentBasedAlwaysOn")
                                  if hasattr(sampling, n))
        self.always_on = sampling.ALWAYS_ON
        self.noop_start = (BatchSpanProcessor, SimpleSpanProcessor)  # on_start/_on_ending: nothing
        self.direct = (isinstance(tracer.span_processor, sdk.SynchronousMultiSpanProcessor)
                       and os.environ.get(_METRICS_ENV, "").strip().lower() != "true")  # as the SDK reads it

    def emit(self, name: str, kind: SpanKind, attributes: dict[str, Any], start_time: int,
             end_time: int, status: Status | None = None) -> None:
        tracer = self.tracer
        processors = tracer.span_processor._span_processors if self.direct else ()
        if not self.direct or not tracer._is_enabled() or not all(
                type(p) in self.noop_start for p in processors):
            span = tracer.start_span(name, kind=kind, attributes=attributes, start_time=start_time)
            if status is not None:
                span.set_status(status)
            span.end(end_time=end_time)
            return
        parent: trace_api.SpanContext | None = trace_api.get_current_span().get_span_context()
        if parent is None or not parent.is_valid:
            parent = None
            trace_id = tracer.id_generator.generate_trace_id()
            random_trace_id = tracer.id_generator.is_trace_id_random()
        else:
            trace_id = parent.trace_id
            random_trace_id = parent.trace_flags.random_trace_id
        sampled_attrs: Any = attributes
        trace_state = None
        if parent is None and self._always_on(tracer.sampler):
            # what ParentBased(ALWAYS_ON) answers without a parent: record and sample, the
            # attributes as given, no trace state (two context look-ups and a result less)
            span_id = tracer.id_generator.generate_span_id()
            flags = TraceFlags.SAMPLED
        else:
            result = tracer.sampler.should_sample(None, trace_id, name, kind, attributes, ())
            span_id = tracer.id_generator.generate_span_id()  # drawn for an unrecorded span too
            if not result.decision.is_recording():
                return  # a NonRecordingSpan: nothing reaches the processors
            flags = TraceFlags.SAMPLED if result.decision.is_sampled() else TraceFlags.DEFAULT
            sampled_attrs, trace_state = result.attributes, result.trace_state
        if random_trace_id:
            flags |= TraceFlags.RANDOM_TRACE_ID
        context = trace_api.SpanContext(trace_id, span_id, is_remote=False,
                                        trace_flags=TraceFlags(flags), trace_state=trace_state)
        limits = tracer._span_limits
        attrs: Any = _plain(sampled_attrs, limits.max_span_attribute_length,
                            limits.max_span_attributes)
        if attrs is None:
            attrs = BoundedAttributes(limits.max_span_attributes, sampled_attrs, immutable=True,
                                      max_value_len=limits.max_span_attribute_length)
        span = self.readable(name=name, context=context, parent=parent, resource=tracer.resource,
                            attributes=attrs, kind=kind,
                            instrumentation_info=tracer.instrumentation_info,
                            status=status if status is not None and status.status_code
                            is not StatusCode.UNSET else _UNSET,
                            start_time=start_time, end_time=end_time,
                            instrumentation_scope=tracer._instrumentation_scope)
        for processor in processors:
            processor.on_end(span)

    def _always_on(self, sampler: Any) -> bool:
        """``sampler`` samples every span without a parent, as :meth:`emit` assumes: the SDK's
        ``ALWAYS_ON``, or the SDK's ``ParentBased`` (exactly: a subclass may sample otherwise)
        whose root is."""
        if sampler is self.always_on:
            return True
        return type(sampler) in self.parent_based and sampler._root is self.always_on


def _plain(attributes: Any, max_len: int | None, max_count: int | None) -> dict[str, Any] | None:
    """The attributes as ``BoundedAttributes`` would hold them when every value is a plain
    str/int/float/bool under a non-empty str key and they fit the count limit; else None."""
    if attributes is None:
        return {}
    if max_count is not None and len(attributes) > max_count:
        return None
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        if type(value) not in _PLAIN or type(key) is not str or not key:
            return None
        out[key] = value[:max_len] if max_len is not None and type(value) is str else value
    return out
