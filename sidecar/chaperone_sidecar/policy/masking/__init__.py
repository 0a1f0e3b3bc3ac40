"""Response/request masking: secrets and personal data replaced before anyone sees them.

``Masker`` (whole bodies) and ``StreamMasker`` (chunked/SSE bodies) are built from the
``MaskSpec``s a decision carries. Detectors (``detectors.py``) find secrets by pattern plus
validation; field rules (``fields.py``) mask JSON values by path; ``encoding.py`` decodes
compressed bodies under a cap so a decompression bomb is refused, never expanded.

Replacement text names what was removed (``[MASKED:aws-secret-key]``), optionally with a keyed
hash so equal secrets stay correlatable (``[MASKED:aws-secret-key:1a2b3c4d5e6f]``).

Import each name from its module (``masker``, ``stream``, ``encoding``, ...); the package
re-exports nothing.
"""
