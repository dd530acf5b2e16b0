"""What the ``hf-helu`` commands share: finding SRC, loading it, and saving DST atomically.

The DST checks are in :mod:`hf_helu.cli.destination`, what is copied from SRC beside the weights in
:mod:`hf_helu.cli.extras`.
"""

from __future__ import annotations

import argparse
import copy
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import ModelCard
from torch import nn

from hf_helu.atomic import atomic_directory
from hf_helu.cli.destination import check_destination, check_not_aliased, check_writable_file, sole_writer
from hf_helu.cli.extras import copy_extras, plan_extras
from hf_helu.errors import UsageError
from hf_helu.inputs import is_hub_id
from hf_helu.patching import reapply_patch
from hf_helu.sources import check_gguf_architecture, check_has_ffn, drop_gguf_quantization, load_complete

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
    """The model class named in ``config.architectures`` (keeps the task head); ``AutoModel`` when it names none.

    Only a subclass of ``transformers.PreTrainedModel`` is used: a config is data, and naming e.g. ``pipeline``
    must not make the CLI call it. A name transformers does not have is refused: ``AutoModel`` would load the
    checkpoint without its head and say nothing.
    """
    names = getattr(config, "architectures", None) or []
    for name in names:
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
    if names:
        raise UsageError(
            f"config.architectures names {', '.join(map(repr, names))}, which transformers {transformers.__version__} "
            "does not have (a custom or newer class?); loading it as a bare AutoModel would drop its task head"
        )
    return transformers.AutoModel


def check_text_model(folder: Path) -> None:
    """Refuse, before loading weights, a model whose forward does not take ``input_ids`` (speech, vision)."""
    config = load_config(folder)
    cls = source_model_class(folder, config)
    if cls is transformers.AutoModel:
        try:
            cls = transformers.AutoModel._model_mapping[type(config)]
        except KeyError:
            return  # loading it fails with its own UsageError
    takes = getattr(cls, "main_input_name", "input_ids")
    if takes != "input_ids":
        raise UsageError(
            f"{folder} holds a {cls.__name__}, whose input is {takes!r}, not text; this command runs text models "
            "(input_ids) only"
        )


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
    """The config of a model folder, or the one transformers derives from a GGUF file's metadata (a new copy each
    call: the commands check SRC several times, and a GGUF file's whole vocabulary is parsed for its config)."""
    where, extra = _location(folder)
    source = where / extra.get("gguf_file", "config.json")
    stamp = (source.stat().st_mtime_ns, source.stat().st_size) if source.is_file() else None
    return copy.deepcopy(_read_config(folder, stamp))


@functools.lru_cache(maxsize=4)
def _read_config(folder: Path, stamp: tuple[int, int] | None) -> transformers.PretrainedConfig:
    """:func:`load_config` for one version (``stamp``: modification time and size) of the file it reads."""
    where, extra = _location(folder)
    if extra:
        check_gguf_architecture(where / extra["gguf_file"])  # from the header, before transformers reads the file
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
        model = load_complete(cls, where, config=config, **extra)
    except UsageError:
        raise
    except Exception as error:
        raise UsageError(f"cannot load a {cls.__name__} from {folder}: {error}") from None
    drop_gguf_quantization(model)
    return reapply_recorded_patch(model)


def save_atomically(
    model: nn.Module, src: Path, dst: str, overwrite: bool, card: ModelCard | None = None, tokenizer: Any = None
) -> None:
    """``model.save_pretrained`` plus the extras of ``src`` and the model ``card`` (README.md, in place of SRC's),
    written to a temp folder renamed to ``dst`` at the end. A GGUF file's tokenizer is saved too: ``tokenizer``
    when the caller has built it already (from the whole metadata: seconds for a real vocabulary), else built here."""
    try:
        with atomic_directory(dst, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp)
            if gguf_file(src):
                (tokenizer if tokenizer is not None else load_tokenizer(src)).save_pretrained(tmp)
            else:
                copy_extras(src, tmp)
            if card is not None:
                card.save(tmp / "README.md")
    except (FileExistsError, OSError) as error:
        raise UsageError(f"cannot write DST {dst!r}: {error}") from None


def default_card(args: argparse.Namespace, report: Any) -> ModelCard:
    """The card of a ``patch`` / ``export`` DST: the source, what was changed (the patch report), no measurement."""
    from hf_helu.model_card import conversion_card

    activation = getattr(report, "activation", None) or "helu"
    return conversion_card(
        args.src,
        activation=activation,
        alpha=getattr(args, "alpha", None) if "helu" in activation else None,
        method=f"hf-helu {args.command}",
        details=str(report),
    )


def check_source_and_destination(src_arg: str, dst: str, overwrite: bool) -> Path:
    """Every check of SRC and DST that needs no weights: DST writable and free, not aliasing SRC, SRC's config and
    class known, no link out of SRC. Returns SRC's folder."""
    check_destination(dst, overwrite)
    src = resolve_source(src_arg)
    check_not_aliased(src, dst)
    config = load_config(src)
    check_has_ffn(source_model_class(src, config), config, src)
    if not gguf_file(src):
        plan_extras(src)
    return src


def transform_and_save(
    args: argparse.Namespace,
    transform: Callable[[nn.Module], Any],
    saved_note: str = "",
    card: Callable[[nn.Module, Any], ModelCard] | None = None,
    describe: Callable[[Any], str] = str,
    tokenizer: Any = None,
) -> int:
    """Load SRC, apply ``transform``, save to DST atomically with a model card, print the report.

    Only a :class:`UsageError` from ``transform`` is the user's error; anything else is a bug and keeps its
    traceback. ``card(model, report)`` makes the model card (default: :func:`default_card`); ``describe(report)``
    the text printed; ``tokenizer``: SRC's, when the caller has loaded it (:func:`save_atomically`)."""
    src = check_source_and_destination(args.src, args.dst, args.overwrite)
    with sole_writer(args.dst):
        model = load_checkpoint(src)
        report = transform(model)
        written = card(model, report) if card is not None else default_card(args, report)
        save_atomically(model, src, args.dst, args.overwrite, written, tokenizer)
    print(describe(report))
    print(f"saved to {args.dst}{saved_note}")
    return 0


__all__ = [
    "check_destination",
    "check_source_and_destination",
    "check_text_model",
    "check_writable_file",
    "copy_extras",
    "load_checkpoint",
    "load_config",
    "model_class",
    "resolve_source",
    "transform_and_save",
]
