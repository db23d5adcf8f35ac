"""Build the TorchServe archive of the caption model: ``python -m export --weights PATH``."""

from .archive import ArchiveResult, ExportError, build_archive

__all__ = ["ArchiveResult", "ExportError", "build_archive"]
