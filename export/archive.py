"""Build the TorchServe model archive (``.mar``) of the caption model.

Layout of the archive (the root is the worker's model directory and sits first on its
``sys.path``)::

    captioner_handler.py        the handler (manifest "handler")
    weights.pt                  the checkpoint (manifest "serializedFile"; original file name kept)
    caption_config.json         the model config (the name handler.model_config in the yaml gives)
    model-config.yaml           TorchServe per-model config + our handler: section (manifest "configFile")
    model/...                   the model package, with model/assets/vocab.txt
    handler/...                 the handler's helper package
    MAR-INF/MANIFEST.json

torch-model-archiver's ``--extra-files`` copies a *folder's contents* (files flat, subfolders
as trees), so the packages are first staged as ``stage/model`` and ``stage/handler`` and the
stage folder is given as the one extra file: its two subfolders land at the archive root
intact.

The archiver's zip depends on when and where it was built (file times, directory listing order,
the manifest's `createdOn`). It is written uncompressed, then repacked (`repack`): entries sorted
by name, every time set to one timestamp (`SOURCE_DATE_EPOCH` when set, else 1980-01-01, the
earliest a zip holds), modes 0644, compressed as asked. The same inputs give the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

import handler as handler_package
import model as model_package
from model.config import PRESETS, CaptionConfig
from weights.fetch import sha256_of

HANDLER_FILE = Path(handler_package.__path__[0]) / "captioner_handler.py"
DEFAULT_MODEL_CONFIG = Path(handler_package.__path__[0]) / "model-config.yaml"
PACKAGES = {"model": Path(model_package.__path__[0]), "handler": Path(handler_package.__path__[0])}
PACKAGE_DATA = "assets"  # model/assets/: the vocabulary
BUILD_INFO = "build_info.json"  # at the archive root: what it was built from (logged and described by the worker)
MANIFEST = "MAR-INF/MANIFEST.json"
MANIFEST_TIME_FORMAT = "%d/%m/%Y %H:%M:%S"  # torch-model-archiver's createdOn
ZIP_EPOCH = 315532800  # 1980-01-01 00:00:00 UTC, the earliest time a zip entry can hold
COMPRESSION = {"default": zipfile.ZIP_DEFLATED, "zip-store": zipfile.ZIP_STORED}
COPY_CHUNK = 1 << 20


def _not_shipped(folder: str, names: list[str]) -> set[str]:
    """copytree's filter: only Python sources and package data go into the archive, not caches,
    editor backups, notes or the model-config.yaml (shipped at the root by itself)."""
    def shipped(name: str) -> bool:
        if name.startswith(".") or name == "__pycache__":
            return False
        if (Path(folder) / name).is_dir() or Path(folder).name == PACKAGE_DATA:
            return True
        return name.endswith(".py")
    return {name for name in names if not shipped(name)}


class ExportError(Exception):
    """The archive cannot be built; the message says why (exit status 2)."""


@dataclass(frozen=True)
class ArchiveResult:
    path: Path
    size_bytes: int
    seconds: float
    config: CaptionConfig
    sha256: str  # the same for the same inputs (`repack`)


def build_archive(
    weights: str | Path,
    config: str | Path | CaptionConfig | None = None,
    *,
    model_name: str = "captioner",
    version: str = "1.0",
    output: str | Path = "model-store",
    model_config: str | Path | None = None,
    archive_format: str = "default",
    check_weights: bool = True,
    progress=None,
) -> ArchiveResult:
    """Validate the inputs, then build ``output/<model_name>.mar`` atomically.

    ``progress(message)`` receives status lines (default: print to stderr).
    """
    say = progress or _stderr
    started = time.perf_counter()
    weights = Path(weights)
    output = Path(output)
    model_config = Path(model_config) if model_config else DEFAULT_MODEL_CONFIG
    _check_name(model_name)
    if archive_format not in COMPRESSION:
        raise ExportError(f"archive format {archive_format!r} is not supported here (use {' or '.join(COMPRESSION)})")
    timestamp = source_date()

    caption_config = _load_config(config)
    settings = _load_model_config(model_config)
    if not weights.is_file():
        raise ExportError(f"weights file {weights} does not exist")
    if check_weights:
        say(f"checking {weights} ({_mb(weights.stat().st_size)}) against the model config ...")
        _check_weights(weights, caption_config)
    if settings.weights and settings.weights != weights.name:
        raise ExportError(f"{model_config}: handler.weights is {settings.weights!r} but the weights file is "
                          f"named {weights.name!r}; rename one of them")

    output.mkdir(parents=True, exist_ok=True)
    target = output / f"{model_name}.mar"
    work = Path(tempfile.mkdtemp(prefix=f".{model_name}-export-", dir=output))
    try:
        stage = work / "stage"
        for name, source in PACKAGES.items():
            shutil.copytree(source, stage / name, ignore=_not_shipped)
        config_name = settings.model_config
        if "/" in config_name or config_name in (weights.name, "model-config.yaml", HANDLER_FILE.name):
            raise ExportError(f"{model_config}: handler.model_config {config_name!r} must be a plain file "
                              "name distinct from the other archive files")
        caption_config.to_json(stage / config_name)
        say(f"recording the build: sha256 of {weights.name} ...")
        (stage / BUILD_INFO).write_text(json.dumps(build_info(weights, model_name, version), indent=1) + "\n")
        if not (stage / settings.vocab).is_file():
            raise ExportError(f"{model_config}: handler.vocab {settings.vocab!r} is not in the staged packages")
        if weights.name in {p.name for p in stage.iterdir()} | {HANDLER_FILE.name, model_config.name}:
            raise ExportError(f"the weights file name {weights.name!r} clashes with an archive file; rename it")
        (work / "tmp").mkdir()
        (work / "out").mkdir()
        total = weights.stat().st_size + _tree_size(stage)
        say(f"archiving {model_name} v{version} ({_mb(total)}, format {archive_format}) ...")
        stored = work / "out" / f"{model_name}.mar"
        with _progress_monitor(say, lambda: _archiver_progress(work, stored, model_name, total, weights)):
            _run_archiver(
                model_name=model_name, version=version, handler=HANDLER_FILE, weights=weights,
                extra=stage, model_config=model_config, export_path=work / "out",
                archive_format="zip-store", tmp=work / "tmp",
            )
        built = work / f"{model_name}.mar"
        unpacked = stored.stat().st_size

        def packing() -> str:
            return f"  packing: {_mb(built.stat().st_size)} written (of {_mb(unpacked)} stored)"

        with _progress_monitor(say, packing):
            repack(stored, built, COMPRESSION[archive_format], timestamp)
        _verify(built, weights.name, config_name)
        os.replace(built, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ArchiveResult(target, target.stat().st_size, time.perf_counter() - started, caption_config,
                         sha256_of(target))


def build_info(weights: Path, model_name: str, version: str) -> dict:
    """What an archive was built from, for whoever runs it: the checkpoint's sha256 (the official
    one is in weights/manifest.json), the code's git commit and whether the packed code had
    uncommitted changes, and the library versions. No timestamp: the same inputs, the same file."""
    from importlib.metadata import version as installed

    return {"model_name": model_name, "version": version, "weights_file": weights.name,
            "weights_bytes": weights.stat().st_size, "weights_sha256": sha256_of(weights), **_code_revision(),
            "built_with": {name: installed(name) for name in ("torch", "transformers", "torch-model-archiver")}}


def _code_revision() -> dict:
    """The git commit of the packed code and whether model/ or handler/ differ from it (None
    outside a git checkout)."""
    root = Path(model_package.__path__[0]).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=30, check=True).stdout.strip()
        changes = subprocess.run(["git", "status", "--porcelain", "--", "model", "handler"], cwd=root,
                                 capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"code_commit": None, "code_modified": None}
    return {"code_commit": commit, "code_modified": bool(changes)}


def _run_archiver(*, model_name, version, handler, weights, extra, model_config, export_path, archive_format, tmp):
    from model_archiver.model_archiver import ModelArchiver
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_archiver_error import ModelArchiverError

    archiver_config = ModelArchiverConfig(
        model_name=model_name,
        handler=str(handler),
        version=version,
        serialized_file=str(weights),
        extra_files=str(extra),
        export_path=str(export_path),
        archive_format=archive_format,
        force=True,
        config_file=str(model_config),
    )
    # The archiver copies everything to <tempdir>/<model name> first (and deletes that folder
    # at start): give it a private tempdir so concurrent exports cannot collide.
    saved = tempfile.tempdir
    tempfile.tempdir = str(tmp)
    try:
        ModelArchiver.generate_model_archive(archiver_config)
    except (ModelArchiverError, OSError, ValueError) as exc:
        raise ExportError(f"torch-model-archiver failed: {exc}") from exc
    finally:
        tempfile.tempdir = saved


def source_date() -> int:
    """The archive's one timestamp (seconds since the epoch): `SOURCE_DATE_EPOCH` (the
    reproducible-builds convention) when set, else `ZIP_EPOCH`; never before `ZIP_EPOCH`."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return ZIP_EPOCH
    if not value.isdigit():
        raise ExportError(f"SOURCE_DATE_EPOCH={value!r}: expected seconds since 1970-01-01 (an integer)")
    return max(int(value), ZIP_EPOCH)


