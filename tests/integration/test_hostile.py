"""Hostile processes beside an honest one, under `record -a` and `agent`: crafted binaries
mapped executable (a foreign build-ID note, a borrowed build ID, garbage DWARF, a lost
.debug_abbrev, a corrupt compressed section, an endless .eh_frame, a debug link to a
FIFO), fake interpreters whose structures loop on themselves or claim absurd sizes,
CPython code objects sharing a line table of a megabyte with an endless varint, and names
full of control characters. Both must go on profiling the honest program with whole
stacks, count what they could not read, stay within the deployment's memory limit and
exit 0."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
from elftools.elf.elffile import ELFFile

from bpfprof.symbolizer.native.elf import read_build_id
from conftest import FIXTURES, bpfprof_command, pyenv_python, run_bpfprof
from samples import read_samples, share
from test_agent import RunningAgent, free_port, scrape

pytestmark = pytest.mark.usefixtures("bpf_ready")

HOSTILE = FIXTURES / "hostile"
MEMORY_LIMIT = 384 << 20  # the DaemonSet's limit (deploy/kubernetes/daemonset.yaml)
EVIL_NAME = "evil\n;x 9\x1b[2J"
EVIL_THREAD = "th\n99\x1b]0;"
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
HOSTILE_COMMS = {"evil\\x0a;x 9\\x1b[2J"}  # EVIL_NAME as labels carry it


def _spin_offset(binary: Path) -> int:
    """The file offset of hostile_spin."""
    with open(binary, "rb") as f:
        elf = ELFFile(f)
        address = elf.get_section_by_name(".symtab").get_symbol_by_name("hostile_spin")[0]["st_value"]
        for segment in elf.iter_segments():
            if segment["p_type"] == "PT_LOAD" and 0 <= address - segment["p_vaddr"] < segment["p_filesz"]:
                return address - segment["p_vaddr"] + segment["p_offset"]
    raise AssertionError(f"no hostile_spin in {binary}")


def _section(binary: Path, name: str):
    with open(binary, "rb") as f:
        section = ELFFile(f).get_section_by_name(name)
        return section["sh_offset"], section["sh_size"]


def _patch(binary: Path, offset: int, data: bytes) -> None:
    with open(binary, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _gcc(out: Path, source: Path, *flags: str) -> Path:
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", *flags, "-o", str(out), str(source)], check=True)
    return out


def _crafted_binaries(directory: Path, honest_build_id: str) -> Dict[str, Path]:
    """Copies of hostile_spin's library, each broken in one way, by what is broken."""
    rng = random.Random(20)
    code = HOSTILE / "code.c"
    base = _gcc(directory / "base.so", code, "-g")
    made = {"honest copy": base}
    # Claims the honest program's build ID: its symbols and unwind rows must not be shared.
    made["borrowed build ID"] = _gcc(directory / "impostor.so", code, "-g", f"-Wl,--build-id=0x{honest_build_id}")
    note = directory / "note.so"
    shutil.copy(base, note)
    offset, _ = _section(note, ".note.gnu.build-id")
    _patch(note, offset + 12, b"EVL\0")  # the owner's name, after namesz, descsz and type
    made["foreign note"] = note
    line = directory / "line.so"
    shutil.copy(base, line)
    offset, size = _section(line, ".debug_line")
    _patch(line, offset, rng.randbytes(size))
    made["garbage .debug_line"] = line
    abbrev = directory / "abbrev.so"
    shutil.copy(base, abbrev)
    data = abbrev.read_bytes()
    _patch(abbrev, data.index(b".debug_abbrev\0"), b".debug_abbrex\0")
    made["no .debug_abbrev"] = abbrev
    zlib_broken = _gcc(directory / "zlib.so", code, "-g", "-gz=zlib")
    offset, size = _section(zlib_broken, ".debug_info")
    _patch(zlib_broken, offset + 24, rng.randbytes(size - 24))  # the payload after Elf64_Chdr
    made["corrupt compressed section"] = zlib_broken
    frames = directory / "frames.so"
    shutil.copy(base, frames)
    offset, size = _section(frames, ".eh_frame")
    _patch(frames, offset + 8, b"\x80" * (size - 8))  # every LEB128 goes on to the end
    made["endless .eh_frame"] = frames
    # No DWARF of its own: its debug link is followed, to a FIFO that nothing writes.
    linked = _gcc(directory / "linked.so", code, "-g0")
    (directory / "fifo.debug").write_bytes(b"")
    subprocess.run(["objcopy", f"--add-gnu-debuglink={directory / 'fifo.debug'}", str(linked)], check=True,
                   cwd=directory)
    (directory / "fifo.debug").unlink()
    os.mkfifo(directory / "fifo.debug")
    made["debug link to a FIFO"] = linked
    return made


