"""Reading the files of ``policies/``: bytes, UTF-8 text, YAML with line numbers, and ``PolicyError``.

Every policy file an RSSI edits is read through here, so every mistake is reported the same way:
``file:line: message``.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import yaml


# -- errors ----------------------------------------------------------------------------------------
class PolicyError(Exception):
    """A policy file is unreadable or invalid. ``str()`` reads ``file:line: message``."""

    def __init__(self, file: str | Path, line: int | None, message: str):
        self.file = str(file)
        self.line = line
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.message}"


# -- policy file readers ---------------------------------------------------------------
MAX_FILE_BYTES = 16 * 1024 * 1024  # a policy file is text an RSSI edits: far below this


class NotRegularFile(OSError):
    """A policy path names a FIFO, a directory, a device or a socket (never read: it could block)."""


def _kind(mode: int) -> str:
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")


def read_regular_file(path: str | Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file, without ever blocking: the file is opened with ``O_NONBLOCK`` and
    checked with ``fstat`` before any read, so a FIFO, a directory or a device put in place of a policy
    file raises :class:`NotRegularFile` at once (a plain ``open`` of a FIFO waits for a writer).
    OSError if it cannot be opened; NotRegularFile also past ``limit`` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(errno.EINVAL, f"is {_kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise NotRegularFile(errno.EFBIG, f"is larger than {limit} bytes")
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                raise NotRegularFile(errno.EFBIG, f"is larger than {limit} bytes")
            chunks.append(chunk)
    finally:
        os.close(fd)


def read_policy_file(path: str | Path) -> tuple[bytes, str]:
    """Read a policy file: (raw bytes, text). PolicyError if unreadable, not a regular file, empty or
    not UTF-8."""
    try:
        data = read_regular_file(path)
    except OSError as exc:
        raise PolicyError(path, None, f"cannot read file ({exc.strerror or exc})") from None
    return data, decode_policy_file(path, data)


def decode_policy_file(path: str | Path, data: bytes | None) -> str:
    """The text of a policy file's bytes. PolicyError if absent (None), empty or not UTF-8."""
    if data is None:
        raise PolicyError(path, None, "cannot read file (No such file or directory)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise PolicyError(path, line, "file is not valid UTF-8 text (save it as UTF-8)") from None
    if not text.strip():
        raise PolicyError(path, None, "file is empty")
    return text


class LineDict(dict):
    """A YAML mapping that remembers its line and the line of each key."""

    line: int = 0
    key_lines: dict

    def line_of(self, key: Any) -> int:
        return self.key_lines.get(key, self.line)


class LineList(list):
    """A YAML sequence that remembers its line and the line of each item."""

    line: int = 0
    item_lines: list


class _LineLoader(yaml.SafeLoader):
    """Safe YAML loader that records line numbers and refuses duplicate keys."""

    label = ""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    result = LineDict()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            duplicate = key in result
        except TypeError:
            raise PolicyError(loader.label, line, "this key is not a simple name") from None
        if duplicate:
            raise PolicyError(loader.label, line,
                              f"{key!r} is written twice (first on line {result.key_lines[key]})")
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = line
    return result


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> LineList:
    result = LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)


def load_yaml(text: str, label: str | Path) -> LineDict:
    """Parse a YAML policy file whose top level must be a mapping; errors name file and line."""
    loader = _LineLoader(text)
    loader.label = str(label)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise PolicyError(label, line, f"YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(label, None, f"YAML syntax error: {exc}") from None
    finally:
        loader.dispose()
    if data is None:
        raise PolicyError(label, None, "file is empty (only comments)")
    if not isinstance(data, LineDict):
        raise PolicyError(label, 1, "the file must be made of 'name: value' sections")
    return data