def repack(source: Path, target: Path, compression: int, timestamp: int) -> None:
    """Write the zip `source` to `target` so that its bytes depend only on its contents: entries
    sorted by name, each dated `timestamp` (UTC) with mode 0644, compressed with `compression`,
    and the manifest's `createdOn` set to `timestamp`."""
    when = time.gmtime(timestamp)
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for entry in sorted(archive.infolist(), key=lambda item: item.filename):
            fixed = zipfile.ZipInfo(entry.filename, date_time=when[:6])
            fixed.compress_type, fixed.external_attr = compression, 0o100644 << 16
            if entry.filename == MANIFEST:
                manifest = json.loads(archive.read(entry))
                manifest["createdOn"] = time.strftime(MANIFEST_TIME_FORMAT, when)
                out.writestr(fixed, json.dumps(manifest, indent=2))
                continue
            large = entry.file_size > zipfile.ZIP64_LIMIT
            with archive.open(entry) as reader, out.open(fixed, "w", force_zip64=large) as writer:
                shutil.copyfileobj(reader, writer, COPY_CHUNK)


def _verify(mar: Path, weights_name: str, config_name: str) -> None:
    with zipfile.ZipFile(mar) as archive:
        names = set(archive.namelist())
    required = {"MAR-INF/MANIFEST.json", "captioner_handler.py", "model-config.yaml", weights_name, config_name, BUILD_INFO,
                "model/__init__.py", "model/engine.py", "model/assets/vocab.txt", "handler/__init__.py",
                "handler/request_parsing.py", "handler/preparation.py", "handler/settings.py"}
    missing = sorted(required - names)
    if missing:
        raise ExportError(f"archive {mar} lacks {missing}")


