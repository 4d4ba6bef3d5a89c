"""Reading the small one-value files of sysfs (shared by the efa and power sources).

os.open/os.read cost about a third of open().read(): a node has ~200 such files (EFA counters,
hwmon, RAPL) and they are read every interval, so this is the agent's hottest path.
"""

from __future__ import annotations

import os


def read_small(path: str | os.PathLike) -> bytes:
    """The content of one small file (up to 4 KiB). Raises OSError like open()."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)
