"""Hostile and broken checkpoints, generated at test time (nothing is committed).

Each builder writes files into a folder and returns `Case`s: the file, the CLI
arguments that go with it, and a fragment the one-line error must contain.
Payloads are real: loaded with plain pickle or `torch.load(weights_only=False)`
they create the canary file (tests/test_hostile.py checks that too, so the
corpus cannot silently go stale).

Run as a script it is a harness for what needs a real process:
`kill-writes DIR SEED N M` imports torch once, then forks N .pt (M .safetensors)
writers of the same output and kills each at a random moment, reporting what the
output held afterwards; `real-process DIR HOSTILE CHECKPOINT` runs the writes and
CLI calls the test puts under `ulimit -f` and TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1.
"""
from __future__ import annotations

import cProfile
import json
import os
import pickle
import random
import struct
import sys
import time
import timeit
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Case:
    """One corpus file: what to run it with and what the error must say (lower case)."""

    name: str
    path: Path
    expect: str
    args: tuple[str, ...] = ()
    tags: frozenset[str] = field(default_factory=frozenset)


class Payload:
    """Pickles as a call of `func(*args)`: the shape of every pickle code-execution exploit."""

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.func, self.args


def payloads(canary: Path) -> dict[str, tuple[Payload, str]]:
    """name -> (payload that creates `canary`, the global the refusal must name)."""
    code = f"open({str(canary)!r}, 'w').close()"
    return {
        "os_system": (Payload(os.system, (f"touch '{canary}'",)), f"{os.system.__module__}.system"),
        "eval": (Payload(eval, (code,)), "eval"),  # builtins.eval, or __builtin__.eval in protocol <= 2
        "timeit": (Payload(timeit.timeit, (code, "pass", time.perf_counter, 1)), "timeit.timeit"),
        "cprofile": (Payload(cProfile.run, (code,)), "cProfile.run"),
    }


def write_payload(path: Path, payload: Payload, fmt: str) -> Path:
    """The payload beside a real tensor, as torch.save zip / legacy torch.save / bare pickle (protocol 0, 2 or 4)."""
    obj = {"conv1.0.weight": torch.zeros(2), "hook": payload}
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=int(fmt.removeprefix("pickle"))))
    return path


PAYLOAD_FORMATS = ("zip", "legacy", "pickle0", "pickle2", "pickle4")


def code_execution_cases(folder: Path, canary: Path) -> list[Case]:
    """Every payload in every pickle format, plus a TorchScript archive."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, (payload, global_name) in payloads(canary).items():
        for fmt in PAYLOAD_FORMATS:
            suffix = ".pt" if fmt in ("zip", "legacy") else ".pkl"
            path = write_payload(folder / f"{name}_{fmt}{suffix}", payload, fmt)
            cases.append(Case(f"{name}-{fmt}", path, global_name.lower(), tags=frozenset({"code", fmt})))
    with warnings.catch_warnings():  # torch.jit.script is deprecated, and still what strangers send
        warnings.simplefilter("ignore")
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(folder / "torchscript.pt"))
    cases.append(Case("torchscript", folder / "torchscript.pt", "torchscript", tags=frozenset({"code"})))
    return cases


# --------------------------------------------------------------------------- zip surgery


def rezip(src: Path, dst: Path, mutate: Callable[[str, bytes], tuple[str, bytes, int] | None]) -> Path:
    """Copy a torch zip record by record through `mutate(name, data) -> (name, data, compression) | None`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            changed = mutate(info.filename, zin.read(info.filename))
            if changed is not None:
                name, data, compression = changed
                zout.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return dst


