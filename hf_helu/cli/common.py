"""What the ``hf-helu`` commands share: the user-error type, finding SRC, loading it, and saving DST atomically."""

from __future__ import annotations

import argparse
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from hf_helu.atomic import atomic_directory
from hf_helu.conversion.gguf import drop_gguf_quantization
from hf_helu.errors import UsageError
from hf_helu.inputs import is_hub_id
from hf_helu.patching import reapply_patch

# Files ``save_pretrained`` writes (or that hold weights in another format): never copied from SRC.
_MODEL_FILE = re.compile(
    r"^(config\.json|generation_config\.json|.*\.safetensors(\.index\.json)?|.*\.bin(\.index\.json)?|.*\.pt|.*\.pth"
    r"|.*\.h5|.*\.msgpack|.*\.ckpt|.*\.onnx|.*\.ot|.*\.tflite)$"
)
_SKIPPED_DIRS = {".git", "onnx", "openvino", "coreml", ".cache"}
GGUF_SUFFIX = ".gguf"


def gguf_file(source: Path) -> tuple[Path, str] | None:
    """(folder, file name) when ``source`` (from :func:`resolve_source`) is a GGUF file, else None."""
    return (source.parent, source.name) if source.suffix == GGUF_SUFFIX and source.is_file() else None


def _local_source(src: str, path: Path) -> Path:
    """A model folder, or the GGUF file of ``path`` (a ``.gguf`` file, or a folder without config.json but one)."""
    if not path.is_dir():
        if path.suffix != GGUF_SUFFIX:
            raise UsageError(f"SRC {src!r} is a file, expected a model folder, a {GGUF_SUFFIX} file or a Hub id")
        return path
    if (path / "config.json").is_file():
        return path
    found = sorted(path.glob(f"*{GGUF_SUFFIX}"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise UsageError(f"SRC {src!r} holds {len(found)} GGUF files ({names}): name the one to use")
    if not found:
        raise UsageError(f"SRC {src!r} is not a transformers model folder (no config.json and no GGUF file in it)")
    return found[0]


def resolve_source(src: str) -> Path:
    """A local folder for ``src`` (the folder itself, or a Hub snapshot, online only), or a local GGUF file."""
    path = Path(src).expanduser()
    if path.exists():
        return _local_source(src, path)
    if not is_hub_id(src):
        raise UsageError(f"SRC {src!r} does not exist (expected a model folder or a Hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            src, ignore_patterns=["*.h5", "*.msgpack", "*.onnx", "onnx/*", "openvino/*", "*.ot", "*.tflite"]
        )
    except Exception as error:
        raise UsageError(
            f"SRC {src!r} is not an existing folder, and fetching it from the Hugging Face Hub failed: {error}"
        ) from None
    return resolve_source(local)


def model_class(config: transformers.PretrainedConfig) -> type:
    """The model class named in ``config.architectures`` (keeps the task head), else ``AutoModel``.

    Only a subclass of ``transformers.PreTrainedModel`` is used: a config is data, and naming e.g. ``pipeline``
    must not make the CLI call it.
    """
    for name in getattr(config, "architectures", None) or []:
        if not isinstance(name, str):
            raise UsageError(f"config.architectures holds {name!r}, expected the name of a transformers model class")
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise UsageError(
                f"config.architectures names {name!r}, which is not a transformers model class "
                "(a subclass of transformers.PreTrainedModel)"
            )
        return cls
    return transformers.AutoModel


def _location(source: Path) -> tuple[Path, dict[str, str]]:
    """``from_pretrained``'s folder and extra arguments for a source of :func:`resolve_source`."""
    gguf = gguf_file(source)
    return (gguf[0], {"gguf_file": gguf[1]}) if gguf else (source, {})


def source_model_class(source: Path, config: transformers.PretrainedConfig) -> type:
    """:func:`model_class`, except that a GGUF file without ``architectures`` is a causal LM (what GGUF files hold)."""
    if gguf_file(source) and not getattr(config, "architectures", None):
        return transformers.AutoModelForCausalLM
    return model_class(config)


def load_config(folder: Path) -> transformers.PretrainedConfig:
    """The config of a model folder, or the one transformers derives from a GGUF file's metadata."""
    where, extra = _location(folder)
    try:
        return transformers.AutoConfig.from_pretrained(where, **extra)
    except Exception as error:
        what = "GGUF file" if extra else "config.json"
        raise UsageError(f"{folder} has a {what} transformers cannot read: {error}") from None


def load_tokenizer(source: Path):
    """The tokenizer of a model folder, or the one stored in a GGUF file."""
    where, extra = _location(source)
    return transformers.AutoTokenizer.from_pretrained(where, **extra)


def reapply_recorded_patch(model: nn.Module) -> nn.Module:
    """Rebuild a partial HeLU patch recorded in the model's config; a bad record is the user's error."""
    try:
        reapply_patch(model)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return model


def load_checkpoint(folder: Path) -> nn.Module:
    """The checkpoint in ``folder`` as the class its ``config.architectures`` names, in its stored dtype, with any
    partial HeLU patch recorded in its config reapplied. (The recipes' float32 training loader is another thing.)

    A GGUF file is dequantized to float32 and loses its quantization marker: it saves as an ordinary model.
    """
    config = load_config(folder)
    cls = source_model_class(folder, config)
    where, extra = _location(folder)
    if extra:
        extra.update(dtype=torch.float32, quantization_config=transformers.GgufConfig(dequantize=True))
    try:
        model = cls.from_pretrained(where, config=config, **extra)
    except Exception as error:
        raise UsageError(f"cannot load a {cls.__name__} from {folder}: {error}") from None
    drop_gguf_quantization(model)
    return reapply_recorded_patch(model)


def copy_extras(src: Path, dst: Path) -> list[str]:
    """Copy what ``save_pretrained`` did not write (tokenizer, processor, ...) from ``src`` to ``dst``.

    Never the folder being written (``dst`` inside ``src``) nor another writer's hidden temp entries. For a GGUF
    source, the tokenizer stored in the file is saved (its folder may hold anything else).
    """
    if gguf_file(src):
        load_tokenizer(src).save_pretrained(dst)
        return ["tokenizer (from the GGUF file)"]
    copied = []
    inside = dst.resolve()
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if target.exists() or entry.name in _SKIPPED_DIRS or entry.name.endswith(".tmp"):
            continue
        if entry.resolve() == inside or entry.resolve() in inside.parents:
            continue
        if entry.is_dir():
            shutil.copytree(entry, target)
        elif _MODEL_FILE.match(entry.name):
            continue
        else:
            shutil.copy2(entry, target)
        copied.append(entry.name)
    return copied


def check_destination(dst: str, overwrite: bool) -> None:
    """Fail before the (slow) load when DST would be refused anyway."""
    path = Path(dst)
    if path.exists() and not path.is_dir():
        raise UsageError(f"DST {dst!r} exists and is not a folder")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"DST {dst!r} exists and is not empty; pass --overwrite to replace it")


def check_not_nested(src: Path, dst: str) -> None:
    """Refuse a DST inside SRC (it would be copied into itself as an extra) or holding SRC (replacing it deletes it)."""
    source, target = src.resolve(), Path(dst).expanduser().resolve()
    if source in target.parents:
        raise UsageError(f"DST {dst!r} is inside SRC {str(src)!r}: choose a folder outside it")
    if target in source.parents:
        raise UsageError(f"DST {dst!r} holds SRC {str(src)!r}: writing DST would replace SRC; choose another folder")


def check_writable_file(path: str) -> None:
    """Fail before any work when ``path`` could not be written at the end: its folder (or the first existing one
    above it) must be a writable folder (a probe file is created and removed), and ``path`` no folder."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise UsageError(f"{path!r} is a folder, expected a file path")
    folder = target.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"cannot write {path!r}: {str(folder)!r} is a file, not a folder")
    probe = folder / f".hf_helu_probe.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"cannot write {path!r}: folder {str(folder)!r} is not writable ({error.strerror})") from None


def save_atomically(model: nn.Module, src: Path, dst: str, overwrite: bool) -> None:
    """``model.save_pretrained`` plus the extras of ``src``, written to a temp folder renamed to ``dst`` at the end."""
    try:
        with atomic_directory(dst, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp)
            copy_extras(src, tmp)
    except FileExistsError as error:
        raise UsageError(str(error)) from None


def transform_and_save(args: argparse.Namespace, transform: Callable[[nn.Module], Any], saved_note: str = "") -> int:
    """Load SRC, apply ``transform`` (a ValueError is the user's error), save to DST atomically, print the report."""
    check_destination(args.dst, args.overwrite)
    src = resolve_source(args.src)
    check_not_nested(src, args.dst)
    model = load_checkpoint(src)
    try:
        report = transform(model)
    except ValueError as error:
        raise UsageError(str(error)) from None
    save_atomically(model, src, args.dst, args.overwrite)
    print(report)
    print(f"saved to {args.dst}{saved_note}")
    return 0
