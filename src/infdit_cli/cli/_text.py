"""How any name or user-given text reaches the terminal: control characters shown escaped.

A file name can hold ESC (colours, cursor moves, OSC sequences that set the window title or write to the
clipboard), BEL, CR (which overwrites what was printed before it) and newlines (which make one name look
like two lines). Every line infdit prints to a terminal passes its text through `safe`, which writes each
C0/C1 control character and DEL as an escape (`\\x1b`, `\\n`, `\\r`, `\\t`) and leaves the rest literal,
Rich markup included (names are printed as `rich.text.Text`, never parsed as markup). `--json` output is
JSON and needs none of this.
"""

from __future__ import annotations

import re

__all__ = ["safe"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match) -> str:
    c = m.group()
    return _NAMED.get(c) or f"\\x{ord(c):02x}"


def safe(text: object) -> str:
    """`text` as one printable line: every control character escaped, everything else as it is."""
    return _CONTROL.sub(_escape, str(text))
