"""The system's Hyperscan library (``libhs.so.5``) through ctypes: block-mode compile, serialize,
deserialize, scratch and scan - the part of the API masking uses, shaped like the ``hyperscan``
wheel's (``Database.scan(data, match_event_handler=, context=, scratch=)``,
``Database.scratch.clone()``, :class:`ScanTerminated`), so :mod:`.prefilter` scans either.

Why hand-written (issue 16, session 9, measured): the ``hyperscan`` wheel links a generic build
of Vectorscan (its CMake build sets ``FAT_RUNTIME=OFF``; ``Database.info()`` names no CPU
feature), so its scans use none of AVX2/AVX-512. Debian's ``libvectorscan5`` (and
``libhyperscan5``) is built with the fat runtime and picks the best code path for the CPU at
run time: the one-pass database of every detector scans the proxy benchmark's 1 MiB of text in
0.20 ms instead of 0.42, log prose in 1.3 ms instead of 1.8, SSE in 0.6 instead of 0.9
(bench/analysis.md, "Session 9"). Rebuilding the wheel against it is not possible (its C
extension links Chimera and PCRE statically; Debian ships neither). A match costs one Python
callback either way: ~0.29 µs here, ~0.23 µs in the wheel (a flood of 210 000 matches in 1 MiB:
60 ms against 47 ms, of the ~0.8 s its findings take to mask).

This file imports nothing but the standard library, so :mod:`.hs_compile`'s child process loads
it by path to compile (the compiler's pages stay out of the sidecar). :func:`load` returns
``None`` when no ``libhs.so.5`` can be loaded; masking then uses the wheel.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["HS_FLAG_CASELESS", "HS_FLAG_SINGLEMATCH", "HS_MODE_BLOCK", "Database", "HyperscanError",
           "Library", "ScanTerminated", "Scratch", "load"]

# hs_compile.h / hs_common.h (the same values the wheel exports)
HS_FLAG_CASELESS = 1
HS_FLAG_SINGLEMATCH = 8
HS_MODE_BLOCK = 1
HS_SUCCESS = 0
HS_SCAN_TERMINATED = -3
LIBRARY_NAME = "libhs.so.5"  # Debian's libvectorscan5 / libhyperscan5

_MATCH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint, ctypes.c_ulonglong, ctypes.c_ulonglong,
                          ctypes.c_uint, ctypes.py_object)


class HyperscanError(Exception):
    """A call of the library failed (an invalid expression: its message and index)."""


class ScanTerminated(HyperscanError):
    """The match handler returned a true value: the scan stopped there (as in the wheel)."""


class _CompileError(ctypes.Structure):
    _fields_ = [("message", ctypes.c_char_p), ("expression", ctypes.c_int)]


def _on_match(id_: int, start: int, end: int, flags: int, call: Any) -> int:
    # ``call`` is the [handler, context, error] list Database.scan passed as the C context
    # pointer. An exception must not be lost (ctypes would print it and go on scanning: a
    # trigger missed, a secret unmasked): it stops the scan and Database.scan raises it.
    try:
        return 1 if call[0](id_, start, end, flags, call[1]) else 0
    except BaseException as exc:  # noqa: BLE001 - re-raised by Database.scan
        call[2] = exc
        return 1


_ON_MATCH = _MATCH(_on_match)  # one C thunk for every scan (making one per scan costs µs)


class Library:
    """A loaded ``libhs.so.5`` with the prototypes set."""

    def __init__(self, cdll: ctypes.CDLL) -> None:
        p, u, vp = ctypes.POINTER, ctypes.c_uint, ctypes.c_void_p
        cdll.hs_compile_multi.argtypes = [p(ctypes.c_char_p), p(u), p(u), u, u, vp, p(vp), p(p(_CompileError))]
        cdll.hs_free_compile_error.argtypes = [p(_CompileError)]
        cdll.hs_serialize_database.argtypes = [vp, p(vp), p(ctypes.c_size_t)]
        cdll.hs_deserialize_database.argtypes = [ctypes.c_char_p, ctypes.c_size_t, p(vp)]
        cdll.hs_database_info.argtypes = [vp, p(vp)]
        cdll.hs_alloc_scratch.argtypes = [vp, p(vp)]
        cdll.hs_clone_scratch.argtypes = [vp, p(vp)]
        cdll.hs_free_scratch.argtypes = [vp]
        cdll.hs_free_database.argtypes = [vp]
        # ctypes passes a bytes object's own buffer (no copy) and releases the GIL during the scan
        cdll.hs_scan.argtypes = [vp, ctypes.c_char_p, u, u, vp, _MATCH, ctypes.py_object]
        cdll.hs_version.restype = ctypes.c_char_p
        self._lib = cdll
        self._free = ctypes.CDLL(None).free  # hs_serialize_database/hs_database_info allocate with malloc
        self._free.argtypes = [vp]
        self.version: str = cdll.hs_version().decode().strip()  # "5.4.9 " (a build date may follow)

    def compile(self, expressions: Sequence[bytes], flags: Sequence[int]) -> Database:
        """A block-mode database of ``expressions`` (ids = their indexes)."""
        n = len(expressions)
        db, error = ctypes.c_void_p(), ctypes.POINTER(_CompileError)()
        rc = self._lib.hs_compile_multi((ctypes.c_char_p * n)(*expressions), (ctypes.c_uint * n)(*flags),
                                        (ctypes.c_uint * n)(*range(n)), n, HS_MODE_BLOCK, None,
                                        ctypes.byref(db), ctypes.byref(error))
        if rc != HS_SUCCESS:
            if not error:
                raise HyperscanError(f"hs_compile_multi failed ({rc})")
            message, index = (error.contents.message or b"").decode(errors="replace"), error.contents.expression
            self._lib.hs_free_compile_error(error)
            raise HyperscanError(f"expression {index}: {message}" if index >= 0 else message)
        return Database(self, db)

    def deserialize(self, blob: bytes) -> Database:
        db = ctypes.c_void_p()
        self._check(self._lib.hs_deserialize_database(blob, len(blob), ctypes.byref(db)), "hs_deserialize_database")
        return Database(self, db)

    def _check(self, rc: int, what: str) -> None:
        if rc != HS_SUCCESS:
            raise HyperscanError(f"{what} failed ({rc})")

    def _malloced_bytes(self, pointer: ctypes.c_void_p, length: int) -> bytes:
        try:
            return ctypes.string_at(pointer, length)
        finally:
            self._free(pointer)


class Scratch:
    """Scratch space: one per thread that scans (a scan needs it to itself)."""

    def __init__(self, lib: Library, handle: ctypes.c_void_p) -> None:
        self._lib, self._handle = lib, handle

    def clone(self) -> Scratch:
        clone = ctypes.c_void_p()
        self._lib._check(self._lib._lib.hs_clone_scratch(self._handle, ctypes.byref(clone)), "hs_clone_scratch")
        return Scratch(self._lib, clone)

    def __del__(self) -> None:
        if self._handle:
            self._lib._lib.hs_free_scratch(self._handle)
            self._handle = ctypes.c_void_p()


class Database:
    """A compiled (or deserialized) block-mode database and its first scratch space."""

    def __init__(self, lib: Library, handle: ctypes.c_void_p) -> None:
        self._lib, self._handle = lib, handle
        scratch = ctypes.c_void_p()
        lib._check(lib._lib.hs_alloc_scratch(handle, ctypes.byref(scratch)), "hs_alloc_scratch")
        self.scratch = Scratch(lib, scratch)
        self._lock = threading.Lock()  # the default scratch, when a caller gives none

    def scan(self, data: bytes, match_event_handler: Callable[..., Any], context: Any = None,
             scratch: Scratch | None = None) -> None:
        """Report every match to ``match_event_handler(id, from, to, flags, context)``; a true
        return value stops the scan with :class:`ScanTerminated`, an exception in it stops the
        scan and is raised here."""
        if type(data) is not bytes:
            data = bytes(data)  # a bytearray or memoryview: the C side needs a stable buffer
        if scratch is None:
            with self._lock:
                return self.scan(data, match_event_handler, context, self.scratch)
        call = [match_event_handler, context, None]
        rc = self._lib._lib.hs_scan(self._handle, data, len(data), 0, scratch._handle, _ON_MATCH, call)
        if call[2] is not None:
            raise call[2]  # the handler's own exception (the wheel raises it too)
        if rc == HS_SCAN_TERMINATED:
            raise ScanTerminated()
        self._lib._check(rc, "hs_scan")
        return None

    def serialize(self) -> bytes:
        blob, length = ctypes.c_void_p(), ctypes.c_size_t()
        self._lib._check(self._lib._lib.hs_serialize_database(self._handle, ctypes.byref(blob), ctypes.byref(length)),
                         "hs_serialize_database")
        return self._lib._malloced_bytes(blob, length.value)

    def info(self) -> str:
        """E.g. ``Version: 5.4.9 Features: AVX512 Mode: BLOCK``: the CPU features it targets."""
        text = ctypes.c_void_p()
        self._lib._check(self._lib._lib.hs_database_info(self._handle, ctypes.byref(text)), "hs_database_info")
        try:
            return (ctypes.string_at(text) or b"").decode()
        finally:
            self._lib._free(text)

    def __del__(self) -> None:
        if self._handle:
            self._lib._lib.hs_free_database(self._handle)
            self._handle = ctypes.c_void_p()


@functools.cache
def load(name: str = LIBRARY_NAME) -> Library | None:
    """The system library (loaded once per name), or None when it cannot be loaded."""
    try:
        return Library(ctypes.CDLL(name))
    except (OSError, AttributeError):  # not installed, or not a Hyperscan library
        return None