def zip_bomb(src: Path, dst: Path, expanded_bytes: int) -> Path:
    """A torch zip whose first data record inflates to `expanded_bytes` of zeros from a few hundred KB."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename.endswith("/data/0"):
                zinfo = zipfile.ZipInfo(info.filename)
                zinfo.compress_type = zipfile.ZIP_DEFLATED
                with zout.open(zinfo, "w", force_zip64=True) as record:
                    chunk = bytes(1 << 24)
                    for _ in range(expanded_bytes // len(chunk)):
                        record.write(chunk)
            else:
                zout.writestr(info.filename, zin.read(info.filename))
    return dst


def overlapping_zip(src: Path, dst: Path) -> Path:
    """Point the second record's central-directory entry at the first record's bytes (overlap zip-bomb shape)."""
    data = bytearray(src.read_bytes())
    offsets = [i for i in range(len(data)) if data.startswith(b"PK\x01\x02", i)]
    first_offset = struct.unpack_from("<I", data, offsets[0] + 42)[0]
    struct.pack_into("<I", data, offsets[1] + 42, first_offset)
    dst.write_bytes(bytes(data))
    return dst


# --------------------------------------------------------------------------- safetensors surgery


def safetensors_bytes(header: dict[str, Any], data: bytes, header_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def case_adder(folder: Path, cases: list[Case]) -> Callable[..., None]:
    """add(name, expect, content=None, path=None, **kw): write `content` to folder/name (or take `path`), record the Case."""
    folder.mkdir(parents=True, exist_ok=True)

    def add(name: str, expect: str, content: bytes | None = None, path: Path | None = None, **kw: Any) -> None:
        target = path if path is not None else folder / name
        if content is not None:
            target.write_bytes(content)
        cases.append(Case(name, target, expect.lower(), **kw))

    return add


def malformed_cases(folder: Path) -> list[Case]:
    """Files that are not checkpoints, broken checkpoints and checkpoints of the wrong shape of object."""
    from safetensors.torch import save_file

    cases: list[Case] = []
    add = case_adder(folder, cases)
    good = folder / "good.pt"
    torch.save({"w": torch.arange(12, dtype=torch.float32), "b": torch.ones(4)}, good)

    add("empty.pt", "empty", b"")
    noise = random.Random(5).randbytes(4096)
    add("random.pt", "not a pytorch", b"\xff" + noise)
    add("page.pt", "html", b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>nope</body></html>\n")
    add("lfs.pt", "git lfs pull", b"version https://git-lfs.github.com/spec/v1\n"
        b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 67145387\n")
    whole = good.read_bytes()
    add("truncated.pt", "truncated or corrupt zip", whole[: len(whole) // 2])
    add("short_record.pt", "bytes but its tensor needs",
        path=rezip(good, folder / "short_record.pt", lambda n, d: (n, d[:-8] if n.endswith("data/0") else d, 0)))
    add("no_data_pkl.pt", "data.pkl",
        path=rezip(good, folder / "no_data_pkl.pt", lambda n, d: None if n.endswith("data.pkl") else (n, d, 0)))
    add("no_record.pt", "data/1",
        path=rezip(good, folder / "no_record.pt", lambda n, d: None if n.endswith("data/1") else (n, d, 0)))
    add("deflated.pt", "compressed",
        path=rezip(good, folder / "deflated.pt", lambda n, d: (n, d, zipfile.ZIP_DEFLATED)))
    add("zip_bomb.pt", "zip bomb", path=zip_bomb(good, folder / "zip_bomb.pt", 256 << 20), tags=frozenset({"bomb"}))
    add("overlap.pt", "share bytes", path=overlapping_zip(good, folder / "overlap.pt"))
    add("not_torch.pkl", "not one written by torch.save", pickle.dumps({"w": [1.0, 2.0]}, protocol=2))

    fifo = folder / "fifo.pt"
    os.mkfifo(fifo)
    add("fifo.pt", "fifo", path=fifo)
    directory = folder / "dir.pt"
    directory.mkdir()
    add("dir.pt", "directory", path=directory)
    if Path("/dev/zero").exists():
        add("dev_zero", "character device", path=Path("/dev/zero"), tags=frozenset({"external"}))
        (folder / "zero_link.pt").symlink_to("/dev/zero")
        add("zero_link.pt", "character device", path=folder / "zero_link.pt")

    save_file({"a": torch.ones(4), "b": torch.zeros(2)}, str(folder / "good.safetensors"))
    st = (folder / "good.safetensors").read_bytes()
    add("huge_header.safetensors", "header claims", struct.pack("<Q", 1 << 63) + b'{"a":1}')
    add("truncated.safetensors", "truncated", st[:-4])
    add("trailing.safetensors", "trailing bytes", st + b"JUNK")
    four = {"dtype": "F32", "shape": [4]}
    add("overlap.safetensors", "overlaps",
        safetensors_bytes({"a": {**four, "data_offsets": [0, 16]}, "b": {**four, "data_offsets": [8, 24]}}, bytes(24)))
    add("gap.safetensors", "unused bytes",
        safetensors_bytes({"a": {**four, "data_offsets": [0, 16]}, "b": {**four, "data_offsets": [20, 36]}}, bytes(36)))
    add("dtype.safetensors", "dtype 'f99'", safetensors_bytes({"a": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)))
    add("size.safetensors", "needs 16 bytes", safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, bytes(12)))
    add("json.safetensors", "not valid json", struct.pack("<Q", 9) + b"{not json" + bytes(4))

    def saved(name: str, obj: Any) -> Path:
        torch.save(obj, folder / name)
        return folder / name

    with torch.sparse.check_sparse_tensor_invariants():
        sparse = torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 0]]), torch.tensor([1.0, 2.0]), (2, 2))
    add("sparse.pt", "not dense", path=saved("sparse.pt", {"w": sparse}))
    add("meta.pt", "meta device", path=saved("meta.pt", {"w": torch.empty(3, device="meta")}))
    add("tensor.pt", "top-level object is a tensor", path=saved("tensor.pt", torch.ones(3)))
    add("list.pt", "top-level object is a list", path=saved("list.pt", [torch.ones(3)]))
    add("non_tensor.pt", "entry 'epoch' is not a tensor", path=saved("non_tensor.pt", {"w": torch.ones(3), "epoch": 3}))
    good.unlink()
    (folder / "good.safetensors").unlink()
    return cases


def save_cuda_tagged(obj: Any, path: Path) -> Path:
    """torch.save as if every storage lived on cuda:0 (works on a CPU-only machine)."""
    import torch.serialization as serialization

    original = serialization.location_tag
    serialization.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(obj, path)
    finally:
        serialization.location_tag = original
    return path


# --------------------------------------------------------------------------- wrong content (smallNet)


def light_smallnet_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same smallNetTrain state_dict with fc1.0.weight (16M values) as one real row broadcast to all 1024.

    torch.save stores only the row, so each variant file is ~100 KB instead of 67 MB;
    every check under test looks at keys, shapes and BatchNorm statistics, not at fc1's values.
    """
    light = {k: v.clone() for k, v in state.items() if k != "fc1.0.weight"}
    light["fc1.0.weight"] = state["fc1.0.weight"][:1].clone().expand_as(state["fc1.0.weight"])
    return light


