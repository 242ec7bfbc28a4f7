"""Unwind tables for native stacks without frame pointers: for every PC range of an x86-64
binary, how to find the caller's frame, read from `.eh_frame` and `.debug_frame`.

Each row says how to compute the CFA (the caller's RSP) at the PCs from its start to the
next row's: RSP or RBP plus an offset, the PLT stubs' expression, or a rule the BPF
unwinder cannot follow (marked and counted by kind); where the caller's RBP is (unchanged
or saved at CFA+offset); and the return address, which is at CFA-8. A gap between FDEs
gets a row of its own, so a PC there never takes the rule of the function before it.

Record layout, one 64-bit little-endian word per row (`struct unwind_row`, 8 bytes), the
same in memory (array "Q"), in the cache file and, later, in the BPF map:

    u16 cfa_offset   CFA = base register + 8 * cfa_offset (RSP, RBP and PLT rows)
    u8  cfa_kind     CfaKind
    s8  rbp          RBP rule: 0 unchanged; RBP_OTHER (-128) not followable; otherwise
                     the caller's RBP was saved at CFA + 8 * rbp. In PLT rows: the
                     threshold of the PLT expression (see CfaKind.PLT).
    u32 pc           file-relative virtual address (as in the ELF) where the row starts

Offsets count 8-byte words: x86-64 code moves its stack pointer in whole words, and so
frames of 64 KiB and more (CPython and LLVM have some) still fit in 16 bits. The rare
offset that does not fit is counted (CfaKind.ODD_OFFSET: 18 rows in 10 million across
this machine's binaries).

pc is the high half of the word, so rows sorted by word are sorted by PC and a binary
search over the words finds a PC's row. Consecutive rows with the same rule are merged.

The CIE/FDE records and their CFA programs are parsed here rather than by pyelftools,
whose decoder builds an object per instruction and a dict per row (1.4 s over
libpython3.12's .eh_frame, where this parser takes 0.1 s) and, in version 0.33, cannot
decode the DW_CFA_GNU_args_size that some of libc's FDEs hold.
"""

from __future__ import annotations

import bisect
import struct
from array import array
from enum import IntEnum
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from elftools.common.exceptions import ELFError

from bpfprof.symbolizer.native.content_identity import ContentIdentity, content_identity
from bpfprof.symbolizer.native.dwarf_lines import leb128
from bpfprof.symbolizer.native.elf import load_segments, open_elf, read_build_id, read_section
from bpfprof.symbolizer.errors import SymbolizerError


class CfaKind(IntEnum):
    """How a row finds the CFA. Kinds from 16 on are rules the BPF unwinder cannot
    follow: unwinding stops there, and they are counted."""

    NONE = 0  # no FDE covers the PC: no unwind information
    RSP = 1  # CFA = RSP + 8 * cfa_offset
    RBP = 2  # CFA = RBP + 8 * cfa_offset
    PLT = 3  # PLT stubs: CFA = RSP + 8 * cfa_offset + ((RIP & 15) >= threshold ? 8 : 0)
    END = 4  # return address undefined: the outermost frame (_start, a thread's start)
    SIGNAL = 5  # a signal trampoline (its CIE says 'S'): the registers are in the signal frame at RSP
    REGISTER = 16  # CFA = another register + offset (a realigned stack's R10, longjmp)
    EXPRESSION = 17  # CFA = any other DWARF expression (signal trampolines, realigned stacks)
    ODD_OFFSET = 18  # RSP/RBP + an offset the record cannot hold: not whole words, or 512 KiB+
    RA_ELSEWHERE = 19  # the return address is not at CFA-8
    RSP_ELSEWHERE = 20  # the caller's RSP is not the CFA

    @property
    def supported(self) -> bool:
        return self < 16


class RbpRule(IntEnum):
    """Where the caller's RBP is."""

    UNCHANGED = 0  # the caller's RBP is still in RBP
    SAVED = 1  # saved at CFA + rbp_offset
    OTHER = 2  # in another register, from an expression, undefined: not followable


RBP_OTHER = -128
RECORD_SIZE = 8
_RULE_MASK = 0xFFFFFFFF
_NO_INFO = int(CfaKind.NONE) << 16
_MAX_PC = 0xFFFFFFFF

# DWARF register numbers on x86-64 (System V psABI, figure 3.36)
_RBP, _RSP, _RIP = 6, 7, 16


