"""Build, cache, verify and load a C kernel library shipped as package data: one loader for every C source.

hf_helu ships C sources (the HeLU kernels here, the sparse FFN kernel in ``hf_helu/sparse``) rather than binaries,
so each is compiled on the user's machine with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) the
first time it is needed, and loaded with ctypes. Every library gets the same treatment, so a fix here reaches all
of them:

- Cache. The library lives in ``$HF_HELU_CACHE_DIR`` (default ``~/.cache/hf_helu``) under a name that hashes
  the C text, the flags, the compiler and the platform, so an edit or another compiler builds a new file.
- Verification. A cached library is loaded only after its bytes match the SHA-256 written beside it
  (``<name>.so.sha256``) when it was built: a truncated library dies with SIGBUS when the loader touches a
  missing page, and a foreign one lacks our symbols or runs other code. One that fails (truncated, replaced,
  corrupted, no checksum), or that matches but lacks the expected symbols, is rebuilt with one RuntimeWarning
  naming the file; the rebuilt bytes of the latter are loaded from a private copy, since the dynamic loader
  would hand back the foreign library already mapped under that path.
- Unwritable cache. The library is built in a private temp folder for this process, with one warning, never a
  silent fall back to slower code.
- Threads. Variants are tried in order, each library naming its own: by default with ``-fopenmp`` first, which
  links ``libgomp.so.1`` and so joins the OpenMP runtime PyTorch has already loaded (the HeLU kernels run on
  PyTorch's warm thread team, at most ``torch.get_num_threads()`` threads), then without (one thread) for a
  compiler lacking OpenMP; the sparse FFN kernel builds with ``-pthread`` for its own pool (``hf_helu.sparse``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.resources
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV_VAR = "HF_HELU_CACHE_DIR"
BASE_CFLAGS = ("-O3", "-std=gnu11", "-shared", "-fPIC")
# With OpenMP (sharing PyTorch's thread team), then without (one thread).
OPENMP_VARIANTS: tuple[tuple[str, ...], ...] = (("-fopenmp",), ())

Signature = tuple[Sequence[type], type | None]


def compiler() -> str | None:
    """The C compiler to build with: ``$CC`` when set (None if it is not found), else cc, gcc or clang."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def cache_folder() -> Path:
    """Where built libraries are kept: ``$HF_HELU_CACHE_DIR``, else ``$XDG_CACHE_HOME/hf_helu`` or ``~/.cache``."""
    root = os.environ.get(CACHE_ENV_VAR)
    return Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_helu"


def checksum_path(path: Path) -> Path:
    """The file beside a cached library that holds the SHA-256 of the bytes built there."""
    return path.with_name(path.name + ".sha256")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify(path: Path) -> str | None:
    """None when ``path`` holds exactly the bytes whose checksum was written beside it at build time, else why not."""
    try:
        expected = checksum_path(path).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return f"no checksum file {checksum_path(path).name} beside it"
    except (OSError, UnicodeDecodeError) as error:
        return f"its checksum file cannot be read ({error})"
    try:
        actual = _digest(path)
    except OSError as error:
        return f"it cannot be read ({error})"
    if actual != expected:
        return "its bytes do not match the checksum written when it was built (truncated, replaced or corrupted)"
    return None


