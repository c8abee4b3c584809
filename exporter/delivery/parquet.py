"""Row counts from Parquet footers, read with two ranged reads at most, never the data.

A Parquet file ends with its footer: the Thrift-compact-encoded `FileMetaData`, its length
(4 bytes, little-endian) and `PAR1`. `FileMetaData.num_rows` is field 3, after `version` (1)
and `schema` (2, a list of structs), so reading it means skipping those in Thrift's compact
protocol. That takes about two hundred lines here; pyarrow (tens of megabytes) stays out of
the runtime. Format: https://parquet.apache.org/docs/file-format/metadata/ and Thrift's
compact protocol specification.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from exporter.errors import ExporterError

MAGIC = b"PAR1"
TAIL = 8 * 1024
"""Bytes read from a file's end at first: the footer of an export's file (a row group or a
few, a few dozen columns: 1-4 KiB) fits, so one read usually does, and a part file of many
megabytes costs 8 KiB. A longer footer takes a second read of exactly the rest."""
MAX_FOOTER = 64 * 1024 * 1024

_BOOL_TRUE, _BOOL_FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE = 1, 2, 3, 4, 5, 6, 7
_BINARY, _LIST, _SET, _MAP, _STRUCT = 8, 9, 10, 11, 12
_MAX_DEPTH = 64


class NotParquet(ExporterError, ValueError):
    """The bytes are not a Parquet file's footer; the message says why."""


class _Reader:
    """Thrift's compact protocol, as much of it as skipping to `num_rows` needs."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise NotParquet("the footer ends in the middle of a value")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 70:
                raise NotParquet("a varint in the footer is too long")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def skip(self, kind: int, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            raise NotParquet("the footer nests too deeply")
        if kind in (_BOOL_TRUE, _BOOL_FALSE):
            return
        if kind == _BYTE:
            self.byte()
        elif kind in (_I16, _I32, _I64):
            self.varint()
        elif kind == _DOUBLE:
            self.pos += 8
        elif kind == _BINARY:
            self.pos += self.varint()
        elif kind in (_LIST, _SET):
            size, element = self.list_header()
            for _ in range(size):
                self.skip_element(element, depth + 1)
        elif kind == _MAP:
            size = self.varint()
            if size:
                types = self.byte()
                for _ in range(size):
                    self.skip_element(types >> 4, depth + 1)
                    self.skip_element(types & 0x0F, depth + 1)
        elif kind == _STRUCT:
            self.skip_struct(depth + 1)
        else:
            raise NotParquet(f"unknown Thrift type {kind} in the footer")
        if self.pos > len(self.data):
            raise NotParquet("the footer ends in the middle of a value")

    def skip_element(self, kind: int, depth: int) -> None:
        # In a list, a bool is a whole byte (in a struct field it is in the type nibble).
        if kind in (_BOOL_TRUE, _BOOL_FALSE):
            self.byte()
        else:
            self.skip(kind, depth)

    def list_header(self) -> tuple[int, int]:
        b = self.byte()
        size = b >> 4
        if size == 15:
            size = self.varint()
        return size, b & 0x0F

    def field(self, last: int) -> tuple[int, int] | None:
        """The next field's (id, type), or None at the struct's end."""
        b = self.byte()
        if b == 0:
            return None
        delta, kind = b >> 4, b & 0x0F
        return (last + delta if delta else self.zigzag()), kind

    def skip_struct(self, depth: int) -> None:
        last = 0
        while (head := self.field(last)) is not None:
            last, kind = head
            self.skip(kind, depth)


def footer_length(tail: bytes) -> int:
    """The footer's length from a file's last 8 bytes (or more); raises NotParquet."""
    if len(tail) < 8 or tail[-4:] != MAGIC:
        raise NotParquet("does not end with PAR1")
    length = int.from_bytes(tail[-8:-4], "little")
    if not 0 < length <= MAX_FOOTER:
        raise NotParquet(f"footer length {length} is out of range")
    return length


PHYSICAL = ("boolean", "int32", "int64", "int96", "float", "double", "binary", "fixed")


@dataclass(frozen=True, slots=True)
class Footer:
    """What a manifest and a verification need from a footer."""

    rows: int
    columns: tuple[tuple[str, str], ...]
    """Leaf columns: dotted path and physical type."""


def _schema(reader: _Reader) -> tuple[tuple[str, str], ...]:
    """The leaf columns of `FileMetaData.schema` (a pre-order list of `SchemaElement`s)."""
    size, element = reader.list_header()
    if element != _STRUCT:
        raise NotParquet("the footer's schema is not a list of structs")
    nodes: list[tuple[str, int | None, int]] = []
    for _ in range(size):
        name, kind, children, last = "", None, 0, 0
        while (head := reader.field(last)) is not None:
            last, ftype = head
            if last == 1 and ftype == _I32:
                kind = reader.zigzag()
            elif last == 4 and ftype == _BINARY:
                length = reader.varint()
                name = reader.data[reader.pos : reader.pos + length].decode("utf-8", "replace")
                reader.pos += length
            elif last == 5 and ftype == _I32:
                children = reader.zigzag()
            else:
                reader.skip(ftype)
        nodes.append((name, kind, children))
    leaves: list[tuple[str, str]] = []
    # Walk the pre-order list: (path, children still to come) for each open group.
    stack: list[tuple[str, int]] = []
    for index, (name, kind, children) in enumerate(nodes):
        if index == 0:  # the root
            stack.append(("", children))
            continue
        while stack and stack[-1][1] == 0:
            stack.pop()
        if not stack:
            raise NotParquet("the footer's schema tree is inconsistent")
        parent, left = stack[-1]
        stack[-1] = (parent, left - 1)
        path = f"{parent}.{name}" if parent else name
        if children:
            stack.append((path, children))
        else:
            type_name = PHYSICAL[kind] if kind is not None and 0 <= kind < len(PHYSICAL) else "?"
            leaves.append((path, type_name))
    return tuple(leaves)


def read_footer(footer: bytes) -> Footer:
    """`FileMetaData.num_rows` and the leaf columns of a Thrift-compact-encoded footer."""
    reader = _Reader(footer)
    last = 0
    columns: tuple[tuple[str, str], ...] = ()
    while (head := reader.field(last)) is not None:
        last, kind = head
        if last == 2 and kind == _LIST:
            columns = _schema(reader)
        elif last == 3 and kind == _I64:
            rows = reader.zigzag()
            if rows < 0:
                raise NotParquet("the footer gives a negative row count")
            return Footer(rows, columns)
        else:
            reader.skip(kind)
    raise NotParquet("the footer has no row count")


ReadRange = Callable[[int, int], Awaitable[bytes]]
"""Read bytes [start, end) of one file."""


async def footer_of(size: int, read: ReadRange) -> Footer:
    """The row count of a Parquet file of `size` bytes, read through `read`: the last
    `TAIL` bytes, then the rest of the footer if it is longer."""
    if size < 12:
        raise NotParquet(f"{size} bytes is too small for a Parquet file")
    start = max(0, size - TAIL)
    tail = await read(start, size)
    length = footer_length(tail)
    if length + 8 > size - 4:
        raise NotParquet(f"footer length {length} does not fit a file of {size} bytes")
    if length + 8 > len(tail):
        tail = await read(size - 8 - length, start) + tail
    return read_footer(tail[-8 - length : -8])
