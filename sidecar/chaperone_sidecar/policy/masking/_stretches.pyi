# The C extension _stretches.c (what and why: its header comment).
from typing_extensions import Buffer

SSE2: int

def first_upper_run(data: Buffer, pos: int = 0, *, portable: bool = False) -> int: ...
def card_head_ends(data: Buffer, *, portable: bool = False) -> list[int]: ...
