"""Files of another process opened inside its root, through openat2 and through the walk
used where the kernel lacks it: links stay inside the root, nothing blocks, only
regular files of accepted sizes are opened."""

import os

import pytest

from bpfprof.symbolizer import safe_open
from bpfprof.symbolizer.errors import NotRegularFile, TooLarge
from bpfprof.symbolizer.safe_open import open_in_root, open_regular
from conftest import skip_or_fail


@pytest.fixture(params=["openat2", "walk"])
def resolve(request, monkeypatch):
    """Each test runs with both ways of resolving."""
    if request.param == "walk":
        monkeypatch.setattr(safe_open, "use_openat2", False)
    elif not safe_open.use_openat2:
        skip_or_fail("the kernel has no openat2")
    yield request.param
    assert safe_open.use_openat2 == (request.param == "openat2")


@pytest.fixture
def root(tmp_path):
    """A process's root: /etc/secret in it, and another beside it (outside it)."""
    (tmp_path / "outside").write_bytes(b"outside")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/secret").write_bytes(b"inside")
    (root / "lib").mkdir()
    return root


def read(fd):
    try:
        return os.pread(fd, 100, 0)
    finally:
        os.close(fd)


def test_a_plain_path_opens_for_reading_without_blocking(root, resolve):
    fd = open_in_root(str(root), "/etc/secret", 100)
    assert os.get_blocking(fd) is False and not os.get_inheritable(fd)
    assert read(fd) == b"inside"


def test_absolute_symlinks_resolve_inside_the_root(root, tmp_path, resolve):
    (root / "lib/host").symlink_to(tmp_path)  # a directory of ours, not of the root
    assert (root / "lib/host/outside").exists()
    with pytest.raises(FileNotFoundError):
        open_in_root(str(root), "/lib/host/outside", 100)
    (root / "lib/etc").symlink_to("/etc")
    assert read(open_in_root(str(root), "/lib/etc/secret", 100)) == b"inside"


def test_dot_dot_does_not_climb_above_the_root(root, resolve):
    assert read(open_in_root(str(root), "/../../../etc/secret", 100)) == b"inside"
    (root / "lib/up").symlink_to("../../..")
    assert read(open_in_root(str(root), "/lib/up/etc/secret", 100)) == b"inside"
    with pytest.raises(FileNotFoundError):
        open_in_root(str(root), "/lib/up/outside", 100)


def test_a_final_symlink_is_not_followed(root, resolve):
    (root / "lib/secret").symlink_to("/etc/secret")
    with pytest.raises(NotRegularFile):
        open_in_root(str(root), "/lib/secret", 100)


def test_a_final_symlink_followed_on_request_stays_inside_the_root(root, tmp_path, resolve):
    """As debug files by build ID are looked for: distributions link them to the file."""
    (root / "lib/secret").symlink_to("/etc/secret")
    assert read(open_in_root(str(root), "/lib/secret", 100, follow_last=True)) == b"inside"
    (root / "lib/relative").symlink_to("../etc/secret")
    assert read(open_in_root(str(root), "/lib/relative", 100, follow_last=True)) == b"inside"
    (root / "lib/out").symlink_to(tmp_path / "outside")  # of ours: not in the root
    with pytest.raises(FileNotFoundError):
        open_in_root(str(root), "/lib/out", 100, follow_last=True)
    (root / "lib/a").symlink_to("b")
    (root / "lib/b").symlink_to("a")
    with pytest.raises(OSError) as e:
        open_in_root(str(root), "/lib/a", 100, follow_last=True)
    assert e.value.errno == 40  # ELOOP


def test_symlink_loops_are_refused(root, resolve):
    (root / "lib/a").symlink_to("b")
    (root / "lib/b").symlink_to("a")
    with pytest.raises(OSError) as e:
        open_in_root(str(root), "/lib/a/x", 100)
    assert e.value.errno == 40  # ELOOP


def test_a_fifo_is_refused_at_once(root, resolve):
    """Opened for reading, a FIFO without a writer would block the profiler for good;
    it is never opened, so this returns at once."""
    os.mkfifo(root / "lib/fifo")
    with pytest.raises(NotRegularFile):
        open_in_root(str(root), "/lib/fifo", 100)


def test_directories_and_devices_are_refused(root, resolve):
    with pytest.raises(NotRegularFile):
        open_in_root(str(root), "/etc", 100)
    (root / "lib/dev").symlink_to("/dev")  # the root has no /dev: the host's is not it
    with pytest.raises(FileNotFoundError):
        open_in_root(str(root), "/lib/dev/null", 100)
    with pytest.raises(NotRegularFile):
        open_in_root("/", "/dev/null", 100)


def test_sizes_are_capped(root, resolve):
    with open(root / "lib/huge", "wb") as f:
        f.truncate(1 << 40)  # sparse: nothing of it is on disk
    with pytest.raises(TooLarge):
        open_in_root(str(root), "/lib/huge", 1 << 30)
    with pytest.raises(TooLarge):
        open_in_root(str(root), "/etc/secret", 5)


def test_open_regular_follows_only_the_link_it_is_given(root, tmp_path):
    link = tmp_path / "fd_like"
    link.symlink_to(root / "etc/secret")
    assert read(open_regular(str(link), 100)) == b"inside"
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(NotRegularFile):
        open_regular(str(tmp_path / "fifo"), 100)


def test_no_descriptor_is_left_behind(root, resolve):
    before = set(os.listdir("/proc/self/fd"))
    (root / "lib/a").symlink_to("b")
    (root / "lib/b").symlink_to("a")
    os.mkfifo(root / "lib/fifo")
    for path in ("/lib/a/x", "/lib/fifo", "/etc", "/missing/x", "/etc/secret/x"):
        with pytest.raises((OSError, NotRegularFile)):
            open_in_root(str(root), path, 100)
    os.close(open_in_root(str(root), "/etc/secret", 100))
    assert set(os.listdir("/proc/self/fd")) == before
