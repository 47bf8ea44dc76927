"""bench.filelist: which strace events make the prefetch list (pure parsing, no strace run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import filelist

ROOT = "/var/tmp/x/files-root"
LOG = f"""\
10 100.000001 execve("/usr/sbin/chroot", ["chroot", "{ROOT}", "/usr/bin/python3"], 0x1) = 0
10 100.000002 openat(AT_FDCWD, "/etc/ld.so.cache", O_RDONLY|O_CLOEXEC) = 3</etc/ld.so.cache>
10 100.000003 chroot("{ROOT}") = 0
10 100.000004 execve("/usr/bin/python3", ["/usr/bin/python3", "-c", "x"], 0x2) = 0
10 100.000005 openat(AT_FDCWD</>, "/etc/ld.so.cache", O_RDONLY) = 3<{ROOT}/etc/ld.so.cache>
10 100.000006 openat(AT_FDCWD</>, "/lib/libc.so.6", O_RDONLY) = 3<{ROOT}/usr/lib/libc.so.6>
11 100.000007 openat(AT_FDCWD<{ROOT}/data>, "base/1", O_RDWR) = 4<{ROOT}/data/base/1>
11 100.000008 openat(AT_FDCWD</>, "/usr/lib", O_RDONLY|O_DIRECTORY) = 5<{ROOT}/usr/lib>
11 100.000009 openat(AT_FDCWD</>, "/tmp/out", O_WRONLY|O_CREAT|O_TRUNC, 0644) = 6<{ROOT}/tmp/out>
11 100.000010 openat(AT_FDCWD</>, "/proc/self/maps", O_RDONLY) = 7</proc/10/maps>
11 100.000011 openat(AT_FDCWD</>, "/new", O_RDONLY) = 8<{ROOT}/new>
10 100.000012 openat(AT_FDCWD</>, "/lib/libc.so.6", O_RDONLY) = 3<{ROOT}/usr/lib/libc.so.6>
10 100.000013 openat(AT_FDCWD, "/etc/sp\\303\\251cial", O_RDONLY) = 3<{ROOT}/etc/sp\\303\\251cial>
10 200.000000 openat(AT_FDCWD</>, "/usr/lib/late.so", O_RDONLY) = 3<{ROOT}/usr/lib/late.so>
"""
MEMBERS = {
    "/etc/ld.so.cache", "/usr/lib/libc.so.6", "/data/base/1", "/tmp/out", "/usr/bin/python3.11",
    "/usr/lib/late.so", "/etc/sp\u00e9cial",
}  # fmt: skip


def test_parse_keeps_reads_after_chroot_before_ready(tmp_path: Path) -> None:
    root = tmp_path / "files-root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/python3.11").write_text("")
    os.symlink("python3.11", root / "usr/bin/python3")
    log = LOG.replace(ROOT, str(root))
    files = filelist.parse(log, 150.0, str(root), MEMBERS)
    assert files == [
        "/usr/bin/python3.11",  # execve, the symlink resolved inside the root
        "/etc/ld.so.cache",  # the workload's own open, not the host chroot binary's
        "/usr/lib/libc.so.6",  # once, at its first open
        "/data/base/1",  # relative to a chdir: the kernel's path
        "/etc/sp\u00e9cial",  # octal escapes: UTF-8 bytes of the name
    ]


def test_parse_needs_the_chroot() -> None:
    with pytest.raises(RuntimeError, match="no chroot"):
        filelist.parse('10 1.0 openat(AT_FDCWD, "/a", O_RDONLY) = 3</a>\n', 2.0, ROOT, {"/a"})


def test_resolve_follows_absolute_and_relative_links(tmp_path: Path) -> None:
    (tmp_path / "usr/lib").mkdir(parents=True)
    os.symlink("usr/lib", tmp_path / "lib")
    os.symlink("/usr/lib/real", tmp_path / "usr/lib/abs")
    os.symlink("../lib/real", tmp_path / "usr/lib/rel")
    assert filelist._resolve(str(tmp_path), "/lib/abs") == "/usr/lib/real"
    assert filelist._resolve(str(tmp_path), "/lib/rel") == "/usr/lib/real"
    assert filelist._resolve(str(tmp_path), "/lib/./x/../y") == "/usr/lib/y"


def test_covering_files_names_the_same_spans_with_fewer_files() -> None:
    from bench import soci_prefetch as sp

    ranges = [
        ("/a", "L1", 0, 5),
        ("/b", "L1", 2, 3),  # inside /a
        ("/c", "L1", 5, 7),
        ("/d", "L1", 6, 6),  # inside /c
        ("/e", "L1", 10, 10),
        ("/f", "L0", 1, 1),
        ("/g", "L0", 1, 2),
    ]
    cover = sp.covering_files(ranges)
    assert sorted(cover) == ["/a", "/c", "/e", "/g"]
    kept = [r for r in ranges if r[0] in cover]
    assert sp.expected_spans(kept) == sp.expected_spans(ranges)