class UnwindRow(NamedTuple):
    """One record, decoded; offsets in bytes."""

    pc: int  # where the row starts
    cfa_kind: CfaKind
    cfa_offset: int
    rbp_rule: RbpRule
    rbp_offset: int  # CFA-relative, for RbpRule.SAVED
    plt_threshold: int  # for CfaKind.PLT

    @classmethod
    def unpack(cls, word: int) -> "UnwindRow":
        pc, kind, cfa_offset = word >> 32, CfaKind(word >> 16 & 0xFF), 8 * (word & 0xFFFF)
        rbp = (word >> 24 & 0xFF) - ((word >> 24 & 0x80) << 1)  # the signed byte
        if kind == CfaKind.PLT:
            return cls(pc, kind, cfa_offset, RbpRule.UNCHANGED, 0, rbp)
        if rbp == RBP_OTHER:
            return cls(pc, kind, cfa_offset, RbpRule.OTHER, 0, 0)
        return cls(pc, kind, cfa_offset, RbpRule.SAVED if rbp else RbpRule.UNCHANGED, 8 * rbp, 0)


class UnwindTable:
    """The unwind rows of one binary, sorted by PC. `unreadable_fdes` counts FDEs (or
    CIEs' FDEs) that could not be parsed: their PCs have no unwind information."""

    def __init__(self, identity: ContentIdentity, rows: array, unreadable_fdes: int = 0,
                 segments: Sequence[Tuple[int, int, int]] = ()) -> None:
        self.identity = identity  # of the binary, as far as its rows go
        self.build_id = identity.build_id
        self.rows = rows  # array("Q") of records, layout in the module docstring
        self.unreadable_fdes = unreadable_fdes
        self.segments = tuple(segments)  # the binary's PT_LOAD segments, as elf.load_segments gives them
        # Set by unwind_cache: whether the rows were read from the cache, and why they
        # could not be written there, if they could not.
        self.from_cache = False
        self.cache_error = ""

    def num_rows(self) -> int:
        return len(self.rows)

    def lookup(self, pc: int) -> UnwindRow:
        """The row in force at a file-relative virtual address (CfaKind.NONE outside every FDE)."""
        if pc > _MAX_PC:
            return UnwindRow.unpack(_NO_INFO)
        i = bisect.bisect_right(self.rows, pc << 32 | _RULE_MASK) - 1
        return UnwindRow.unpack(self.rows[i] if i >= 0 else _NO_INFO)

    def records(self) -> bytes:
        """The rows as `struct unwind_row` records, ready to copy into a BPF map."""
        return self.rows.tobytes()

    def cfa_kind_counts(self) -> Dict[CfaKind, int]:
        counts: Dict[CfaKind, int] = {}
        for word in self.rows:
            kind = CfaKind(word >> 16 & 0xFF)
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def num_rbp_other(self) -> int:
        """Rows whose caller's RBP cannot be recovered (the CFA still can be)."""
        return sum(1 for word in self.rows if word >> 24 & 0xFF == RBP_OTHER & 0xFF)


# --- .eh_frame / .debug_frame records ---------------------------------------------------

class _Malformed(Exception):
    """A CIE, FDE or CFA program that cannot be read."""


# Pointer encodings (DW_EH_PE_*, LSB 5.0 "Exception Frames"): low nibble the format,
# 0x70 bits how the value applies. Only pcrel is used for code addresses on x86-64.
_PE_OMIT = 0xFF
_PE_PCREL = 0x10
_PE_INDIRECT = 0x80  # the value is the address of the pointer: personality routines only
_FIXED_FORMATS = {0x00: (8, False), 0x02: (2, False), 0x03: (4, False), 0x04: (8, False),
                  0x0A: (2, True), 0x0B: (4, True), 0x0C: (8, True)}  # format: (size, signed)


def _read_pointer(data: bytes, i: int, encoding: int, section_address: int) -> Tuple[int, int]:
    """The value of an encoded pointer at data[i] (its address section_address + i) and
    the index after it."""
    fmt = encoding & 0x0F
    fixed = _FIXED_FORMATS.get(fmt)
    if fixed is not None:
        size, signed = fixed
        if i + size > len(data):
            raise _Malformed("pointer beyond the section")
        value = int.from_bytes(data[i:i + size], "little", signed=signed)
        after = i + size
    elif fmt in (0x01, 0x09):  # uleb128, sleb128
        value, after = leb128(data, i, signed=fmt == 0x09)
    else:
        raise _Malformed(f"pointer format {fmt:#x}")
    application = encoding & 0x70
    if application == _PE_PCREL:
        value += section_address + i
    elif application or encoding & _PE_INDIRECT:
        raise _Malformed(f"pointer encoding {encoding:#x}")  # text/data/func-relative: not for code addresses
    return value & 0xFFFFFFFFFFFFFFFF, after


