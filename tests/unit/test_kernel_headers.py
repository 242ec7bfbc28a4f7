import pytest

from bpfprof.collector.errors import SetupError
from bpfprof.collector.probe.kernel_headers import find_kernel_headers


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")


def test_debian_split_tree_pairs_arch_with_common(tmp_path, monkeypatch):
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    _touch(tmp_path / "linux-headers-6.1.0-9-common/include/linux/kconfig.h")
    _touch(tmp_path / "linux-headers-6.1.0-9-amd64/include/generated/autoconf.h")
    headers = find_kernel_headers("0.0.0-test", src_root=str(tmp_path))
    assert headers.source == str(tmp_path / "linux-headers-6.1.0-9-common")
    assert f"-I{tmp_path}/linux-headers-6.1.0-9-amd64/include" in headers.cflags
    assert "stand-in for" in headers.description


def test_complete_tree_newest_first(tmp_path, monkeypatch):
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    for version in ("5.15.0-9-generic", "6.8.0-10-generic"):
        _touch(tmp_path / f"linux-headers-{version}/include/linux/kconfig.h")
        _touch(tmp_path / f"linux-headers-{version}/include/generated/autoconf.h")
    headers = find_kernel_headers("0.0.0-test", src_root=str(tmp_path))
    assert headers.source.endswith("linux-headers-6.8.0-10-generic") and headers.cflags == ()


def test_env_override_and_missing_headers_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path))
    assert find_kernel_headers("0.0.0-test", src_root=str(tmp_path)).source == str(tmp_path)
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path / "nope"))
    with pytest.raises(SetupError, match="is not a directory"):
        find_kernel_headers("0.0.0-test", src_root=str(tmp_path))
    monkeypatch.delenv("BCC_KERNEL_SOURCE")
    with pytest.raises(SetupError, match="apt-get install linux-headers"):
        find_kernel_headers("0.0.0-test", src_root=str(tmp_path))
