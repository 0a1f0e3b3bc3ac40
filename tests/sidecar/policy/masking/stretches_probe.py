"""Drive a build of ``_stretches`` over buffers fenced by inaccessible pages (a subprocess).

Run by ``test_stretches.py`` as ``python stretches_probe.py BUILD.so`` under AddressSanitizer
and UndefinedBehaviorSanitizer (the build is compiled with both, the interpreter runs with
``LD_PRELOAD=libasan.so`` and ``PYTHONMALLOC=malloc``, so every ``bytes`` is its own
instrumented allocation). The bodies the masking pool hands to the extension are the agent's
own bytes: a read one byte past a buffer, a shift by 64 or a signed overflow on some length
would be a crash or a leak an agent could aim for, so the sanitizers must see none.

Memory outside the instrumented heap (an ``mmap``, a ``memoryview`` of one) is not watched by
ASan, so each input is also placed in an anonymous mapping between two ``PROT_NONE`` pages -
once ending at the upper guard, once starting at the lower one: an over- or under-read there is
a SIGSEGV. Every result of the sanitized build is compared with the installed one (both
classifiers), which ``test_stretches.py`` checks against the specification in process.

Exit status 0 and ``probed N inputs`` on stdout when all passed; a sanitizer report and a
non-zero status (or a signal) otherwise.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import mmap
import random
import sys
from collections.abc import Iterator

from chaperone_sidecar.policy.masking import _stretches as installed

PAGE = mmap.PAGESIZE
PROT_NONE = 0  # <sys/mman.h>; the mmap module exports PROT_READ and PROT_WRITE only
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def load(path: str):
    loader = importlib.machinery.ExtensionFileLoader("_stretches", path)
    spec = importlib.util.spec_from_file_location("_stretches", path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class Fenced:
    """``size`` bytes of readable pages with an inaccessible page on either side."""

    def __init__(self, size: int) -> None:
        self.pages = max(1, -(-size // PAGE))
        self.map = mmap.mmap(-1, (self.pages + 2) * PAGE)
        anchor = ctypes.c_char.from_buffer(self.map)
        address = ctypes.addressof(anchor)
        del anchor  # an export would keep the map from closing
        for guard in (address, address + (self.pages + 1) * PAGE):
            if _libc.mprotect(guard, PAGE, PROT_NONE) != 0:
                raise OSError(ctypes.get_errno(), "mprotect")
        self.view = memoryview(self.map)

    def at_end(self, data: bytes) -> memoryview:
        """``data`` ending where the upper guard page begins."""
        end = (self.pages + 1) * PAGE
        self.view[end - len(data):end] = data
        return self.view[end - len(data):end]

    def at_start(self, data: bytes) -> memoryview:
        """``data`` starting where the lower guard page ends."""
        self.view[PAGE:PAGE + len(data)] = data
        return self.view[PAGE:PAGE + len(data)]

    def close(self) -> None:
        self.view.release()
        self.map.close()


_PIECES = [b"a", b"Z", b"0", b"7", b" ", b"-", b"+", b"/", b"_", b"=", b"\n", b"\r", b"\\", b".", b"\xe9", b"\xff",
           b"\x80", b"1111", b"4111 ", b"4111-", b"abcdefgh", b"ABCD", b"QUJD"]


def inputs(rng: random.Random) -> Iterator[bytes]:
    """Short ends of every length, class floods across block and page ends, generated runs."""
    for n in range(0, 200):
        yield b"A" * n
        yield b"4" * n
        yield (b"4111 1111 1111 1111 " * 12)[:n]
        yield (b"a" * 15 + b"Z") * 13 + b"x"[: n % 2]
        yield (b"abcdefghijklmnop\n" * 12)[:n]  # lines that may wrap, a break at every offset
    for filler, n in ((b"Z", 4096), (b"7", 4096), (b"1 ", 5000), (b"9-", 8191), (b"q", 70000),
                      (b"8", 70001), (b"\xff", 65536)):
        yield (filler * n)[:n]
    yield b"x" * 65535 + b"Q" * 17
    yield b"z" * 70000 + b" 4111 1111 1111 1111\n"
    for _ in range(1500):
        runs = [rng.choice(_PIECES) * rng.randint(1, 40) for _ in range(rng.randint(0, 24))]
        yield b"".join(runs)


def check(module, data, reference: bytes) -> None:
    size = len(reference)
    for portable in (False, True):
        expected = installed.card_head_ends(reference, portable=portable)
        got = module.card_head_ends(data, portable=portable)
        if got != expected:
            raise AssertionError(f"card_head_ends {got} != {expected} (portable={portable}) for {reference[:80]!r}")
        if module.printable_tail(data, portable=portable) != installed.printable_tail(reference, portable=portable):
            raise AssertionError(f"printable_tail (portable={portable}) for {reference[:80]!r}")
        for min_len, lead in ((1, 0), (8, 32), (64, 3)):
            expected_runs = installed.printable_runs(reference, min_len, lead=lead, portable=portable)
            got_runs = module.printable_runs(data, min_len, lead=lead, portable=portable)
            if got_runs != expected_runs:
                raise AssertionError(f"printable_runs {got_runs[:8]} != {expected_runs[:8]} (min_len={min_len}, "
                                     f"portable={portable}) for {reference[:80]!r}")
        for pos in (0, 1, 15, 16, size // 2, max(0, size - 1), size, size + 64, sys.maxsize):
            for name in ("first_upper_run", "first_run_candidate"):
                expected_run = getattr(installed, name)(reference, pos, portable=portable)
                got_run = getattr(module, name)(data, pos, portable=portable)
                if got_run != expected_run:
                    raise AssertionError(f"{name} {got_run} != {expected_run} (pos={pos}, "
                                         f"portable={portable}) for {reference[:80]!r}")


def main(path: str, seed: int = 16) -> int:
    module = load(path)
    rng = random.Random(seed)
    probed = 0
    for data in inputs(rng):
        fence = Fenced(len(data))
        try:
            check(module, fence.at_end(data), data)
            check(module, fence.at_start(data), data)
        finally:
            fence.close()
        check(module, data, data)  # a heap allocation of its own (PYTHONMALLOC=malloc)
        probed += 1
    print(f"probed {probed} inputs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