class _Cie(NamedTuple):
    code_align: int
    data_align: int
    ra_register: int
    fde_encoding: int
    has_augmentation_data: bool  # 'z': FDEs carry a length-prefixed augmentation block
    signal_frame: bool  # 'S': its FDEs are signal trampolines (glibc's __restore_rt)
    initial: Tuple  # (cfa_reg, cfa_offset, cfa_expression, rules) after the initial instructions


def _parse_cie(data: bytes, start: int, end: int, section_address: int) -> _Cie:
    """The CIE whose fields begin at data[start] (after its ID) and end at data[end]."""
    version = data[start]
    if version not in (1, 3, 4):
        raise _Malformed(f"CIE version {version}")
    i = data.index(b"\0", start + 1)
    augmentation = data[start + 1:i]
    i += 1
    if version == 4:
        i += 2  # address_size, segment_selector_size: x86-64 code addresses are 8 bytes
    code_align, i = leb128(data, i)
    data_align, i = leb128(data, i, signed=True)
    if version == 1:
        ra_register, i = data[i], i + 1
    else:
        ra_register, i = leb128(data, i)
    fde_encoding = 0x00  # absptr, unless 'R' says otherwise
    has_data = augmentation.startswith(b"z")
    if has_data:
        length, i = leb128(data, i)
        after = i + length
        for letter in augmentation[1:]:
            if letter == ord("R"):
                fde_encoding = data[i]
                i += 1
            elif letter == ord("L"):
                i += 1  # LSDA encoding
            elif letter == ord("P"):  # the personality routine: skipped, so its format alone
                encoding = data[i]
                i += 1
                if encoding != _PE_OMIT:
                    _, i = _read_pointer(data, i, encoding & 0x0F, section_address)
            elif letter not in (ord("S"), ord("B"), ord("G")):
                break  # unknown: the length still says where the instructions are
        i = after
    elif augmentation:
        raise _Malformed(f"CIE augmentation {augmentation!r}")
    cie = _Cie(code_align, data_align, ra_register, fde_encoding, has_data, has_data and b"S" in augmentation,
               (_RSP, 0, None, {}))
    initial = _run_program(data, i, end, cie, None, 0, 0, section_address)
    return cie._replace(initial=initial)


_SAME, _UNDEFINED, _ELSEWHERE = "same value", "undefined", "elsewhere"  # register rules


