"""One problem found in a chaperone.dev object: where (a Kubernetes field path) and why.

Its own module because both checkers produce it - :mod:`.schema` (what the CRD's OpenAPI schema
says) and :mod:`.compiler` (what no schema can say) - and the compiler calls the schema checker:
the record sits below both, so there is no import cycle between them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PolicyError"]


@dataclass(frozen=True)
class PolicyError:
    """One problem: ``path`` in Kubernetes field-path notation, ``reason`` in plain words."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason
