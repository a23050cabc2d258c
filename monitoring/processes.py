"""Which processes belong to this one (Linux /proc; psutil is not a dependency)."""
from __future__ import annotations

from pathlib import Path


def descendant_pids(root: int) -> set[int]:
    """`root` and every process it started, transitively. A local Ray session's GCS, raylet and workers
    descend from the process that called ray.init, so this tells one session's processes from another's."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:  # the command name may hold spaces and parentheses; the parent pid follows the last ")"
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found
