"""Match a REST request (rest-xml / rest-json protocols) to a botocore operation.

Each operation in a REST service model declares ``http.method`` and an ``http.requestUri``
template such as ``/{Bucket}/{Key+}?uploads`` or
``/2015-03-31/functions/{FunctionName}/invocations``.
Several operations can fit one request (``GET /bucket?analytics`` is both List... and
Get...AnalyticsConfiguration; ``PUT /bucket/key`` is PutObject, CopyObject, UploadPart or
UploadPartCopy), so every candidate is ranked and the most specific one wins:

1. more literal path segments (``/functions/{F}/invocations`` beats ``/functions/{F}/{Q}``);
2. no greedy label over a greedy one (``{Key+}`` swallows anything);
3. more query-string discriminators from the template (``?tagging``, ``?list-type=2``);
4. all required header / query-string members present (``x-amz-copy-source``, ``uploadId``),
   then more of them present;
5. not deprecated (GetBucketLifecycle vs GetBucketLifecycleConfiguration), then model order.

The path is matched segment by segment on the raw (still percent-encoded) path, decoding each
segment separately, so an encoded ``%2F`` inside a label does not split it, as on the server.
Templates are grouped by HTTP method and first query key so a request looks at only a few.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

# One compiled path segment: ("lit", text) or ("label", name) or ("greedy", name).
Segment = tuple[str, str]


@dataclass(frozen=True)
class RestTemplate:
    operation: str
    method: str
    segments: tuple[Segment, ...]
    greedy_at: int  # index of the greedy label in segments, -1 if none
    query: tuple[tuple[str, str | None], ...]  # discriminators: key, required value or None
    literal_count: int
    order: int
    deprecated: bool
    required_headers: tuple[str, ...]
    required_query: tuple[str, ...]


@dataclass(frozen=True)
class RestMatch:
    operation: str
    labels: dict[str, str]  # label name -> decoded value
    rank: tuple


def _split(path: str) -> list[str]:
    """Path segments without the leading slash; "/" and "" give []."""
    stripped = path[1:] if path.startswith("/") else path
    return stripped.split("/") if stripped else []


def compile_template(
    operation: str,
    method: str,
    request_uri: str,
    order: int,
    deprecated: bool,
    required: tuple[tuple[str, ...], tuple[str, ...]],
) -> RestTemplate:
    path, _, query = request_uri.partition("?")
    raw_segments = _split(path)
    if raw_segments and raw_segments[-1] == "":  # Route 53 writes ".../rrset/"
        raw_segments.pop()
    segments: list[Segment] = []
    greedy_at = -1
    for index, raw in enumerate(raw_segments):
        if raw.startswith("{") and raw.endswith("}"):
            name = raw[1:-1]
            if name.endswith("+"):
                segments.append(("greedy", name[:-1]))
                greedy_at = index
            else:
                segments.append(("label", name))
        else:
            segments.append(("lit", raw))
    discriminators = []
    for part in query.split("&") if query else ():
        key, eq, value = part.partition("=")
        discriminators.append((key, value if eq else None))
    return RestTemplate(
        operation=operation,
        method=method,
        segments=tuple(segments),
        greedy_at=greedy_at,
        query=tuple(discriminators),
        literal_count=sum(1 for kind, _ in segments if kind == "lit"),
        order=order,
        deprecated=deprecated,
        required_headers=required[0],
        required_query=required[1],
    )


def _match_fixed(template_segments, decoded, labels) -> bool:
    for (kind, text), value in zip(template_segments, decoded, strict=True):
        if kind == "lit":
            if value != text:
                return False
        elif not value:  # a label never matches an empty segment
            return False
        else:
            labels[text] = value
    return True


def _match_path(
    template: RestTemplate, raw: list[str], decoded: list[str]
) -> dict[str, str] | None:
    segments = template.segments
    labels: dict[str, str] = {}
    if template.greedy_at < 0:
        if len(segments) != len(decoded):
            return None
        return labels if _match_fixed(segments, decoded, labels) else None
    before = segments[: template.greedy_at]
    after = segments[template.greedy_at + 1 :]
    if len(decoded) < len(before) + len(after) + 1:
        return None
    tail_start = len(decoded) - len(after)
    if not _match_fixed(before, decoded[: len(before)], labels):
        return None
    if not _match_fixed(after, decoded[tail_start:], labels):
        return None
    # Decode the greedy part as a whole: "a%2Fb/c" is the key "a/b/c" either way.
    greedy = unquote("/".join(raw[len(before) : tail_start]))
    if not greedy:
        return None
    labels[segments[template.greedy_at][1]] = greedy
    return labels


class RestMatcher:
    """All REST templates of one service, grouped by method and by first query discriminator.

    The grouping is only a shortcut: a template whose ``?key`` the request lacks cannot match,
    so it is not even looked at (S3 has ~35 PUT templates, a plain PutObject checks ~5).
    """

    def __init__(self, templates: list[RestTemplate]):
        self._plain: dict[str, list[RestTemplate]] = {}
        self._by_key: dict[str, dict[str, list[RestTemplate]]] = {}
        for template in templates:
            if template.query:
                by_key = self._by_key.setdefault(template.method, {})
                by_key.setdefault(template.query[0][0], []).append(template)
            else:
                self._plain.setdefault(template.method, []).append(template)

    def match(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        header_names,  # container of lower-cased header names
    ) -> RestMatch | None:
        """The best matching operation, or None when no template fits."""
        method = method.upper()
        templates = list(self._plain.get(method, ()))
        by_key = self._by_key.get(method)
        if by_key:
            for key in query:
                templates.extend(by_key.get(key, ()))
        if not templates:
            return None
        raw = _split(path or "/")
        decoded = [unquote(segment) for segment in raw]
        best = self._best(templates, raw, decoded, query, header_names)
        if best is None and raw and raw[-1] == "":
            # "/bucket/" is the bucket itself; ".../rrset/" was compiled without the slash.
            best = self._best(templates, raw[:-1], decoded[:-1], query, header_names)
        return best

    @staticmethod
    def _best(templates, raw, decoded, query, header_names) -> RestMatch | None:
        best: RestMatch | None = None
        for template in templates:
            if not _query_fits(template.query, query):
                continue
            labels = _match_path(template, raw, decoded)
            if labels is None:
                continue
            present = sum(1 for h in template.required_headers if h in header_names) + sum(
                1 for q in template.required_query if q in query
            )
            wanted = len(template.required_headers) + len(template.required_query)
            rank = (
                template.literal_count,
                template.greedy_at < 0,
                len(template.query),
                present == wanted,
                present,
                not template.deprecated,
                -template.order,
            )
            if best is None or rank > best.rank:
                best = RestMatch(template.operation, labels, rank)
        return best


def _query_fits(discriminators, query: dict[str, list[str]]) -> bool:
    for key, value in discriminators:
        if key not in query:
            return False
        if value is not None and value not in query[key]:
            return False
    return True