def _run_program(data: bytes, i: int, end: int, cie: _Cie, rows: Optional[List[int]], loc: int, pc_end: int,
                 section_address: int) -> Tuple:
    """Runs a CFA program. For an FDE (rows given) appends its rows as records, from loc
    up to pc_end, the last one the end of the FDE (no unwind information); for a CIE
    (rows None) returns the state its initial instructions leave.

    Rules are kept for every register (a register's rule: None unspecified, an int the
    CFA offset it was saved at, or one of the _SAME, _UNDEFINED, _ELSEWHERE markers);
    only RBP, RSP and the return address matter, when a row is made."""
    cfa_reg, cfa_offset, cfa_expression, rules = cie.initial
    rules = dict(rules)
    initial_rules = cie.initial[3]
    code_align, data_align = cie.code_align, cie.data_align
    remembered: List[Tuple] = []
    last_rule = -1
    while i < end:
        op = data[i]
        i += 1
        high = op & 0xC0
        if high == 0x40 or (op and op <= 0x04):  # advance_loc, set_loc, advance_loc1/2/4
            if high == 0x40:
                delta = (op & 0x3F) * code_align
            elif op == 0x01:
                target, i = _read_pointer(data, i, cie.fde_encoding, section_address)
                delta = target - loc
            else:
                size = 1 << (op - 2)
                delta = int.from_bytes(data[i:i + size], "little") * code_align
                i += size
            if rows is not None and loc < pc_end:
                rule = _rule(cfa_reg, cfa_offset, cfa_expression, rules, cie.ra_register)
                if rule != last_rule:
                    if rows and rows[-1] >> 32 == loc:  # two rows at one PC: the later stands
                        rows.pop()
                    rows.append(loc << 32 | rule)
                    last_rule = rule
            loc += delta
        elif high == 0x80:  # offset
            value, i = leb128(data, i)
            rules[op & 0x3F] = value * data_align
        elif op == 0x0E:  # def_cfa_offset
            cfa_offset, i = leb128(data, i)
        elif op == 0x00:  # nop
            pass
        elif high == 0xC0:  # restore
            _restore(rules, initial_rules, op & 0x3F)
        elif op == 0x0A:  # remember_state
            remembered.append((cfa_reg, cfa_offset, cfa_expression, dict(rules)))
        elif op == 0x0B:  # restore_state (the CFA rule too, as GCC's and binutils' readers do)
            if not remembered:
                raise _Malformed("restore_state without remember_state")
            cfa_reg, cfa_offset, cfa_expression, rules = remembered.pop()
        elif op == 0x0C or op == 0x12:  # def_cfa, def_cfa_sf
            cfa_reg, i = leb128(data, i)
            if op == 0x0C:
                cfa_offset, i = leb128(data, i)
            else:
                cfa_offset, i = leb128(data, i, signed=True)
                cfa_offset *= data_align
            cfa_expression = None
        elif op == 0x0D:  # def_cfa_register
            cfa_reg, i = leb128(data, i)
            cfa_expression = None
        elif op == 0x13:  # def_cfa_offset_sf
            cfa_offset, i = leb128(data, i, signed=True)
            cfa_offset *= data_align
        elif op == 0x0F:  # def_cfa_expression
            length, i = leb128(data, i)
            cfa_expression = bytes(data[i:i + length])
            i += length
        elif op in (0x05, 0x11, 0x2F):  # offset_extended, offset_extended_sf, GNU_negative_offset_extended
            register, i = leb128(data, i)
            value, i = leb128(data, i, signed=op == 0x11)
            rules[register] = -value * data_align if op == 0x2F else value * data_align
        elif op == 0x06:  # restore_extended
            register, i = leb128(data, i)
            _restore(rules, initial_rules, register)
        elif op == 0x07 or op == 0x08:  # undefined, same_value
            register, i = leb128(data, i)
            rules[register] = _UNDEFINED if op == 0x07 else _SAME
        elif op in (0x09, 0x14, 0x15):  # register, val_offset, val_offset_sf
            register, i = leb128(data, i)
            _, i = leb128(data, i, signed=op == 0x15)
            rules[register] = _ELSEWHERE
        elif op == 0x10 or op == 0x16:  # expression, val_expression
            register, i = leb128(data, i)
            length, i = leb128(data, i)
            i += length
            rules[register] = _ELSEWHERE
        elif op == 0x2E:  # GNU_args_size: the unwinder does not need it
            _, i = leb128(data, i)
        else:
            raise _Malformed(f"CFA instruction {op:#x}")
    if rows is None:
        return cfa_reg, cfa_offset, cfa_expression, rules
    if loc < pc_end:
        rule = _rule(cfa_reg, cfa_offset, cfa_expression, rules, cie.ra_register)
        if rule != last_rule:
            if rows and rows[-1] >> 32 == loc:
                rows.pop()
            rows.append(loc << 32 | rule)
    rows.append(pc_end << 32 | _NO_INFO)
    return ()


def _restore(rules: dict, initial_rules: dict, register: int) -> None:
    if register in initial_rules:
        rules[register] = initial_rules[register]
    else:
        rules.pop(register, None)


# DW_OP_breg7 <base>; DW_OP_breg16 0; DW_OP_lit15; DW_OP_and; DW_OP_lit<threshold>;
# DW_OP_ge; DW_OP_lit3; DW_OP_shl; DW_OP_plus: what ld writes for .plt (threshold 11:
# after a stub's push at byte 11 of its 16, one more word is on the stack; 9 in IBT PLTs).
_PLT_EXPRESSION = bytes([0x77, 0, 0x80, 0x00, 0x3F, 0x1A, 0x30, 0x2A, 0x33, 0x24, 0x22])


