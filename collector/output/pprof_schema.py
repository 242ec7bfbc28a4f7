"""pprof's profile.proto (package perftools.profiles), declared here once as data and
turned into protobuf message classes at import time, so no generated code is kept; the
builder serves every protocol we speak this way (Pyroscope's push API too)."""

from __future__ import annotations

from typing import Dict, List, Tuple

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "int64": _F.TYPE_INT64, "uint64": _F.TYPE_UINT64, "string": _F.TYPE_STRING, "bool": _F.TYPE_BOOL,
    "bytes": _F.TYPE_BYTES,
}

# message -> [(field number, name, type, repeated)]; a type is a scalar above, a message
# of the same package, or a message of an earlier package by its full name.
Messages = Dict[str, List[Tuple[int, str, str, bool]]]

# Numbers as in profile.proto.
MESSAGES: Messages = {
    "Profile": [
        (1, "sample_type", "ValueType", True),
        (2, "sample", "Sample", True),
        (3, "mapping", "Mapping", True),
        (4, "location", "Location", True),
        (5, "function", "Function", True),
        (6, "string_table", "string", True),
        (7, "drop_frames", "int64", False),
        (8, "keep_frames", "int64", False),
        (9, "time_nanos", "int64", False),
        (10, "duration_nanos", "int64", False),
        (11, "period_type", "ValueType", False),
        (12, "period", "int64", False),
        (13, "comment", "int64", True),
        (14, "default_sample_type", "int64", False),
    ],
    "ValueType": [(1, "type", "int64", False), (2, "unit", "int64", False)],
    "Sample": [
        (1, "location_id", "uint64", True),
        (2, "value", "int64", True),
        (3, "label", "Label", True),
    ],
    "Label": [
        (1, "key", "int64", False),
        (2, "str", "int64", False),
        (3, "num", "int64", False),
        (4, "num_unit", "int64", False),
    ],
    "Mapping": [
        (1, "id", "uint64", False),
        (2, "memory_start", "uint64", False),
        (3, "memory_limit", "uint64", False),
        (4, "file_offset", "uint64", False),
        (5, "filename", "int64", False),
        (6, "build_id", "int64", False),
        (7, "has_functions", "bool", False),
        (8, "has_filenames", "bool", False),
        (9, "has_line_numbers", "bool", False),
        (10, "has_inline_frames", "bool", False),
    ],
    "Location": [
        (1, "id", "uint64", False),
        (2, "mapping_id", "uint64", False),
        (3, "address", "uint64", False),
        (4, "line", "Line", True),
        (5, "is_folded", "bool", False),
    ],
    "Line": [(1, "function_id", "uint64", False), (2, "line", "int64", False), (3, "column", "int64", False)],
    "Function": [
        (1, "id", "uint64", False),
        (2, "name", "int64", False),
        (3, "system_name", "int64", False),
        (4, "filename", "int64", False),
        (5, "start_line", "int64", False),
    ],
}

PACKAGE = "perftools.profiles"


def message_classes(packages: Dict[str, Messages]) -> Dict[str, type]:
    """The message classes of `packages` (package name -> its messages), by full name;
    each package may use the messages of those before it."""
    pool = descriptor_pool.DescriptorPool()
    files: List[str] = []
    for package, messages in packages.items():
        file = descriptor_pb2.FileDescriptorProto(name=f"bpfprof/{package}.proto", package=package, syntax="proto3")
        file.dependency.extend(files)
        for message_name, fields in messages.items():
            message = file.message_type.add(name=message_name)
            for number, name, kind, repeated in fields:
                field = message.field.add(name=name, number=number)
                field.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
                if kind in _SCALARS:
                    field.type = _SCALARS[kind]
                else:
                    field.type = _F.TYPE_MESSAGE
                    field.type_name = f".{kind}" if "." in kind else f".{package}.{kind}"
        pool.Add(file)
        files.append(file.name)
    return {
        f"{package}.{name}": message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))
        for package, messages in packages.items() for name in messages
    }


# Its nested messages are reached through it: profile.sample.add()
PprofProfile = message_classes({PACKAGE: MESSAGES})[f"{PACKAGE}.Profile"]
