"""A data root (and DAGSTER_HOME) shared by a lab's group: umask and setgid folders (docs/DEPLOYMENT.md).

Several researchers, cron and the dagster-daemon write into one data root, each as their own Unix user.
For every one of them to read, resume, lock and clean up what the others wrote:

- the data root's folders belong to the lab's group and carry the setgid bit (new files and folders
  inherit the group; new folders inherit the bit), and are group-writable;
- every writer's umask leaves group write on (``0002``): ``DDR_UMASK=0002`` makes ddr apply it in every
  process that loads ddr's definitions (the daemon, the UI, run workers, ``dagster asset materialize``);
  :func:`apply_umask_from_env`.

``python -m ddr_core.shared_root prepare DIR --group GROUP`` sets a folder up (idempotent);
``python -m ddr_core.shared_root check DIR --group GROUP`` lists what a group member could not write.
No Dagster import (ddr_core).
"""

from __future__ import annotations

import argparse
import grp
import os
import re
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

UMASK_ENV = "DDR_UMASK"
_UMASK_RULE = re.compile(r"0?[0-7]{3}")


def parse_umask(raw: str, source: str = UMASK_ENV) -> int:
    """``"0002"`` / ``"002"`` -> 0o002; refuses anything else, and a umask that takes group write away."""
    text = raw.strip()
    if not _UMASK_RULE.fullmatch(text):
        raise ValueError(f"{source} is {raw!r}: use an octal umask such as 0002 (group-writable files)")
    value = int(text, 8)
    if value & 0o070:
        raise ValueError(f"{source} is {raw!r}: it removes group permissions ({value & 0o070:03o}), so the lab's "
                         "group could not write what this process writes; use 0002 (or 0007)")
    return value


def apply_umask_from_env(env: dict[str, str] | None = None) -> int | None:
    """Set the process umask from ``DDR_UMASK`` when it is set; returns the value set (None: unset)."""
    raw = (os.environ if env is None else env).get(UMASK_ENV, "").strip()
    if not raw:
        return None
    value = parse_umask(raw)
    os.umask(value)
    return value


def _walk(root: Path) -> Iterator[Path]:
    yield root
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            yield Path(folder) / name


def problems(root: Path, group: str) -> list[str]:
    """What a member of ``group`` could not write under ``root``: wrong group, no group write, folders
    without the setgid bit. Links are not followed (and not judged)."""
    gid = grp.getgrnam(group).gr_gid
    found: list[str] = []
    for path in _walk(root):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            continue
        is_dir = stat.S_ISDIR(info.st_mode)
        if info.st_gid != gid:
            found.append(f"{path}: group {info.st_gid} is not {group} ({gid})")
        wanted = stat.S_IRGRP | stat.S_IWGRP | (stat.S_IXGRP if is_dir else 0)
        if info.st_mode & wanted != wanted:
            found.append(f"{path}: mode {stat.S_IMODE(info.st_mode):04o} lacks group {'rwx' if is_dir else 'rw'}")
        if is_dir and not info.st_mode & stat.S_ISGID:
            found.append(f"{path}: folder without the setgid bit (new files would not get group {group})")
    return found


def prepare(root: Path, group: str) -> int:
    """Make ``root`` (created if missing) and everything under it group ``group``, group-writable, folders
    setgid. Returns the number of paths changed. Must run as their owner or root."""
    gid = grp.getgrnam(group).gr_gid
    root.mkdir(parents=True, exist_ok=True)
    changed = 0
    for path in _walk(root):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            continue
        is_dir = stat.S_ISDIR(info.st_mode)
        mode = stat.S_IMODE(info.st_mode) | stat.S_IRGRP | stat.S_IWGRP
        if is_dir:
            mode |= stat.S_IXGRP | stat.S_ISGID
        if info.st_gid != gid:
            os.chown(path, -1, gid, follow_symlinks=False)
            changed += 1
        if mode != stat.S_IMODE(info.st_mode):
            os.chmod(path, mode)
            changed += 1
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddr_core.shared_root",
                                     description="set up or check a data root shared by a Unix group")
    parser.add_argument("action", choices=["prepare", "check"])
    parser.add_argument("folder", type=Path, help="the data root (or DAGSTER_HOME)")
    parser.add_argument("--group", required=True, help="the lab's Unix group")
    args = parser.parse_args(argv)
    try:
        grp.getgrnam(args.group)
    except KeyError:
        print(f"no Unix group {args.group!r} (create it: groupadd {args.group})", file=sys.stderr)
        return 2
    if args.action == "prepare":
        print(f"{args.folder}: {prepare(args.folder, args.group)} changes; group {args.group}, g+rw, folders setgid")
        return 0
    if not args.folder.is_dir():
        print(f"{args.folder} is not a folder", file=sys.stderr)
        return 2
    found = problems(args.folder, args.group)
    for line in found[:200]:
        print(line)
    if len(found) > 200:
        print(f"... and {len(found) - 200} more")
    fix = f"python -m ddr_core.shared_root prepare {args.folder} --group {args.group}"
    print(f"{args.folder}: " + ("OK" if not found else f"{len(found)} problems; fix: {fix}"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
