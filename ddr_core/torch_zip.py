"""Read tensors out of a ``torch.save`` zip checkpoint **without unpickling it**.

``torch.save`` writes a zip archive: ``<archive>/data.pkl`` (a pickle program describing the saved object),
``<archive>/data/<key>`` (raw little-endian storage bytes) and a few small records. Unpickling ``data.pkl``
runs whatever callables the file names, so ddr never does it (docs/SECURITY.md). :func:`read_torch_zip_tensors`
instead walks the program's opcodes (:func:`pickletools.genops` parses, it executes nothing) and interprets a
fixed vocabulary: dicts (also ``collections.OrderedDict``), lists, tuples, strings, numbers, booleans, ``None`` and
tensors rebuilt by ``torch._utils._rebuild_tensor_v2`` from typed storages. Any other callable (any other
``GLOBAL``) is refused by name with :class:`UnsupportedCheckpointError`. That vocabulary covers a state dict,
or a dict holding one, as ``torch.save`` writes it.
"""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path
from typing import Any

import torch

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
MAX_PICKLE_BYTES = 16 << 20
"""Largest ``data.pkl`` read (a state dict's program is kilobytes; the tensors live in other entries)."""


class UnsupportedCheckpointError(ValueError):
    """The checkpoint is not a torch zip file, or its program uses something outside the supported vocabulary."""


class _Global:
    def __init__(self, name: str):
        self.name = name


class _Mark:
    pass


_MARK = _Mark()
_ALLOWED_GLOBALS = {"collections OrderedDict", "torch._utils _rebuild_tensor_v2",
                    *(f"torch {name}" for name in STORAGE_DTYPES)}


def read_torch_zip_tensors(path: str | Path) -> Any:
    """The object saved in ``path`` (dicts / lists / tuples / scalars / CPU tensors), built without unpickling.

    Raises:
        UnsupportedCheckpointError: not a zip checkpoint, a corrupt one, or one naming another callable.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise UnsupportedCheckpointError(f"{path} is not a torch zip checkpoint ({error}); an old-style (pre-1.6) "
                                         "pickle file cannot be read without unpickling it") from error
    with archive:
        names = archive.namelist()
        programs = [name for name in names if name.endswith("/data.pkl") or name == "data.pkl"]
        if len(programs) != 1:
            raise UnsupportedCheckpointError(f"{path} holds {len(programs)} data.pkl entries, expected one")
        prefix = programs[0][: -len("data.pkl")]
        info = archive.getinfo(programs[0])
        if info.file_size > MAX_PICKLE_BYTES:
            raise UnsupportedCheckpointError(f"{path}: data.pkl is {info.file_size} bytes, more than a state dict's")
        program = archive.read(programs[0])

        compressed = [i.filename for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]
        if compressed:  # torch.save stores entries uncompressed: a compressed one could inflate without bound
            raise UnsupportedCheckpointError(f"{path} holds compressed entries ({compressed[0]}), which torch.save "
                                             "never writes")

        def storage(record: tuple) -> tuple[torch.Tensor, torch.dtype]:
            if len(record) != 5 or record[0] != "storage" or not isinstance(record[1], _Global):
                raise UnsupportedCheckpointError(f"{path}: unsupported persistent record {record!r:.80}")
            dtype = STORAGE_DTYPES[record[1].name.split(" ")[1]]
            entry = f"{prefix}data/{record[2]}"
            if entry not in names:
                raise UnsupportedCheckpointError(f"{path} lacks the storage entry {entry}")
            data = bytearray(archive.read(entry))
            flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            return flat, dtype

        try:
            return _run(program, storage, path)
        except (KeyError, IndexError, TypeError, AttributeError, RuntimeError) as error:
            raise UnsupportedCheckpointError(f"{path}: malformed data.pkl ({type(error).__name__}: {error})") from None


def _rebuild(args: tuple, path: Path) -> torch.Tensor:
    if len(args) < 4 or not isinstance(args[0], torch.Tensor):
        raise UnsupportedCheckpointError(f"{path}: malformed tensor record")
    flat, offset, size, stride = args[0], int(args[1]), tuple(args[2]), tuple(args[3])
    needed = offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True)) + 1 if all(size) else 0
    if needed > flat.numel():
        raise UnsupportedCheckpointError(f"{path}: a tensor of size {size} reaches past its storage")
    return flat.as_strided(size, stride, offset).clone()


def _run(program: bytes, storage: Any, path: Path) -> Any:  # noqa: C901 - one branch per opcode
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    try:
        ops = list(pickletools.genops(program))
    except ValueError as error:
        raise UnsupportedCheckpointError(f"{path}: corrupt data.pkl ({error})") from error

    def pop_mark() -> list[Any]:
        for index in range(len(stack) - 1, -1, -1):
            if stack[index] is _MARK:
                items = stack[index + 1:]
                del stack[index:]
                return items
        raise UnsupportedCheckpointError(f"{path}: unbalanced MARK in data.pkl")

    for opcode, arg, _position in ops:
        name = opcode.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            if len(stack) != 1:
                raise UnsupportedCheckpointError(f"{path}: data.pkl ends with {len(stack)} values")
            return stack[0]
        if name == "MARK":
            stack.append(_MARK)
        elif name in ("EMPTY_DICT",):
            stack.append({})
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "BININT", "BININT1", "BININT2",
                      "LONG1", "BINFLOAT", "SHORT_BINSTRING", "BINSTRING"):
            stack.append(arg)
        elif name == "NONE":
            stack.append(None)
        elif name in ("NEWTRUE", "NEWFALSE"):
            stack.append(name == "NEWTRUE")
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            count = int(name[-1])
            items = tuple(stack[-count:])
            del stack[-count:]
            stack.append(items)
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name in ("BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            if name == "STACK_GLOBAL":
                module, attribute = stack[-2], stack[-1]
                del stack[-2:]
                arg = f"{module} {attribute}"
            if arg not in _ALLOWED_GLOBALS:
                raise UnsupportedCheckpointError(f"{path}: data.pkl names {arg.replace(' ', '.')!r}, which ddr does "
                                                 "not run; only state dicts of plain tensors are read")
            stack.append(_Global(arg))
        elif name == "BINPERSID":
            flat, _dtype = storage(stack.pop())
            stack.append(flat)
        elif name == "REDUCE":
            args, function = stack.pop(), stack.pop()
            if not isinstance(function, _Global):
                raise UnsupportedCheckpointError(f"{path}: data.pkl calls a non-global")
            if function.name == "collections OrderedDict":
                stack.append({})
            elif function.name == "torch._utils _rebuild_tensor_v2":
                stack.append(_rebuild(args, path))
            else:
                raise UnsupportedCheckpointError(f"{path}: data.pkl calls {function.name!r}")
        elif name == "BUILD":
            stack.pop()  # an OrderedDict's (empty) state / a tensor's metadata: nothing to set
        elif name == "SETITEM":
            value, key = stack.pop(), stack.pop()
            stack[-1][key] = value
        elif name == "SETITEMS":
            items = pop_mark()
            target = stack[-1]
            for index in range(0, len(items), 2):
                target[items[index]] = items[index + 1]
        elif name == "APPEND":
            value = stack.pop()
            stack[-1].append(value)
        elif name == "APPENDS":
            items = pop_mark()
            stack[-1].extend(items)
        else:
            raise UnsupportedCheckpointError(f"{path}: data.pkl uses the opcode {name}, which this reader "
                                             "does not support")
    raise UnsupportedCheckpointError(f"{path}: data.pkl has no STOP")
