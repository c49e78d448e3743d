"""Command-line entry points report a user's mistake as one `error: ...` line and exit status 1.

A wrong path, an empty folder or an out-of-range option is not a bug: a traceback would bury the
one line that says what to fix. Set `MOSHI_FT_TRACEBACK=1` to get the traceback anyway.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

# Raised by the toolkit for bad input (config, manifests, audio, paths); anything else is a bug.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                                                 PermissionError)


def run_main(main: Callable[[], int | None], user_errors: tuple[type[BaseException], ...] = USER_ERRORS) -> int:
    """Runs `main`; a user error becomes `error: <message>` on stderr and status 1."""
    try:
        return int(main() or 0)
    except user_errors as e:
        if os.environ.get("MOSHI_FT_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
