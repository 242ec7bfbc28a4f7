"""Struct member offsets from the kernel's BTF (/sys/kernel/btf/vmlinux), so that the BPF
program can read a kernel struct field without kernel headers that match the kernel."""

from __future__ import annotations

import struct
from typing import Dict, List, Optional, Tuple

from bpfprof.collector.errors import SetupError

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F

KIND_STRUCT, KIND_UNION = 4, 5
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG = 8, 9, 10, 11, 18
# Bytes that follow the 12-byte common header: fixed per kind, or per member (vlen of them).
_FIXED_EXTRA = {1: 4, 3: 12, 14: 4, 17: 4}
_MEMBER_EXTRA = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}


class Btf:
    """Type headers of one BTF blob, indexed by type id, read lazily by name."""

    def __init__(self, data: bytes) -> None:
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, _str_len = struct.unpack_from("<HBBIIIII", data)
        if magic != BTF_MAGIC:
            raise ValueError("not BTF data (wrong magic)")
        self._data = data
        self._strings = hdr_len + str_off
        self._offsets: List[int] = [0]  # type id -> where its header starts; id 0 is void
        self._by_name: Dict[Tuple[int, str], int] = {}
        position, end = hdr_len + type_off, hdr_len + type_off + type_len
        while position < end:
            name_off, info, _ = struct.unpack_from("<III", data, position)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            if kind in (KIND_STRUCT, KIND_UNION) and name_off:
                self._by_name.setdefault((kind, self._string(name_off)), len(self._offsets))
            self._offsets.append(position)
            position += 12 + _FIXED_EXTRA.get(kind, 0) + vlen * _MEMBER_EXTRA.get(kind, 0)

    def _string(self, offset: int) -> str:
        start = self._strings + offset
        return self._data[start:self._data.index(b"\0", start)].decode()

    def _header(self, type_id: int) -> Tuple[int, int, int, int]:
        """(name offset, kind, vlen, size-or-type) of a type, with kind_flag folded into kind's high bit."""
        name_off, info, size_or_type = struct.unpack_from("<III", self._data, self._offsets[type_id])
        return name_off, (info >> 24) & 0x1F | (info >> 31) << 8, info & 0xFFFF, size_or_type

    def _resolve(self, type_id: int) -> int:
        """Through typedefs and qualifiers to the type they name."""
        while True:
            _, kind, _, target = self._header(type_id)
            if kind & 0xFF not in (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG):
                return type_id
            type_id = target

    def _member(self, type_id: int, name: str) -> Optional[Tuple[int, int]]:
        """(byte offset, type id) of a member of a struct or union, looking into anonymous ones."""
        _, kind, vlen, _ = self._header(type_id)
        bitfield_offsets = kind >> 8
        base = self._offsets[type_id] + 12
        for i in range(vlen):
            name_off, member_type, offset = struct.unpack_from("<III", self._data, base + 12 * i)
            bits = offset & 0xFFFFFF if bitfield_offsets else offset
            if name_off and self._string(name_off) == name:
                return bits // 8, member_type
            if not name_off:
                inner = self._resolve(member_type)
                if self._header(inner)[1] & 0xFF in (KIND_STRUCT, KIND_UNION):
                    found = self._member(inner, name)
                    if found is not None:
                        return bits // 8 + found[0], found[1]
        return None

    def offset_of(self, struct_name: str, path: str) -> int:
        """Byte offset of a (dotted) member path in a struct, e.g. ("task_struct", "thread.fsbase")."""
        type_id = self._by_name.get((KIND_STRUCT, struct_name))
        if type_id is None:
            raise KeyError(f"struct {struct_name} is not in BTF")
        total = 0
        for name in path.split("."):
            found = self._member(self._resolve(type_id), name)
            if found is None:
                raise KeyError(f"struct {struct_name} has no member {path}")
            total += found[0]
            type_id = found[1]
        return total


def kernel_offset_of(struct_name: str, path: str, btf_path: str = VMLINUX_BTF) -> int:
    """A member offset in the running kernel; SetupError with the fix when BTF cannot say."""
    try:
        with open(btf_path, "rb") as f:
            return Btf(f.read()).offset_of(struct_name, path)
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise SetupError(f"cannot read {struct_name}.{path} from kernel BTF {btf_path} ({e}): "
                         "a kernel built with CONFIG_DEBUG_INFO_BTF=y is needed for Python stacks") from None
