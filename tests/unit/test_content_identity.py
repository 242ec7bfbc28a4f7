"""Identity by content: two binaries that claim one build ID share neither names nor unwind
rows, in memory or in the disk cache; copies of one binary do; the cache stays within its
bound, least recently used out first, and ignores a forged file under the right name."""

import os
import shutil
import subprocess
import time

import pytest

from bpfprof.symbolizer.native import unwind_cache
from bpfprof.symbolizer.native.content_identity import content_identity
from bpfprof.symbolizer.native.elf import SYMBOL_SECTIONS, open_elf, read_build_id
from bpfprof.symbolizer.native.symbolizer import NativeSymbolizer, ObjectFile
from bpfprof.symbolizer.native.unwind_cache import FORMAT_VERSION, cache_path, open_unwind_table
from bpfprof.symbolizer.native.unwind_table import UNWIND_SECTIONS, build_unwind_table

CLAIMED = "-Wl,--build-id=0x" + "5a" * 20


@pytest.fixture
def pair(build_c, tmp_path):
    """(honest, impostor): two binaries of other code with one build ID, copied here."""
    honest, impostor = tmp_path / "honest", tmp_path / "impostor"
    shutil.copy(build_c("impostor", CLAIMED), honest)
    shutil.copy(build_c("impostor", CLAIMED, "-DIMPOSTOR"), impostor)
    return honest, impostor


def object_file(path):
    st = os.stat(path)
    return ObjectFile((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino), str(path), str(path), "/")


def identity(path, sections):
    stream, elf = open_elf(str(path))
    with stream:
        return content_identity(elf, stream.fileno(), read_build_id(elf), sections)


def test_a_claimed_build_id_is_not_an_identity(pair):
    honest, impostor = pair
    assert identity(honest, UNWIND_SECTIONS).build_id == identity(impostor, UNWIND_SECTIONS).build_id == "5a" * 20
    for sections in (UNWIND_SECTIONS, SYMBOL_SECTIONS):
        assert identity(honest, sections) != identity(impostor, sections)
        assert identity(honest, sections) == identity(honest, sections)


def test_an_impostor_cached_first_gives_the_honest_binary_none_of_its_rows(pair, tmp_path):
    honest, impostor = pair
    cache = str(tmp_path / "cache")
    fake = open_unwind_table(str(impostor), cache)
    real = open_unwind_table(str(honest), cache)
    assert not real.from_cache and real.build_id == fake.build_id
    assert real.rows == build_unwind_table(str(honest)).rows != fake.rows
    again = open_unwind_table(str(honest), cache)
    assert again.from_cache and again.rows == real.rows
    assert len(os.listdir(cache)) == 2


def test_an_impostor_read_first_gives_the_honest_binary_none_of_its_names(pair):
    honest, impostor = pair
    native = NativeSymbolizer()
    try:
        fake, real = object_file(impostor), object_file(honest)
        assert native.get_frame(fake, 0x1000).module.build_id == "5a" * 20
        assert native.get_symbols(real) is not native.get_symbols(fake)
        names = {native.get_frame(real, offset).name for offset in range(0x1000, 0x1200)}
        assert "honest_work" in names and "impostor_work" not in names
        assert native.get_frame(real, 0x1000).module.build_id == "5a" * 20  # what pprof mappings show
    finally:
        native.close()


def test_copies_of_one_binary_share_symbols_and_cached_rows(pair, tmp_path):
    honest, _ = pair
    copy = tmp_path / "copy"
    shutil.copy(honest, copy)  # another inode, as in another container's image
    bare, bare_copy = tmp_path / "bare", tmp_path / "bare_copy"
    subprocess.run(["objcopy", "--strip-debug", str(honest), str(bare)], check=True)
    shutil.copy(bare, bare_copy)
    native = NativeSymbolizer()
    try:
        assert native.get_symbols(object_file(bare)) is native.get_symbols(object_file(bare_copy))
        # Lines are read from a file when asked for, long after its identity was taken,
        # and its owner may have rewritten it: copies with lines each read their own.
        assert native.get_symbols(object_file(honest)) is not native.get_symbols(object_file(copy))
    finally:
        native.close()
    cache = str(tmp_path / "cache")
    first = open_unwind_table(str(honest), cache)
    second = open_unwind_table(str(copy), cache)
    assert second.from_cache and second.identity == first.identity and second.rows == first.rows


def test_a_forged_or_damaged_cache_file_under_the_right_name_is_ignored(pair, tmp_path):
    honest, impostor = pair
    cache = tmp_path / "cache"
    fake = open_unwind_table(str(impostor), str(cache))
    place = cache_path(str(cache), identity(honest, UNWIND_SECTIONS))
    os.replace(cache_path(str(cache), fake.identity), place)  # the impostor's rows, whole, under the honest name
    real = open_unwind_table(str(honest), str(cache))
    assert not real.from_cache and real.rows != fake.rows
    good = open(place, "rb").read()
    for damaged in (good[:-1] + bytes([good[-1] ^ 1]), good[:40], b""):
        with open(place, "wb") as f:
            f.write(damaged)
        assert not open_unwind_table(str(honest), str(cache)).from_cache
    target = tmp_path / "elsewhere"
    target.write_bytes(good)
    os.unlink(place)
    os.symlink(target, place)
    assert not open_unwind_table(str(honest), str(cache)).from_cache  # not read through a link


def test_the_cache_stays_within_its_bound_least_recently_used_out_first(pair, tmp_path):
    honest, impostor = pair
    cache = tmp_path / "cache"
    first = open_unwind_table(str(honest), str(cache))
    kept = cache_path(str(cache), first.identity)
    elsewhere = open_unwind_table(str(impostor), str(tmp_path / "elsewhere"))
    bound = os.path.getsize(kept) + os.path.getsize(cache_path(str(tmp_path / "elsewhere"), elsewhere.identity)) + 1000
    now = time.time()

    def entry(name, age, data=b"\0" * 1000):
        path = cache / name
        path.write_bytes(data)
        os.utime(path, (now - age, now - age))
        return path

    oldest = entry(f"v{FORMAT_VERSION}-{'1' * 64}.bin", 300)
    older = entry(f"v{FORMAT_VERSION}-{'2' * 64}.bin", 200)
    os.utime(kept, (now - 400, now - 400))
    stale = [entry("5a" * 20 + ".bin", 0), entry(f"v{FORMAT_VERSION - 1}-{'3' * 64}.bin", 0),
             entry(unwind_cache.TEMPORARY_PREFIX + "left", 7200)]
    others = [entry("notes.txt", 500), entry(unwind_cache.TEMPORARY_PREFIX + "writing", 0)]
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\0" * 1000)
    link = cache / f"v{FORMAT_VERSION}-{'4' * 64}.bin"
    os.symlink(outside, link)

    assert open_unwind_table(str(honest), str(cache)).from_cache  # used: now the most recent
    second = open_unwind_table(str(impostor), str(cache), max_bytes=bound)
    written = cache_path(str(cache), second.identity)
    assert os.path.exists(kept) and os.path.exists(written) and os.path.exists(older)
    assert not oldest.exists() and not any(p.exists() for p in stale)
    assert all(p.exists() for p in others) and link.is_symlink() and outside.exists()
    assert sum(os.path.getsize(p) for p in (kept, written, older)) == bound