def wrong_content_cases(folder: Path, state: dict[str, torch.Tensor]) -> list[Case]:
    """smallNetTrain checkpoints with the wrong keys, shapes or statistics: each must be refused by name."""
    folder.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    light = light_smallnet_state(state)

    def variant(name: str, expect: str, edit: Callable[[dict[str, torch.Tensor]], None], dtype: torch.dtype | None = None,
                args: tuple[str, ...] = ()) -> None:
        sd = {k: v if k == "fc1.0.weight" else v.clone() for k, v in light.items()}
        if dtype is not None:  # the broadcast row stays a broadcast row
            sd = {k: v if not v.is_floating_point() else v[:1].to(dtype).expand_as(v) if k == "fc1.0.weight" else v.to(dtype)
                  for k, v in sd.items()}
        edit(sd)
        torch.save(sd, folder / name)
        cases.append(Case(name, folder / name, expect.lower(), args=args))

    variant("missing_key.pt", "missing conv1.1.running_var", lambda sd: sd.pop("conv1.1.running_var"))
    variant("extra_key.pt", "unexpected head.weight", lambda sd: sd.__setitem__("head.weight", torch.ones(2)))
    variant("shape.pt", "conv1.0.weight has shape (16, 3, 5, 5)",
            lambda sd: sd.__setitem__("conv1.0.weight", torch.zeros(16, 3, 5, 5)))

    def fewer_bn_channels(sd: dict[str, torch.Tensor]) -> None:
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            sd[f"conv2.1.{suffix}"] = sd[f"conv2.1.{suffix}"][:8].clone()

    variant("channels.pt", "conv2.1.weight has shape (8,)", fewer_bn_channels)

    def set_item(key: str, index: int, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
        return lambda sd: sd[key].view(-1).__setitem__(index, value)

    variant("nan_var.pt", "running_var has nan/inf", set_item("conv1.1.running_var", 3, float("nan")))
    variant("inf_var.pt", "running_var has nan/inf", set_item("conv2.1.running_var", 0, float("inf")))
    variant("negative_var.pt", "running_var has negative values", set_item("fc1.1.running_var", 7, -0.5))
    variant("nan_mean.pt", "running_mean has nan/inf", set_item("fc1.1.running_mean", 1, float("nan")))
    variant("nan_weight.pt", "conv2.0.weight has nan/inf", set_item("conv2.0.weight", 5, float("nan")))
    variant("zero_var_eps0.pt", "running_var + eps is 0", set_item("conv1.1.running_var", 2, 0.0), args=("--eps", "0"))

    def huge_gamma(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
        def edit(sd: dict[str, torch.Tensor]) -> None:
            sd["conv1.1.weight"].view(-1)[0] = value
            sd["conv1.1.running_var"].view(-1)[0] = 1e-4
            sd["conv1.0.weight"][0].fill_(0.5)
        return edit

    variant("overflow_f16.pt", "overflows float16", huge_gamma(6e4), dtype=torch.float16)
    variant("overflow_bf16.pt", "overflows bfloat16", huge_gamma(3e38), dtype=torch.bfloat16)
    variant("overflow_f32.pt", "overflows float32", huge_gamma(3e38))
    return cases


# --------------------------------------------------------------------------- round 2 (issue 11)


def replace_data_pkl(src: Path, dst: Path, data_pkl: bytes) -> Path:
    """A copy of a torch zip whose data.pkl is `data_pkl` (every other record kept, all stored)."""
    return rezip(src, dst, lambda n, d: (n, data_pkl if n.endswith("/data.pkl") else d, zipfile.ZIP_STORED))


def legacy_parts(path: Path) -> tuple[list[bytes], bytes]:
    """The five pickles of a legacy torch.save file and the raw storage bytes after them."""
    import io
    import pickletools

    data = path.read_bytes()
    stream, pickles, start = io.BytesIO(data), [], 0
    for _ in range(5):
        for _ in pickletools.genops(stream):
            pass
        pickles.append(data[start:stream.tell()])
        start = stream.tell()
    return pickles, data[start:]


def edit_zip_tail(src: Path, dst: Path, edit: Callable[[bytearray], bytes]) -> Path:
    dst.write_bytes(edit(bytearray(src.read_bytes())))
    return dst


def second_central_directory(data: bytearray) -> bytes:
    """Append a second copy of the central directory and point the end records at it (two directories, one file)."""
    eocd = len(data) - 22
    locator = eocd - 20
    zip64 = locator - 56
    cd_size, cd_offset = struct.unpack_from("<QQ", data, zip64 + 40)
    directory = bytes(data[cd_offset:cd_offset + cd_size])
    new_offset = zip64
    tail = bytearray(data[zip64:])
    struct.pack_into("<Q", tail, 48, new_offset)                       # zip64 record: directory offset
    struct.pack_into("<Q", tail, 56 + 8, new_offset + cd_size)         # locator: where the zip64 record now is
    if struct.unpack_from("<I", tail, 56 + 20 + 16)[0] != 0xFFFFFFFF:   # classic end record agrees with the zip64 one
        struct.pack_into("<I", tail, 56 + 20 + 16, new_offset)
    out = bytearray(data[:zip64]) + directory + tail
    return bytes(out)


def round2_cases(folder: Path, state: dict[str, torch.Tensor]) -> list[Case]:
    """Issue 11: storages not backed by the file, zip parser differences, allocation bombs, cycles, names."""
    import collections

    cases: list[Case] = []
    add = case_adder(folder, cases)
    good = folder / "good.pt"
    torch.save({"w": torch.arange(12, dtype=torch.float32), "b": torch.ones(4)}, good)
    n = 300_000_000
    fresh = Payload(torch._utils._rebuild_tensor_v2, (Payload(torch.FloatStorage, (n,)), 0, (n,), (1,), False,
                                                       collections.OrderedDict()))
    add("fresh_storage.pt", "uninitialised",
        path=replace_data_pkl(good, folder / "fresh_storage.pt", pickle.dumps({"w": fresh}, protocol=2)))
    add("fresh_untyped.pt", "uninitialised", path=replace_data_pkl(
        good, folder / "fresh_untyped.pt", pickle.dumps({"w": Payload(torch.UntypedStorage, (n,))}, protocol=4)))
    add("bytearray.pt", "bytearray(1,800,000,000)", path=replace_data_pkl(
        good, folder / "bytearray.pt", pickle.dumps({"w": Payload(bytearray, (1_800_000_000,))}, protocol=4)))
    add("bytearray.pkl", "bytearray(1,800,000,000)", pickle.dumps(Payload(bytearray, (1_800_000_000,)), protocol=4))
    add("binbytes8.pkl", "corrupt pickle", b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"abc.")
    add("binbytes8.pt", "not a valid pickle",
        path=replace_data_pkl(good, folder / "binbytes8.pt", b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"abc."))
    add("tensor_call.pt", "allocate a tensor", path=replace_data_pkl(
        good, folder / "tensor_call.pt", pickle.dumps({"w": Payload(torch.FloatTensor, (n,))}, protocol=2)))

    legacy = folder / "legacy_src.pt"
    torch.save({"w": torch.arange(6, dtype=torch.float32), "b": torch.ones(3, dtype=torch.float64)}, legacy,
               _use_new_zipfile_serialization=False)
    pickles, raw = legacy_parts(legacy)
    keys = pickle.loads(pickles[4])
    add("legacy_unlisted.pt", "uninitialised", b"".join(pickles[:4]) + pickle.dumps(keys[:1], protocol=2) + raw)
    add("legacy_short.pt", "past the end", b"".join(pickles) + raw[:-4])
    bad_count = bytearray(raw)
    struct.pack_into("<q", bad_count, 0, 1 << 40)
    add("legacy_count.pt", "elements but its tensor needs", b"".join(pickles) + bytes(bad_count))
    legacy.unlink()

    whole = good.read_bytes()
    add("prepended.pt", "crafted", b"PK\x03\x04" + bytes(60) + whole)
    add("appended.pt", "end record", whole + b"trailing data")
    add("two_directories.pt", "hidden data", path=edit_zip_tail(good, folder / "two_directories.pt", second_central_directory))

    def bad_locator(data: bytearray) -> bytes:
        struct.pack_into("<Q", data, len(data) - 22 - 20 + 8, 0)
        return bytes(data)

    add("zip64_locator.pt", "zip64 locator", path=edit_zip_tail(good, folder / "zip64_locator.pt", bad_locator))
    sparse = folder / "sparse_8g.pt"
    with open(sparse, "wb") as f:
        f.write(b"PK\x03\x04")
        f.truncate(8 << 30)
    add("sparse_8g.pt", "end record", path=sparse, tags=frozenset({"slow-if-hashed"}))

    cycle: dict[str, Any] = {}
    cycle["state_dict"] = cycle
    torch.save(cycle, folder / "cycle.pt")
    add("cycle.pt", "contains itself", path=folder / "cycle.pt")
    deep: dict[str, Any] = {"w": torch.ones(1), "epoch": 1}
    for _ in range(20):
        deep = {"state_dict": deep}
    torch.save(deep, folder / "deep.pt")
    add("deep.pt", "levels deep", path=folder / "deep.pt")
    torch.save({"w": torch.zeros(1).expand(1 << 40)}, folder / "broadcast.pt")
    add("broadcast.pt", "claim", path=folder / "broadcast.pt")
    base = torch.zeros(4)
    torch.save({f"t{i}": base[i % 4:] for i in range(20_001)}, folder / "many_views.pt")
    add("many_views.pt", "storages, over", path=folder / "many_views.pt")
    torch.save(torch.nn.Linear(2, 2), folder / "whole_model.pt")
    add("whole_model.pt", "torch.save(model.state_dict(), path)", path=folder / "whole_model.pt")

    entry = b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    many = b"{" + b",".join(entry % i for i in range(150_000)) + b"}"
    add("many_tensors.safetensors", "tensors, over", struct.pack("<Q", len(many)) + many)
    big = b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"__metadata__":{"x":"' + b"y" * (20 << 20) + b'"}}'
    add("big_header.safetensors", "over bnstrip's", struct.pack("<Q", len(big)) + big)
    add("f99.safetensors", "f99", safetensors_bytes({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)))

    forged = {k: v.clone() for k, v in light_smallnet_state(state).items()}
    forged["conv1.0.weight\nfolded 3 pairs, all fine\r\x1b[2J"] = forged.pop("conv1.0.weight")
    torch.save(forged, folder / "control_key.pt")
    add("control_key.pt", "\\n", path=folder / "control_key.pt")
    named = folder / "bad\nname\x1b[31m.pt"
    named.write_bytes(b"\xff" + bytes(100))
    add("control_name", "not a pytorch", path=named)
    loop = folder / "loop.pt"
    loop.symlink_to(loop)
    add("loop.pt", "symbolic link loop", path=loop)
    good.unlink()
    return cases


def cifar_cases(folder: Path) -> list[Case]:
    """Fake `test_batch` files in their own data dirs: code, allocation bombs, bad shapes, labels, codecs."""
    import numpy as np

    cases = []

    def batch(name: str, expect: str, content: bytes | None = None, sparse_size: int = 0) -> None:
        root = folder / name
        (root / "cifar-10-batches-py").mkdir(parents=True)
        target = root / "cifar-10-batches-py" / "test_batch"
        if sparse_size:
            with open(target, "wb") as f:
                f.write(b"\x80\x02")
                f.truncate(sparse_size)
        else:
            target.write_bytes(content)
        cases.append(Case(name, target, expect.lower(), args=("--data-dir", str(root))))

    def dumps(obj: Any) -> bytes:
        return pickle.dumps(obj, protocol=2)

    batch("ndarray_call", "numpy.ndarray(...) directly",
          dumps({"data": Payload(np.ndarray, ((400_000, 3072), "u1")), "labels": [0]}))
    batch("reconstruct_big", "not an empty one", dumps({"data": Payload(getattr(np, "_core", None).multiarray._reconstruct,
                                                                         (np.ndarray, (400_000, 3072), b"b")), "labels": [0]}))
    batch("codec", "latin-1", dumps({"data": Payload(__import__("_codecs").encode, ("x", "no-such-codec")), "labels": [0]}))
    batch("labels", "integers in 0..9", dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 2 ** 70]}))
    batch("too_many", "1 <= n <= 10,000", dumps({"data": np.zeros((10_001, 3072), np.uint8), "labels": [0] * 10_001}))
    batch("object_dtype", "not a plain number", dumps({"data": np.array([1, "a"], dtype=object), "labels": [0]}))
    batch("huge_file", "larger than a cifar-10 batch", sparse_size=1 << 33)
    batch("eval", "not allowed", dumps({"data": Payload(eval, ("1",)), "labels": [0]}))
    return cases


