"""Which filesystem a store is on, and what sessiondb does there (sessiondb.filesystems).

Real filesystems where this machine can mount them (tmpfs, ramfs, loop-mounted ext4 /
xfs / btrfs, an overlay, a FUSE passthrough: tests/mounts.py, skipped without root);
the others (NFS, SMB, 9p, virtiofs, CephFS ...) through their ``statfs`` magics and
``/proc/self/mountinfo`` lines, as the kernel reports them.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from pathlib import Path

import pytest

import fakefs
import mounts
from sessiondb import (
    ConfigurationError, DatabaseOpenError, FilesystemWarning, SessionDB,
    UnsafeFilesystemError, doctor, filesystems,
)
from sessiondb.cli import main as cli_main
from sessiondb.filesystems import (
    ENV_POLICY, Filesystem, MacStatfs, classify, existing_directory, from_mac_statfs,
    mount_of, parse_mountinfo, policy, use_journal,
)

# -- the tables, with what the kernel reports --------------------------------------------

#: (mountinfo line, statfs f_type, type, verdict). The first seven were recorded on this
#: project's machine (Linux 6.18) with the filesystems of tests/mounts.py; the others are
#: lines in the kernel's format (proc(5)) with the magics of linux/magic.h.
MOUNTS = [
    ("27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard", 0xEF53, "ext4", "safe"),
    ("45 27 0:40 / /t/tmpfs rw,relatime - tmpfs tmpfs rw,size=65536k", 0x01021994,
     "tmpfs", "safe"),
    ("51 27 7:1 / /t/xfs rw,relatime - xfs /dev/loop1 rw,inode64,noquota", 0x58465342,
     "xfs", "safe"),
    ("53 27 0:44 / /t/btrfs rw,relatime - btrfs /dev/loop2 rw,space_cache=v2,subvolid=5,"
     "subvol=/", 0x9123683E, "btrfs", "safe"),
    ("50 27 0:43 / /t/ramfs rw,relatime - ramfs ramfs rw", 0x858458F6, "ramfs", "safe"),
    ("49 27 0:41 / /t/merged rw,relatime - overlay overlay rw,lowerdir=/nowhere/l,"
     "upperdir=/nowhere/u,workdir=/nowhere/w,uuid=on", 0x794C7630, "overlay", "safe"),
    ("52 27 0:46 / /t/fuse rw,nosuid,nodev,relatime - fuse.passfs passfs rw,user_id=0,"
     "group_id=0", 0x65735546, "fuse.passfs", "unsafe"),
    ("112 29 0:53 / /mnt/share rw,relatime shared:60 - nfs4 files:/export rw,vers=4.2,"
     "hard,proto=tcp,sec=sys,local_lock=none,addr=192.0.2.2", 0x6969, "nfs4", "unsafe"),
    ("113 29 0:54 / /mnt/v3 rw,relatime - nfs files:/export rw,vers=3,hard,proto=tcp",
     0x6969, "nfs", "unsafe"),
    ("114 29 0:55 / /mnt/win rw,relatime - cifs //files/share rw,vers=3.1.1,cache=strict,"
     "uid=1000", 0xFF534D42, "cifs", "unsafe"),
    ("115 29 0:56 / /mnt/smb rw,relatime - smb3 //files/share rw,vers=3.1.1", 0xFE534D42,
     "smb3", "unsafe"),
    ("116 29 0:57 / /mnt/c rw,noatime - 9p drvfs rw,aname=drvfs;path=C:\\;uid=1000,"
     "trans=virtio", 0x01021997, "9p", "unsafe"),
    ("117 29 0:58 / /workspace rw,relatime - virtiofs hostshare rw", 0x65735546,
     "virtiofs", "unsafe"),
    ("118 29 0:59 / /home/u/remote rw,nosuid,nodev,relatime - fuse.sshfs u@host:/home/u "
     "rw,user_id=1000,group_id=1000", 0x65735546, "fuse.sshfs", "unsafe"),
    ("119 29 8:17 / /media/win rw,relatime - fuseblk /dev/sdb1 rw,user_id=0,group_id=0,"
     "allow_other,blksize=4096", 0x65735546, "fuseblk", "unsafe"),
    ("120 29 0:60 / /mnt/pool rw,relatime - fuse.mergerfs disks rw,user_id=0",
     0x65735546, "fuse.mergerfs", "unsafe"),
    ("121 29 0:61 / /mnt/ceph rw,relatime - ceph 192.0.2.1:6789:/ rw,name=admin,acl",
     0x00C36400, "ceph", "unsafe"),
    ("122 29 0:62 / /lustre rw - lustre 192.0.2.3@tcp:/fs rw", 0x0BD00BD0, "lustre",
     "unsafe"),
    ("123 29 0:63 / /media/sf_shared rw - vboxsf shared rw", 0x786F4256, "vboxsf",
     "unsafe"),
    ("124 29 0:64 / /gpfs rw - gpfs gpfs0 rw", 0x47504653, "gpfs", "unsafe"),
    ("125 29 0:65 / /home rw,relatime - zfs tank/home rw,xattr,noacl", 0x2FC12FC1, "zfs",
     "safe"),
    ("126 29 259:2 / /data rw,relatime - f2fs /dev/nvme0n1p2 rw", 0xF2F52010, "f2fs",
     "safe"),
    ("127 29 0:66 / /bc rw - bcachefs /dev/sdc rw", 0xCA451A4E, "bcachefs", "safe"),
    ("128 29 0:67 / /x rw - foofs /dev/sdd rw", 0x12345678, "foofs", "unknown"),
]


@pytest.mark.parametrize("line, magic, fstype, verdict", MOUNTS,
                         ids=[m[2] for m in MOUNTS])
def test_classification_of_recorded_mounts(line: str, magic: int, fstype: str,
                                           verdict: str):
    (mount,) = parse_mountinfo(line)
    assert classify(mount.fstype, magic)[:2] == (fstype, verdict)
    # Without /proc (a sandbox), the magic alone: FUSE's stands for the whole family.
    by_magic = classify(None, magic)
    assert by_magic[1] == verdict
    if magic == 0x65735546:
        assert by_magic[0] == "fuse"


def test_the_verdicts_are_explained_and_the_gaps_are_not_guessed():
    assert classify("nfs4")[2].startswith("a network filesystem")
    assert "host" in classify("virtiofs")[2] and "host" in classify("9p")[2]
    assert "FUSE" in classify("fuse.rclone")[2] and "sshfs" in classify("fuseblk")[2]
    assert "cluster" in classify("ocfs2")[2]
    assert classify(None, None)[:2] == ("?", "unchecked")
    assert classify(None, 0x1234)[:2] == ("0x1234", "unknown")
    # A name missing from the tables but a magic that is in them: the magic decides.
    assert classify("ext4dev", 0xEF53)[:2] == ("ext4dev", "safe")
    assert classify("nfs5", 0x6969)[:2] == ("nfs5", "unsafe")
    for name in filesystems.UNSAFE:
        assert name not in filesystems.SAFE
    assert {classify(None, m)[1] for m in filesystems.MAGICS} <= {"safe", "unsafe"}


def test_mountinfo_parsing_and_the_mount_of_a_directory():
    text = "\n".join([
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw",
        "23 22 8:2 / /home rw - xfs /dev/sda2 rw",
        "24 23 0:50 / /home/u/share rw - nfs4 files:/export rw,vers=4.2",
        r"25 22 8:1 /srv /mnt/my\040disk rw - ext4 /dev/sda1 rw",  # a bind mount
        "26 22 0:51 / /vol rw - btrfs /dev/sdb rw,subvol=/",
        "garbage",
    ])
    mounts_ = parse_mountinfo(text)
    assert len(mounts_) == 5
    assert mounts_[3].mount_point == "/mnt/my disk" and mounts_[3].device == (8, 1)

    def fstype(directory: str, device: tuple[int, int]) -> str:
        found = mount_of(directory, mounts_, device)
        assert found is not None
        return f"{found.fstype} {found.mount_point}"

    assert fstype("/home/u/share/sub", (0, 50)) == "nfs4 /home/u/share"
    assert fstype("/home/u", (8, 2)) == "xfs /home"
    assert fstype("/home/u/sharex", (8, 2)) == "xfs /home"   # a prefix is not a parent
    assert fstype("/mnt/my disk/x", (8, 1)) == "ext4 /mnt/my disk"
    assert fstype("/etc", (8, 1)) == "ext4 /"
    # btrfs subvolumes report a device of their own: found by the path instead.
    assert fstype("/vol/sub/dir", (0, 77)) == "btrfs /vol"


def test_an_overlay_is_judged_by_the_layer_that_takes_the_writes(tmp_path: Path):
    upper = tmp_path / "upper"
    upper.mkdir()
    (mount,) = parse_mountinfo(
        f"49 27 0:41 / /m rw - overlay overlay rw,lowerdir=/l,upperdir={upper},workdir=/w")
    verdict, reason = filesystems._overlay(mount, 0)
    here = filesystems.examine(upper / "x.db")
    assert verdict == here.verdict and here.type in reason
    (docker,) = parse_mountinfo(MOUNTS[5][0])
    assert filesystems._overlay(docker, 0)[0] == "safe"  # upper layer not visible


def test_the_directory_examined(tmp_path: Path):
    assert existing_directory(tmp_path / "a" / "b" / "state.db") == str(tmp_path)
    real = tmp_path / "real"
    real.mkdir()
    (real / "state.db").write_bytes(b"")
    link = tmp_path / "link.db"
    link.symlink_to(real / "state.db")
    # SQLite puts the -wal and -shm beside the file a symlink points to.
    assert existing_directory(link) == str(real)


def test_macos_statfs_layout_and_names():
    assert ctypes.sizeof(MacStatfs) == 2168
    assert MacStatfs.f_fstypename.offset == 72 and MacStatfs.f_mntonname.offset == 88
    for name, verdict in [("apfs", "safe"), ("hfs", "safe"), ("msdos", "safe"),
                          ("exfat", "safe"), ("smbfs", "unsafe"), ("nfs", "unsafe"),
                          ("afpfs", "unsafe"), ("webdav", "unsafe"), ("macfuse", "unsafe"),
                          ("osxfuse", "unsafe"), ("lifs", "unknown")]:
        buf = MacStatfs()
        buf.f_fstypename = name.encode()
        buf.f_mntonname = b"/Volumes/X"
        fs = from_mac_statfs(buf, "/Volumes/X/dir")
        assert (fs.type, fs.verdict, fs.mount_point) == (name, verdict, "/Volumes/X")


def test_windows_unc_paths():
    unc = filesystems._is_unc
    assert unc(r"\\server\share\dir") and unc(r"\\?\UNC\server\share") and unc("//srv/x")
    assert not unc(r"\\?\C:\Users\u") and not unc(r"C:\Users\u") and not unc("/home/u")


# -- what the engine does with the verdict --------------------------------------------

def fake(verdict: str, fstype: str = "nfs4", magic: int | None = 0x6969) -> Filesystem:
    return Filesystem(fstype, magic, "/mnt/share", "files:/export", verdict,
                      classify(fstype, magic)[2], "/mnt/share/dir")


def pretend(monkeypatch: pytest.MonkeyPatch, fstype: str = "nfs4",
            magic: int | None = 0x6969) -> None:
    """Every store of this test is on a filesystem of this type."""
    monkeypatch.setattr(filesystems, "examine", fakefs.on(fstype, magic))


def test_policy_from_the_option_or_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(ENV_POLICY, raising=False)
    assert policy(None) == "refuse"
    monkeypatch.setenv(ENV_POLICY, " Journal ")
    assert policy(None) == "journal"
    assert policy("allow") == "allow"  # the option wins
    with pytest.raises(ConfigurationError, match="unsafe_filesystem must be one of"):
        policy("wal")
    monkeypatch.setenv(ENV_POLICY, "yes")
    with pytest.raises(ConfigurationError, match=ENV_POLICY):
        policy(None)


@pytest.mark.parametrize("verdict, chosen, journal", [
    ("safe", "refuse", False), ("safe", "journal", False), ("safe", "allow", False),
    ("unsafe", "refuse", UnsafeFilesystemError), ("unsafe", "journal", True),
    ("unsafe", "allow", False), ("unknown", "refuse", FilesystemWarning),
    ("unknown", "journal", True), ("unknown", "allow", False),
    ("unchecked", "refuse", False), ("unchecked", "journal", True),
    ("unchecked", "allow", False),
])
def test_what_each_policy_does(verdict: str, chosen: str, journal):
    fs = fake(verdict)
    if journal is UnsafeFilesystemError:
        with pytest.raises(UnsafeFilesystemError):
            use_journal("/mnt/share/dir/state.db", fs, chosen)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = use_journal("/mnt/share/dir/state.db", fs, chosen)
    assert got is (journal is True)
    assert [w.category for w in caught] == ([FilesystemWarning]
                                            if journal is FilesystemWarning else [])


def test_an_unsafe_filesystem_is_refused_before_anything_is_created(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(ENV_POLICY, raising=False)
    pretend(monkeypatch, "nfs4", 0x6969)
    path = tmp_path / "new-dir" / "state.db"
    with pytest.raises(UnsafeFilesystemError) as caught:
        SessionDB(path)
    err = caught.value
    assert isinstance(err, DatabaseOpenError)
    assert (err.path, err.filesystem, err.magic, err.mount_point) == (
        str(path), "nfs4", 0x6969, "/mnt/share")
    text = str(err)
    for words in ("nfs4", "0x6969", "a network filesystem", "local disk", "postgresql://",
                  "unsafe_filesystem='journal'", f"{ENV_POLICY}=journal", "nothing was"):
        assert words in text, words
    assert not (tmp_path / "new-dir").exists()  # not even its directory

    existing = tmp_path / "existing.db"
    monkeypatch.undo()
    SessionDB(existing).close()
    before = sorted(os.listdir(tmp_path)), existing.read_bytes()
    monkeypatch.delenv(ENV_POLICY, raising=False)
    pretend(monkeypatch, "virtiofs", 0x65735546)
    with pytest.raises(UnsafeFilesystemError, match="virtiofs"):
        SessionDB(existing)
    assert (sorted(os.listdir(tmp_path)), existing.read_bytes()) == before


def test_opt_in_by_option_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(ENV_POLICY, raising=False)
    pretend(monkeypatch, "fuse.sshfs", 0x65735546)
    with SessionDB(tmp_path / "a.db", unsafe_filesystem="journal") as db:
        assert db.stats()["journal_mode"] == "delete"
        assert db.stats()["filesystem"]["type"] == "fuse.sshfs"
    monkeypatch.setenv(ENV_POLICY, "journal")
    with SessionDB(tmp_path / "a.db") as db:
        assert db._engine._conn.pragma("journal_mode") == "delete"
    with SessionDB(tmp_path / "b.db", unsafe_filesystem="allow") as db:  # WAL, at your risk
        assert db._engine._conn.pragma("journal_mode") == "wal"


def test_an_unknown_filesystem_warns_and_uses_wal(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(ENV_POLICY, raising=False)
    pretend(monkeypatch, "foofs", 0x12345678)
    with pytest.warns(FilesystemWarning, match="foofs.*unsafe_filesystem='allow'") as rec:
        db = SessionDB(tmp_path / "a.db")
    assert rec[0].filename == __file__  # attributed to the caller's line
    with db:
        assert db._engine._conn.pragma("journal_mode") == "wal"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SessionDB(tmp_path / "a.db", unsafe_filesystem="allow").close()  # silenced


def test_postgresql_urls_are_not_examined(monkeypatch: pytest.MonkeyPatch, pg_url: str):
    def boom(path: object) -> Filesystem:
        raise AssertionError("a URL was examined")
    monkeypatch.setattr(filesystems, "examine", boom)
    monkeypatch.setenv(ENV_POLICY, "journal")  # read by SQLite stores only
    with SessionDB(pg_url) as db:
        db.create_session("s", "cli")
        assert db.backend == "postgresql"
    with pytest.raises(ConfigurationError, match="unsafe_filesystem' does not apply"):
        SessionDB(pg_url, unsafe_filesystem="journal")


def test_doctor_reports_the_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]):
    monkeypatch.delenv(ENV_POLICY, raising=False)
    path = tmp_path / "state.db"
    SessionDB(path).close()
    report = doctor.check(path)
    fs = report["filesystem"]
    assert report["ok"] and fs["verdict"] == "safe" and fs["magic"].startswith("0x")
    assert fs["directory"] == str(tmp_path)
    assert cli_main(["doctor", "--db", str(path)]) == 0
    assert f"filesystem       {fs['type']} (magic {fs['magic']})" in capsys.readouterr().out

    pretend(monkeypatch, "cifs", 0xFF534D42)
    report = doctor.check(path)
    assert not report["ok"] and report["filesystem"]["type"] == "cifs"
    assert "cifs" in report["problems"][0] and "unsafe_filesystem='journal'" in \
        report["problems"][0]
    monkeypatch.setenv(ENV_POLICY, "journal")  # what the store's processes are told
    report = doctor.check(path)
    assert report["ok"] and report["journal_mode"] == "delete"


# -- real filesystems -----------------------------------------------------------------

@pytest.mark.parametrize("kind, fstype", [("tmpfs", "tmpfs"), ("ramfs", "ramfs"),
                                          ("ext4", "ext4"), ("xfs", "xfs"),
                                          ("btrfs", "btrfs"), ("overlay", "overlay")])
def test_local_filesystems_get_wal(tmp_path: Path, kind: str, fstype: str,
                                   monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(ENV_POLICY, raising=False)
    with mounts.mounted(kind, tmp_path) as mnt:
        path = mnt / "data" / "state.db"
        fs = filesystems.examine(path)
        assert (fs.type, fs.verdict, fs.mount_point) == (fstype, "safe", str(mnt))
        assert fs.magic == {v: k for k, v in filesystems.MAGICS.items()}.get(
            fstype, 0xEF53)
        if kind == "overlay":  # its upper layer is on the tmp directory's filesystem
            assert "upper layer is on" in fs.reason
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            db = SessionDB(path)
        with db:
            db.create_session("s", "cli")
            db.append_message("s", "user", f"on {fstype}")
            assert db.stats()["journal_mode"] == "wal"
        report = doctor.check(path)
        assert report["ok"] and report["filesystem"]["type"] == fstype


def test_a_real_fuse_filesystem_is_refused_and_works_with_the_journal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(ENV_POLICY, raising=False)
    with mounts.mounted("fuse", tmp_path) as mnt:
        path = mnt / "state.db"
        with pytest.raises(UnsafeFilesystemError) as caught:
            SessionDB(path)
        assert caught.value.filesystem == "fuse.passfs"
        assert caught.value.magic == 0x65735546 and caught.value.mount_point == str(mnt)
        assert os.listdir(mnt) == []
        with SessionDB(path, unsafe_filesystem="journal") as db:
            db.create_session("s", "cli")
            ids = [db.append_message("s", "user", f"over FUSE {i}") for i in range(20)]
            assert db.search_messages("FUSE")[0]["id"] == ids[-1]
            assert db.checkpoint() == {"wal_frames": 0, "checkpointed_frames": 0}
        assert sorted(os.listdir(mnt)) == ["state.db", "state.db.sessiondb-gate",
                                           "state.db.sessiondb-procs"]
        monkeypatch.setenv(ENV_POLICY, "journal")
        report = doctor.check(path)
        assert report["ok"] and report["journal_mode"] == "delete"
        assert report["filesystem"]["verdict"] == "unsafe"