def _plt_rule(expression: bytes) -> Optional[Tuple[int, int]]:
    """(base, threshold) if the CFA expression is the PLT stubs' one."""
    if (len(expression) == len(_PLT_EXPRESSION) and expression[0] == 0x77 and expression[1] < 0x40
            and expression[1] % 8 == 0
            and 0x30 <= expression[6] <= 0x3F
            and expression[2:6] == _PLT_EXPRESSION[2:6] and expression[7:] == _PLT_EXPRESSION[7:]):
        return expression[1], expression[6] - 0x30
    return None


def _rule(cfa_reg: int, cfa_offset: int, cfa_expression: Optional[bytes], rules: dict, ra_register: int) -> int:
    """The low half of a record (cfa_offset, cfa_kind, rbp) for a CFA program's state."""
    ra = rules.get(ra_register) if ra_register == _RIP else _ELSEWHERE
    if ra is _UNDEFINED:
        return CfaKind.END << 16
    if cfa_expression is not None:
        plt = _plt_rule(cfa_expression)
        if plt is None:
            return CfaKind.EXPRESSION << 16
        kind, cfa_offset, rbp = CfaKind.PLT, plt[0], plt[1]
    else:
        if cfa_reg == _RSP:
            kind = CfaKind.RSP
        elif cfa_reg == _RBP:
            kind = CfaKind.RBP
        else:
            return CfaKind.REGISTER << 16
        if cfa_offset % 8 or not 0 <= cfa_offset < 8 << 16:
            return CfaKind.ODD_OFFSET << 16
        saved = rules.get(_RBP)
        if saved is None or saved is _SAME:
            rbp = 0
        elif isinstance(saved, int) and saved % 8 == 0 and saved and -1016 <= saved <= 1016:
            rbp = saved // 8
        else:
            rbp = RBP_OTHER
    if ra != -8:
        return CfaKind.RA_ELSEWHERE << 16
    if rules.get(_RSP) is not None:
        return CfaKind.RSP_ELSEWHERE << 16
    return (rbp & 0xFF) << 24 | kind << 16 | cfa_offset // 8


class _Fde(NamedTuple):
    start: int
    end: int
    rows: List[int]


def _record(data: bytes, i: int, is_eh: bool) -> Tuple[int, int, int]:
    """(where its CIE ID or pointer is, its size, where it ends) for the CIE or FDE at data[i]."""
    length = int.from_bytes(data[i:i + 4], "little")
    if length != 0xFFFFFFFF:
        return i + 4, 4, i + 4 + length
    length = int.from_bytes(data[i + 4:i + 12], "little")  # 64-bit DWARF
    return i + 12, 4 if is_eh else 8, i + 12 + length


def _section_fdes(data: bytes, section_address: int, is_eh: bool) -> Tuple[List[_Fde], int]:
    """The FDEs of one .eh_frame or .debug_frame section with their rows, and how many
    could not be read."""
    cies: Dict[int, Optional[_Cie]] = {}
    fdes: List[_Fde] = []
    unreadable = 0
    i, size = 0, len(data)
    while i + 4 <= size:
        body, id_size, end = _record(data, i, is_eh)
        i = end
        if end == body:
            continue  # a terminator (.eh_frame's last word, or between linked inputs)
        if end > size:
            unreadable += 1
            break
        pointer = int.from_bytes(data[body:body + id_size], "little")
        if is_eh:
            if pointer == 0:
                continue  # a CIE: parsed when an FDE names it
            cie_offset = body - pointer
        else:
            if pointer == (1 << 8 * id_size) - 1:
                continue
            cie_offset = pointer
        cie = cies.get(cie_offset, False)
        if cie is False:
            cie = cies[cie_offset] = _cie_at(data, cie_offset, is_eh, section_address)
        if cie is None:
            unreadable += 1
            continue
        try:
            fde = _parse_fde(data, body + id_size, end, cie, section_address)
        except (_Malformed, IndexError, ValueError):
            unreadable += 1
            continue
        if fde is not None:
            fdes.append(fde)
    return fdes, unreadable


def _cie_at(data: bytes, offset: int, is_eh: bool, section_address: int) -> Optional[_Cie]:
    if not 0 <= offset <= len(data) - 4:
        return None
    body, id_size, end = _record(data, offset, is_eh)
    if end > len(data):
        return None
    try:
        return _parse_cie(data, body + id_size, end, section_address)
    except (_Malformed, IndexError, ValueError):
        return None