class Hostile:
    """The hostile processes and the honest chain beside them; always killed at the end."""

    def __init__(self, directory: Path, chain: Path, chain_seconds: float):
        subprocess.run(["gcc", "-O1", "-o", str(directory / "runner"), str(HOSTILE / "runner.c"), "-ldl", "-lpthread"],
                       check=True)
        fakes = [_gcc(directory / "libpython3.12.so.1.0", HOSTILE / "fake_python.c", "-DPY_VERSION_HEX=0x030C00F0"),
                 _gcc(directory / "libpython3.13.so.1.0", HOSTILE / "fake_python.c", "-DPY_VERSION_HEX=0x030D00F0",
                      "-DDEBUG_OFFSETS")]
        binaries = _crafted_binaries(directory, read_build_id_of(chain))
        offset = _spin_offset(binaries["honest copy"])
        spin = f"{binaries['honest copy']}:{offset}"  # so that the process is sampled, and read
        runners = [[f"{path}:{offset}" for path in binaries.values()], [f"dlopen={fakes[0]}", spin],
                   [f"dlopen={fakes[1]}", spin]]
        self.processes: List[subprocess.Popen] = []
        for args in runners:
            self._start([str(directory / "runner"), EVIL_NAME, EVIL_THREAD, *args])
        self._start([pyenv_python(12), str(HOSTILE / "code_objects.py"), "300"])
        self.chain = subprocess.Popen([str(chain), str(chain_seconds)])

    def _start(self, argv: List[str]) -> None:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.processes.append(process)
        assert process.stdout.readline() == "ready\n", argv

    def close(self) -> None:
        for process in (*self.processes, self.chain):
            if process.poll() is None:
                process.kill()
            process.wait()


def read_build_id_of(binary: Path) -> str:
    with open(binary, "rb") as f:
        return read_build_id(ELFFile(f))


@pytest.fixture
def hostile(build_c, tmp_path):
    world = Hostile(tmp_path, build_c("chain"), 600)  # runs until killed
    yield world
    world.close()


def _check_profile(path: Path, hostile_comms: set) -> None:
    """The honest chain whole and named as itself; hostile code never named after it;
    every label free of control characters."""
    samples = read_samples(path)
    chain = [s for s in samples if s.labels["comm"] == "chain"]
    assert sum(s.count for s in chain) >= 50
    assert share(chain, lambda s: s.has_chain("main", "chain_a", "chain_b", "chain_c")) >= 0.9
    others = [s for s in samples if s.labels["comm"] in hostile_comms]
    assert others, "no sample of the hostile processes"
    assert not any(f.startswith("chain_") for s in others for f in s.functions)
    for s in samples:
        for value in s.labels.values():
            assert not CONTROL.search(str(value)), s.labels


def test_record_goes_on_beside_hostile_processes(hostile, tmp_path):
    out = tmp_path / "all.pb.gz"
    profiler = subprocess.Popen([*bpfprof_command(), "record", "-a", "-d", "6", "-o", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(profiler.pid, 0)
    profiler.returncode = os.waitstatus_to_exitcode(status)
    stderr = profiler.stderr.read()
    assert profiler.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert usage.ru_maxrss * 1024 < MEMORY_LIMIT, f"{usage.ru_maxrss} KiB"
    _check_profile(out, HOSTILE_COMMS)
    # Told and counted: the binaries it could not read, the interpreters it could not use.
    assert re.search(r"^bpfprof: \d+ failures reading binaries \(malformed\), e\.g\. ", stderr, re.M), stderr
    assert "CPython 3.13" in stderr and "cannot be read" in stderr, stderr
    assert not CONTROL.search(stderr.replace("\n", "")), stderr
    # Folded stacks: one line per stack, whatever the names hold.
    folded = tmp_path / "all.folded"
    result = run_bpfprof("report", str(out), "-o", str(folded))
    assert result.returncode == 0, result.stderr
    lines = folded.read_text().splitlines()
    assert lines and all(re.fullmatch(r"[^\x00-\x1f]+ \d+", line) for line in lines)
    table = run_bpfprof("report", str(out))
    assert table.returncode == 0 and not CONTROL.search(table.stdout.replace("\n", "")), table.stdout


def _resident_peak(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def test_agent_goes_on_beside_hostile_processes(hostile, tmp_path):
    port = free_port()
    agent = RunningAgent(tmp_path, "-F", "99", "--interval", "4s", "--output-dir", str(tmp_path / "profiles"),
                         "--metrics-addr", f"127.0.0.1:{port}")
    try:
        agent.wait_for("interval cut")
        metrics = scrape(port)
        peak = _resident_peak(agent.process.pid)
        agent.stop()
    finally:
        agent.kill()
    assert peak < MEMORY_LIMIT, peak
    failures = {dict(labels)["reason"]: value for (name, labels), value in metrics.items()
                if name == "bpfprof_contained_failures_total" and dict(labels)["boundary"] == "binary"}
    assert failures.get("malformed", 0) >= 1, failures
    # The first interval, whole (the last, cut by SIGTERM, may be short); names sort by start.
    whole_interval = sorted((tmp_path / "profiles").glob("*cpu*.pb.gz"))[0]
    _check_profile(whole_interval, HOSTILE_COMMS)