@functools.cache
def package_source(file_name: str, package: str = __package__) -> str:
    """The text of a C source shipped as package data in ``package`` (default ``hf_helu.ops``)."""
    return importlib.resources.files(package).joinpath(file_name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class CLibrary:
    """One C source and how to build and bind it.

    ``title`` names the kernels in messages ("HeLU CPU kernels"), ``kind`` what a library of them is ("HeLU
    kernel library"); ``signatures`` maps each exported function to its ctypes ``(argtypes, restype)``;
    ``package`` is where the C file is package data.
    """

    source_file: str
    prefix: str
    title: str
    kind: str
    signatures: Mapping[str, Signature]
    cflags: tuple[str, ...] = BASE_CFLAGS
    package: str = __package__

    def source(self) -> str:
        """The C text (package data)."""
        return package_source(self.source_file, self.package)

    def library_path(self, compiler: str, extra_flags: tuple[str, ...], source: str | None = None) -> Path:
        """Where the library built from ``source`` (default: the packaged text) by ``compiler`` is cached."""
        text = self.source() if source is None else source
        key = "\0".join((text, *self.cflags, *extra_flags, compiler, platform.system(), platform.machine()))
        return cache_folder() / f"{self.prefix}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"

    def build(self, compiler: str, extra_flags: tuple[str, ...], path: Path) -> None:
        """Compile in a temp folder beside ``path``, then rename the library and its checksum into place.

        Each rename is atomic, so a reader never sees a half-written file; the build is deterministic (same
        source, flags and compiler give the same bytes, checked on gcc), so two processes building at once agree.
        Raises RuntimeError when the compiler fails, OSError when the folder cannot be written.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:
            code, target = Path(tmp) / self.source_file, Path(tmp) / path.name
            code.write_text(self.source(), encoding="utf-8")
            done = subprocess.run(
                [compiler, *self.cflags, *extra_flags, "-o", target.name, code.name],
                capture_output=True,
                text=True,
                timeout=300,
                cwd=tmp,
            )
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed to build the {self.title}:\n{done.stderr[-2000:]}")
            checksum = Path(tmp) / checksum_path(path).name
            checksum.write_text(_digest(target) + "\n", encoding="ascii")
            # Checksum first: a process that looks in between sees no library yet (and builds the same bytes),
            # never a fresh library without its checksum.
            os.replace(checksum, checksum_path(path))
            os.replace(target, path)

    def open(self, path: Path) -> ctypes.CDLL:
        """Load ``path`` and bind every signature; RuntimeError when a function is missing."""
        lib = ctypes.CDLL(str(path))
        for name, (argtypes, restype) in self.signatures.items():
            try:
                function = getattr(lib, name)
            except AttributeError:
                raise RuntimeError(f"{path} does not export {name}: not a {self.kind}") from None
            function.argtypes, function.restype = list(argtypes), restype
        return lib

    def _open_private(self, library: Path, build: tuple[str, tuple[str, ...]] | None = None) -> ctypes.CDLL:
        """Open a copy of ``library`` (or, with ``build``, a fresh build) in a temp folder deleted once mapped."""
        with tempfile.TemporaryDirectory(prefix="hf_helu-") as tmp:
            private = Path(tmp) / library.name
            if build is None:
                shutil.copyfile(library, private)
            else:
                self.build(*build, private)
            return self.open(private)

    def _build_and_open(
        self, compiler: str, extra_flags: tuple[str, ...], path: Path, notes: list[str], private_copy: bool
    ) -> ctypes.CDLL:
        """Build into the cache and open it; an unwritable cache gets a build in a private temp folder instead."""
        try:
            self.build(compiler, extra_flags, path)
        except OSError as error:
            notes.append(
                f"cannot write the kernel cache {path.parent} ({error}); the kernels were built in a temporary "
                f"folder for this process only (set {CACHE_ENV_VAR} to a writable folder to keep them)"
            )
            return self._open_private(path, build=(compiler, extra_flags))
        return self._open_private(path) if private_copy else self.open(path)

    def load_variant(self, compiler: str, extra_flags: tuple[str, ...], notes: list[str]) -> ctypes.CDLL:
        """Load the verified cached library, (re)building it first when it is missing or fails verification.

        ``notes`` collects what went wrong, for the one warning :meth:`load` gives.
        """
        path = self.library_path(compiler, extra_flags)
        if path.exists():
            problem = verify(path)
            if problem is None:
                try:
                    return self.open(path)
                except (OSError, RuntimeError) as error:
                    notes.append(f"{path} matches its checksum but is no {self.kind} ({error}), so it is rebuilt")
                    return self._build_and_open(compiler, extra_flags, path, notes, private_copy=True)
            notes.append(f"{path} failed verification ({problem}), so it was not loaded and is rebuilt")
        return self._build_and_open(compiler, extra_flags, path, notes, private_copy=False)

    def load(
        self, variants: Sequence[tuple[str, ...]] = OPENMP_VARIANTS, fallback: str = "", stacklevel: int = 3
    ) -> tuple[ctypes.CDLL, tuple[str, ...]]:
        """The first variant that builds and loads, and its extra flags; RuntimeError saying why none did.

        Anything unusual on the way (a damaged cache, an unwritable cache folder, no library at all despite a
        compiler) is told in one RuntimeWarning naming the file; ``fallback`` says what runs instead of a
        library that cannot be had.
        """
        errors: list[str] = []
        notes: list[str] = []
        found = compiler()
        if found is None:
            errors.append("no C compiler found (set CC, or install cc/gcc/clang)")
        loaded: tuple[ctypes.CDLL, tuple[str, ...]] | None = None
        for extra_flags in variants if found else ():
            try:
                loaded = self.load_variant(found, extra_flags, notes), extra_flags
                break
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                errors.append(f"[{' '.join(extra_flags) or 'plain'}] {error}")
        failure = f"{self.title} unavailable: " + "; ".join(errors)
        if notes or (loaded is None and found is not None):
            unavailable = "" if loaded is not None else f" {fallback}{' ' if fallback else ''}{failure}"
            warnings.warn(f"{self.title}: " + "; ".join(notes) + unavailable, RuntimeWarning, stacklevel=stacklevel)
        if loaded is None:
            raise RuntimeError(failure)
        return loaded
