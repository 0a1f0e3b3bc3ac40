"""Response/request masking: secrets and personal data replaced before anyone sees them.

``Masker`` (whole bodies) and ``StreamMasker`` (chunked/SSE bodies) are built from the
``MaskSpec``s a decision carries. Detectors (``detectors.py``) find secrets by pattern plus
validation; field rules (``fields.py``) mask JSON values by path; ``encoding.py`` decodes
compressed bodies under a cap so a decompression bomb is refused, never expanded.

Replacement text names what was removed (``[MASKED:aws-secret-key]``), optionally with a keyed
hash so equal secrets stay correlatable (``[MASKED:aws-secret-key:1a2b3c4d5e6f]``).
"""

from .detectors import DETECTOR_NAMES, resolve_rules, secret_key_name, validate_detectors
from .encoding import (
    BodyTooLarge,
    DecodeError,
    MaskingError,
    StreamDecoder,
    UnsupportedEncoding,
    decode,
    encode,
    parse_content_encoding,
)
from .fields import CompiledPath, apply_paths, compile_path, path_errors
from .masker import Masker, MaskResult, is_json_type, is_text_type
from .spans import MASK_TOKEN_RE, mask_text
from .stream import WINDOW, StreamMasker

__all__ = [
    "DETECTOR_NAMES",
    "MASK_TOKEN_RE",
    "WINDOW",
    "BodyTooLarge",
    "CompiledPath",
    "DecodeError",
    "MaskResult",
    "Masker",
    "MaskingError",
    "StreamDecoder",
    "StreamMasker",
    "UnsupportedEncoding",
    "apply_paths",
    "compile_path",
    "decode",
    "encode",
    "is_json_type",
    "is_text_type",
    "mask_text",
    "parse_content_encoding",
    "path_errors",
    "resolve_rules",
    "secret_key_name",
    "validate_detectors",
]