# --------------------------------------------------------------------------- SIGKILL harness


def _kill_writes(folder: Path, kills: int, seed: int, suffix: str) -> dict[str, Any]:
    """Fork `kills` writers of the same output and SIGKILL each at a random moment during its write.

    Two versions alternate, so after every kill the output must be byte-for-byte one
    of them (the old one or the new one); anything else is a torn write.
    """
    import hashlib
    import signal

    from bnstrip.io.checkpoint import save_checkpoint

    gen = torch.Generator().manual_seed(seed)
    versions = [{"w": torch.randn(1_000_000, generator=gen), "b": torch.randn(1000, generator=gen)} for _ in range(2)]
    out = folder / f"model{suffix}"
    digests = []
    for version in versions:  # reference bytes of each version, written the normal way
        save_checkpoint(version, out, force=True)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    write_seconds = 0.0
    for _ in range(3):  # how long a forked writer takes from fork to exit: the window the kills are spread over
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            try:
                save_checkpoint(versions[0], out, force=True)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        write_seconds = max(write_seconds, time.perf_counter() - started)
    rng = random.Random(seed)
    seen, current, mid_write = [], 0, 0
    for _ in range(kills):
        target = 1 - current
        pid = os.fork()
        if pid == 0:  # the writer: nothing but the write, then leave without cleanup handlers
            try:
                save_checkpoint(versions[target], out, force=True)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, write_seconds * 1.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        seen.append(digests.index(digest) if digest in digests else -1)
        current = target if digest == digests[target] else current
        strays = list(folder.glob(f".{out.name}.*.tmp"))
        mid_write += bool(strays)  # the kill landed while the temp file was being written
        for stray in strays:  # a killed writer cannot clean up after itself; what matters is the output
            stray.unlink()
    return {"write_seconds": write_seconds, "seen": seen, "mid_write": mid_write, "versions": digests}