def _load_config(config) -> CaptionConfig:
    if config is None:
        return PRESETS["seed-full"]
    if isinstance(config, CaptionConfig):
        return config
    try:
        return CaptionConfig.from_json(config)
    except (ValueError, TypeError) as exc:
        raise ExportError(f"model config {config}: {exc}") from exc


def _load_model_config(path: Path):
    from handler.settings import HandlerSettings, SettingsError

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ExportError(f"cannot read model-config.yaml {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ExportError(f"{path}: expected a mapping of TorchServe settings")
    if "pt2" in raw:
        raise ExportError(f"{path}: remove the 'pt2' section (TorchServe would compile the whole model); "
                          "use handler.compile_encoder")
    if path.name != "model-config.yaml":
        raise ExportError(f"{path}: the file must be named model-config.yaml")
    try:
        return HandlerSettings.from_model_yaml(raw)
    except SettingsError as exc:
        raise ExportError(str(exc)) from exc


def _check_weights(weights: Path, config: CaptionConfig) -> None:
    from model.checkpoint import CheckpointError, load_state_dict

    try:
        state_dict = load_state_dict(weights, config)
    except CheckpointError as exc:
        raise ExportError(f"refusing to archive {weights}: {exc}") from exc
    del state_dict


def _check_name(name: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-.]*", name):
        raise ExportError(f"model name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit")


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _read_position(path: Path) -> int | None:
    """How far this process has read an open file (Linux /proc), else None."""
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        return None
    for fd in fd_dir.iterdir():
        try:
            if os.readlink(fd) == str(path):
                info = (Path("/proc/self/fdinfo") / fd.name).read_text()
                return int(info.split("pos:", 1)[1].split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return None


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _archiver_progress(work: Path, mar: Path, model_name: str, total: int, weights: Path) -> str:
    """Where the archiver is: copying its inputs, then writing the weights into its zip."""
    if not mar.exists():
        return f"  copying: {_mb(_tree_size(work / 'tmp'))} / {_mb(total)}"
    position = _read_position(work / "tmp" / model_name / weights.name)
    if position is None:  # not the weights (or no /proc): show what was written
        return f"  writing archive: {_mb(mar.stat().st_size)} written"
    size = weights.stat().st_size
    return f"  writing {weights.name}: {_mb(position)} / {_mb(size)} ({100 * position / max(size, 1):.0f}%)"


@contextlib.contextmanager
def _progress_monitor(say, measure, interval: float = 0.5, quiet_interval: float = 5.0):
    """Report a long step's progress from outside, as `measure()` describes it (a terminal: one
    line rewritten; a log: a line every few seconds)."""
    stop = threading.Event()
    tty = sys.stderr.isatty() and say is _stderr

    def loop():
        last, last_time = "", 0.0
        while not stop.wait(interval):
            try:
                line = measure()
            except OSError:
                continue
            if tty:
                print("\r" + line.ljust(70), end="", file=sys.stderr, flush=True)
            elif line != last and time.monotonic() - last_time >= quiet_interval:
                say(line)  # a log, not a terminal: one line every few seconds
                last, last_time = line, time.monotonic()

    thread = threading.Thread(target=loop, name="export-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if tty:
            print(file=sys.stderr)
