"""Long commands say what they are doing: on a terminal a live line (rich) above which every step
stays printed; in a pipe, plain lines."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from agentwatch.progress import progress

SCRIPT = """
from agentwatch.progress import progress
with progress("bench") as step:
    step("building records ...")
    step("running pii ...")
print("done")
"""


def test_off_a_terminal_each_step_is_a_plain_line():
    lines: list[str] = []
    with progress("bench", plain=lines.append) as step:
        step("building records ...")
        step("running pii ...")
    assert lines == ["building records ...", "running pii ..."]


def test_on_a_terminal_every_step_stays_printed_and_the_live_line_goes():
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=child, stdout=child, stderr=child,
                            env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "100"})
    os.close(child)
    output = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    assert proc.wait(timeout=60) == 0
    text = output.decode(errors="replace")
    assert "building records ..." in text and "running pii ..." in text and "done" in text
    assert "\x1b[" in text  # drawn as a terminal program: the live line uses escape sequences