# --------------------------------------------------------------------------- one real process


def _cli(args: list[str]) -> dict[str, Any]:
    """The bnstrip CLI in this process: exit code and what it wrote to stderr."""
    import contextlib
    import io

    from bnstrip.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(args, prog_name="bnstrip")
            code: Any = 0
        except SystemExit as exc:
            code = exc.code
    return {"exit": code, "stderr": err.getvalue()}


def _real_process(folder: Path, hostile: Path, checkpoint: Path) -> dict[str, Any]:
    """What the test runs under `ulimit -f 2048` with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (one torch import for both).

    Library writes of 4 MB in both formats and a full smallNet fuse must fail cleanly
    at the file-size limit (SIGXFSZ handled); a hostile checkpoint must be refused
    although the environment asks torch to load unsafely.
    """
    from bnstrip.io.checkpoint import save_checkpoint
    from bnstrip.errors import InputError

    results: dict[str, Any] = {}
    for name in ("small.pt", "small.safetensors"):
        try:
            save_checkpoint({"w": torch.randn(1_000_000)}, folder / name)
            results[name] = "written"
        except InputError as exc:
            results[name] = str(exc)
    results["hostile"] = _cli(["fuse", str(hostile), str(folder / "hostile_out.pt")])
    results["full_disk"] = _cli(["fuse", "--force", str(checkpoint), str(folder / "out.pt")])
    return results


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "real-process":
        print(json.dumps(_real_process(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))))
        sys.exit(0)
    elif len(sys.argv) == 6 and sys.argv[1] == "kill-writes":
        folder, seed = Path(sys.argv[2]), int(sys.argv[3])
        results = {suffix: _kill_writes(folder, int(kills), seed, suffix)
                   for suffix, kills in ((".pt", sys.argv[4]), (".safetensors", sys.argv[5]))}
        print(json.dumps(results))
    else:
        sys.exit("usage: hostile_corpus.py kill-writes DIR SEED PT_KILLS SAFETENSORS_KILLS | real-process DIR HOSTILE CHECKPOINT")