def _parse_fde(data: bytes, i: int, end: int, cie: _Cie, section_address: int) -> Optional[_Fde]:
    start, i = _read_pointer(data, i, cie.fde_encoding, section_address)
    length, i = _read_pointer(data, i, cie.fde_encoding & 0x0F, section_address)
    if length == 0:
        return None
    if start + length > _MAX_PC + 1:
        raise _Malformed(f"code at {start:#x}, beyond the 4 GiB that rows address")
    if cie.has_augmentation_data:
        skip, i = leb128(data, i)
        i += skip
    rows: List[int] = []
    if cie.signal_frame:  # its rules describe the signal frame, which BPF reads itself
        rows = [start << 32 | CfaKind.SIGNAL << 16, (start + length) << 32 | _NO_INFO]
    else:
        _run_program(data, i, end, cie, rows, start, start + length, section_address)
    return _Fde(start, start + length, rows)


def _merge(eh_fdes: List[_Fde], debug_fdes: List[_Fde]) -> array:
    """One sorted table of the FDEs' rows: .eh_frame's, then .debug_frame's for code that
    .eh_frame does not cover. Where an FDE ends before the next begins, its
    no-information row stays; where FDEs overlap, the later start wins. Consecutive rows
    with the same rule merge."""
    fdes = sorted(eh_fdes, key=lambda f: f.start)
    if debug_fdes:
        starts = [f.start for f in fdes]
        ends = [f.end for f in fdes]
        for fde in debug_fdes:
            n = bisect.bisect_right(starts, fde.start)
            if not ((n and ends[n - 1] > fde.start) or (n < len(starts) and starts[n] < fde.end)):
                fdes.append(fde)
        fdes.sort(key=lambda f: f.start)
    table = array("Q")
    last_rule = -1
    for n, fde in enumerate(fdes):
        following = fdes[n + 1].start if n + 1 < len(fdes) else _MAX_PC + 1
        rows = [word for word in fde.rows[:-1] if word >> 32 < following]
        if following > fde.end:
            rows.append(fde.rows[-1])  # no information from fde.end on
        for word in rows:
            if word & _RULE_MASK != last_rule:
                table.append(word)
                last_rule = word & _RULE_MASK
    return table


# What build_unwind_table reads besides the PT_LOAD segment headers, which content_identity hashes.
UNWIND_SECTIONS = (".eh_frame", ".debug_frame")
# Bytes of each, as in the file and inflated: the largest here is libLLVM's .eh_frame, 7.4 MB.
MAX_FRAME_SECTION = 64 << 20


def _frame_sections(elf, fd: int) -> List[Tuple[str, bytes, int, bool]]:
    """(name, contents, address, whether it is .eh_frame) of each unwind section; raises
    TooLarge for one over MAX_FRAME_SECTION bytes, or claiming more inflated."""
    sections = []
    for name, is_eh in zip(UNWIND_SECTIONS, (True, False)):
        section = elf.get_section_by_name(name)
        if section is not None and section["sh_type"] != "SHT_NOBITS":
            sections.append((name, read_section(elf, fd, section, MAX_FRAME_SECTION), section["sh_addr"], is_eh))
    return sections


def build_unwind_table(path: str) -> UnwindTable:
    """The unwind table of the x86-64 binary at path, read from the file (no cache). Its
    identity hashes the sections' bytes that were parsed."""
    stream, elf = open_elf(path)
    try:
        if elf["e_machine"] != "EM_X86_64":
            raise SymbolizerError(f"unwind tables are built for x86-64 only, not {elf['e_machine']}")
        eh_fdes: List[_Fde] = []
        debug_fdes: List[_Fde] = []
        unreadable = 0
        sections = _frame_sections(elf, stream.fileno())
        for _, data, address, is_eh in sections:
            fdes, bad = _section_fdes(data, address, is_eh)
            (eh_fdes if is_eh else debug_fdes).extend(fdes)
            unreadable += bad
        raw = {elf.get_section_index(name): data for name, data, _, _ in sections
               if not elf.get_section_by_name(name).compressed}
        identity = content_identity(elf, stream.fileno(), read_build_id(elf), UNWIND_SECTIONS, raw)
        return UnwindTable(identity, _merge(eh_fdes, debug_fdes), unreadable, load_segments(elf))
    except (ELFError, struct.error, ValueError) as e:
        raise SymbolizerError(f"not a readable ELF file: {e}") from None
    finally:
        stream.close()
