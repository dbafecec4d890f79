"""The one way lgur reads a file a user hands it: weights, model files, official checkpoints, training
state, index embeddings. Nothing in a data file is ever executed.

Accepted formats, recognised from the bytes (never from the file name):

    safetensors     tensors + a string->string metadata header (lgur's own files, most hub weights)
    torch pickle    a `torch.save` file (zip or legacy format) read with torch.load(weights_only=True):
                    tensors, containers and plain scalars only; any other pickled global is refused

Refused, with a message that says what to convert the file to:

    TorchScript     `torch.jit.save` archives (e.g. OpenAI's CLIP `.pt`): loading one runs the code inside
    other zips      zip archives that are not `torch.save` checkpoints
    anything else   unknown bytes, truncated files, safetensors headers that lie about their sizes

Every failure is raised as an lgur error (the caller picks the class; WeightsError by default), whose
one-line message names the file, so the CLI prints it instead of a traceback.
"""
from __future__ import annotations

import struct
import warnings
import zipfile
from pathlib import Path
from typing import Iterable

import torch

from lgur.errors import LgurError, WeightsError

# safetensors' own reader refuses headers above 100 MB; a real header is a few hundred KB at most
MAX_SAFETENSORS_HEADER = 100_000_000

SAFETENSORS, TORCH_ZIP, TORCH_LEGACY, TORCHSCRIPT, OTHER_ZIP, BROKEN_ZIP, UNKNOWN, EMPTY = (
    "safetensors", "torch zip", "torch legacy", "TorchScript", "zip", "broken zip", "unknown", "empty")

TO_SAFETENSORS = ("save its tensors as safetensors where you trust the file: python -c \"import torch; "
                  "from safetensors.torch import save_file; sd = torch.jit.load('IN.pt').state_dict(); "
                  "save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\"")
CONVERT_OFFICIAL = ("an official LGUR checkpoint (best.pth.tar) becomes an lgur model file with "
                    "`lgur convert-official {path} model.safetensors`")


def sniff(path: str | Path) -> str:
    """The format of a file from its first bytes (and, for zips, its member names)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        return EMPTY
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return BROKEN_ZIP
        # torch.jit.save writes code/ (the module's TorchScript source) and constants.pkl beside data.pkl
        if any("/code/" in n or n.startswith("code/") or n.endswith("constants.pkl") for n in names):
            return TORCHSCRIPT
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return TORCH_ZIP
        return OTHER_ZIP
    if len(head) == 9 and head[8:9] == b"{":
        n = struct.unpack("<Q", head[:8])[0]
        if n <= MAX_SAFETENSORS_HEADER:
            return SAFETENSORS
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:  # pickle protocol 2..5: torch legacy format
        return TORCH_LEGACY
    return UNKNOWN


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def _check_file(path: Path, what: str, error: type[LgurError]) -> None:
    if not path.is_file():
        raise error(f"{what} not found: {path}")


def _refusal(path: Path, kind: str, what: str, expected: str) -> str:
    """Why `path` (of format `kind`) cannot be read as `what`, and what to convert it to."""
    if kind == TORCHSCRIPT:
        return (f"{path}: a TorchScript archive; loading one runs the code inside it, so lgur refuses it as "
                f"{what}. Convert it to safetensors: {TO_SAFETENSORS}")
    if kind in (TORCH_ZIP, TORCH_LEGACY):
        return (f"{path}: a PyTorch pickle (torch.save) file, not {expected} as {what} needs; "
                + CONVERT_OFFICIAL.format(path=path)
                + "; other torch.save state dicts can be saved as safetensors with safetensors.torch.save_file")
    if kind == BROKEN_ZIP:
        return f"{path}: a truncated or corrupt zip archive (a torch.save file cut short?); {what} must be {expected}"
    if kind == OTHER_ZIP:
        return f"{path}: a zip archive that is not a PyTorch checkpoint; {what} must be {expected}"
    if kind == EMPTY:
        return f"{path}: empty file; {what} must be {expected}"
    return f"{path}: not {expected} (unrecognised bytes, or a truncated file); {what} must be {expected}"


def _safetensors_path(path: str | Path, what: str, error: type[LgurError]) -> Path:
    """`path` if it is a readable safetensors file (judged by its bytes), else a readable `error`."""
    path = Path(path).expanduser()
    _check_file(path, what, error)
    kind = sniff(path)
    if kind != SAFETENSORS:
        raise error(_refusal(path, kind, what, "a safetensors file"))
    return path


def read_safetensors_metadata(path: str | Path, what: str = "a model file",
                              error: type[LgurError] = WeightsError) -> dict[str, str]:
    """The metadata header of a safetensors file (no tensor is read)."""
    from safetensors import safe_open

    path = _safetensors_path(path, what, error)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - header lies about sizes, truncated, invalid JSON
        raise error(f"{path}: corrupt or truncated safetensors file ({_first_line(e)})") from None


def read_safetensors(path: str | Path, what: str = "a model file", error: type[LgurError] = WeightsError
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on the CPU, metadata) of a safetensors file."""
    from safetensors import safe_open

    path = _safetensors_path(path, what, error)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise error(f"{path}: corrupt or truncated safetensors file ({_first_line(e)})") from None
    return tensors, meta


def read_torch(path: str | Path, what: str = "a weights file", error: type[LgurError] = WeightsError,
               safe_globals: Iterable = (), expected: str = "a torch.save file") -> object:
    """A `torch.save` file through torch.load(weights_only=True) (plus the allow-listed `safe_globals`,
    each of which must build data without running code). TorchScript and unknown bytes are refused
    before torch sees them."""
    path = Path(path).expanduser()
    _check_file(path, what, error)
    kind = sniff(path)
    if kind not in (TORCH_ZIP, TORCH_LEGACY):
        raise error(_refusal(path, kind, what, expected))
    try:
        with torch.serialization.safe_globals(list(safe_globals)), warnings.catch_warnings():
            # torch notes pickle protocols other than its own; the outcome is reported below either way
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError (a refused global), truncated zip, ...
        raise error(f"{path}: cannot be read as {what} with torch.load(weights_only=True), which admits "
                    f"only tensors and plain data ({_first_line(e)})") from None


def read_any(path: str | Path, what: str = "a weights file", error: type[LgurError] = WeightsError,
             safe_globals: Iterable = ()) -> object:
    """safetensors (-> its dict of tensors) or a torch.save file (-> the unpickled plain data)."""
    path = Path(path).expanduser()
    _check_file(path, what, error)
    if sniff(path) == SAFETENSORS:
        return read_safetensors(path, what, error)[0]
    return read_torch(path, what, error, safe_globals, expected="a safetensors or torch.save file")

