"""`python -m distillery_cli.guard SIGNAL PARENT_PID PROGRAM ARGS...`: run PROGRAM so it dies with its parent.

`distillery up` starts each child through this: on Linux it asks the kernel (prctl PR_SET_PDEATHSIG) to send
SIGNAL to the process when its parent dies, even by SIGKILL or the OOM killer, then execs PROGRAM (the setting
survives exec). Doing it here rather than in a `preexec_fn` keeps ctypes out of the forked child of a
multi-threaded parent. If the parent is already gone when we start, we exit instead of running orphaned.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def set_parent_death_signal(signum: int) -> bool:
    """Have the kernel send `signum` to this process when its parent (thread) exits; False off Linux."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    return True


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        sys.exit("usage: python -m distillery_cli.guard SIGNAL PARENT_PID PROGRAM [ARGS...]")
    signum = signal.Signals[argv[0]].value
    parent = int(argv[1])
    set_parent_death_signal(signum)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        sys.exit(f"parent {parent} is gone; not starting {argv[2]}")
    os.execv(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
