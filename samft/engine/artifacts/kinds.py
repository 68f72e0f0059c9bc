"""Every kind of file samft reads or writes in a run (or an export), by name: its reader, its writer and
its format version. Each reader validates type, range and nesting depth and fails in one line naming the
file and the field; each writer writes atomically (:mod:`samft.files`).

Kinds not here have their reader beside the code that owns them (``samft.prune``, which the engine
imports and which must not import the engine): ``pruned`` (:func:`samft.prune.state.read_pruned`) and the
search state (:func:`samft.prune.search_state.load_search_state`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from samft.engine.artifacts import (adapter, eval_json, exports, metrics_csv, onnx_meta, per_image_csv, prune_files,
                                    resumes, run_config, split_file, state, trackers)


@dataclass(frozen=True)
class FileKind:
    name: str
    read: Callable[..., Any]
    write: Callable[..., Any]
    format: str


def _kind(name: str, module: Any, fmt: str = "") -> FileKind:
    return FileKind(name, module.read, module.write, fmt or module.FORMAT)


KINDS: dict[str, FileKind] = {k.name: k for k in (
    _kind("adapter", adapter),
    _kind("state", state),
    _kind("run_config", run_config),
    _kind("eval_json", eval_json),
    _kind("split_file", split_file),
    _kind("metrics_csv", metrics_csv),
    _kind("per_image_csv", per_image_csv),
    _kind("trackers_json", trackers),
    _kind("resumes", resumes),
    FileKind(exports.MERGED, exports.read, exports.write, exports.FORMATS[exports.MERGED]),
    FileKind(exports.HEAD, exports.read_head, exports.write, exports.HEAD_FORMAT),
    FileKind(exports.UNMERGED, exports.read, exports.write, exports.UNMERGED_FORMAT),
    FileKind(exports.PRUNED, exports.read, exports.write, exports.PRUNED_EXPORT_FORMAT),
    _kind("onnx_model", onnx_meta),
    FileKind("architecture_json", prune_files.read_architecture, prune_files.write, prune_files.FORMAT),
    FileKind("prune_json", prune_files.read_report, prune_files.write, prune_files.FORMAT),
)}
