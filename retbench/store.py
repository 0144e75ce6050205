"""The result store: one JSON file per (model, task, protocol), written atomically.

Layout: ``<results>/<task>/<protocol>/<model>.json`` (model names made path-safe). A
result file is complete or absent; the leaderboard and ``retbench results`` are pure
functions of these files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from retbench.atomic_files import atomic_write_json
from retbench.errors import RetbenchError, warn


def safe_name(name: str) -> str:
    """A file-name-safe rendering of a model, task or protocol name (``timm:resnet18`` → ``timm_resnet18``).

    Always one visible path component: runs of characters other than letters, digits, ``.``, ``_`` and ``-``
    (``/`` and ``\\`` included) become ``_``; a name that would come out empty or start with ``.`` (``..``,
    ``.``, a hidden file the store's readers skip) gets a leading ``_`` (``..`` → ``_..``), which no other
    name's rendering has, so every name that was safe before keeps its file.
    """
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
    return out if out and not out.startswith(".") else f"_{out}"


def result_path(root: Path, model: str, task: str, protocol: str) -> Path:
    """Deterministic location of one result: always a file three levels under ``root``, whatever the names hold."""
    return root / safe_name(task) / safe_name(protocol) / f"{safe_name(model)}.json"


def write_result(path: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Write a result atomically (readers never see half a file), with this machine's paths made portable
    (:func:`portable_result`); returns what was written."""
    result = portable_result(result, path.parent.parent.parent)
    atomic_write_json(path, result)
    return result


PATH_FIELDS = (("config", "results_dir"), ("config", "data_root"), ("config", "cache_dir"), ("config", "weights"),
               ("model", "weights"), ("model", "weights_path"), ("model", "folder"), ("task", "file"))
"""Fields that hold a path as the run used it (relative ones: to the working folder), made absolute before
:func:`portable_result` rewrites them."""

_ABS_PATH = re.compile(r"(?<![^\s(\[{'\"=])/[^\s'\"()\[\]{},;]+")  # an absolute path inside any text
_ENV_FOLDERS = ("RETBENCH_WEIGHTS", "HF_HUB_CACHE", "HF_HOME")


def portable_result(result: dict[str, Any], results_dir: Path) -> dict[str, Any]:
    """``result`` without this machine's absolute paths, for sharing: every absolute path in any string becomes

    - ``<cache>/…``, ``<data>/…``, ``<tasks>/…`` (the shipped tasks folder), ``$RETBENCH_WEIGHTS/…``,
      ``$HF_HUB_CACHE/…``, ``$HF_HOME/…`` inside those folders (the deepest one);
    - else a path relative to the results folder when the two share a folder below the home folder's
      ancestors (a project's ``runs/`` beside its ``results/``: ``../runs/mae/model.safetensors``);
    - else ``~/…`` inside the home folder, else ``<elsewhere>/<file name>``.

    File names, hashes and sizes stay. A relative path in a stored result is relative to the results folder;
    :func:`recorded_file` finds the file again.
    """
    cfg = result.get("config")
    if not isinstance(cfg, dict):
        cfg = {}
    result = _absolute_fields(result)
    from retbench.spec.reader import shipped_tasks_dir

    anchors = [(cfg.get("cache_dir"), "<cache>"), (cfg.get("data_root") or os.environ.get("RETBENCH_DATA"), "<data>"),
               (shipped_tasks_dir(), "<tasks>")] + [(os.environ.get(v), f"${v}") for v in _ENV_FOLDERS]
    labelled = [(os.path.abspath(os.path.expanduser(a)), label) for a, label in anchors if a]
    home, results = os.path.abspath(Path.home()), os.path.abspath(results_dir)

    def portable(match: re.Match[str]) -> str:
        p = os.path.normpath(match.group(0))
        inside = [(a, label) for a, label in labelled if _within(p, a)]
        if inside:
            a, label = max(inside, key=lambda i: len(i[0]))
            return label if p == a else f"{label}/{os.path.relpath(p, a)}"
        common = os.path.commonpath([p, results])
        if common != os.sep and not _within(home, common):
            return os.path.relpath(p, results)
        if _within(p, home):
            return "~" if p == home else f"~/{os.path.relpath(p, home)}"
        return f"<elsewhere>/{os.path.basename(p)}"

    def walk(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v) for v in o]
        return _ABS_PATH.sub(portable, o) if isinstance(o, str) and "/" in o else o

    return walk(result)


def _absolute_fields(result: dict[str, Any]) -> dict[str, Any]:
    out = dict(result)
    for section, key in PATH_FIELDS:
        value = out.get(section, {}).get(key) if isinstance(out.get(section), dict) else None
        if isinstance(value, str) and value and value not in ("random", "hub") and not value.startswith("~"):
            out[section] = {**out[section], key: os.path.abspath(value)}
    return out


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def recorded_file(recorded: str, results_dir: Path) -> Path | None:
    """The file a path recorded in a result names here (see :func:`portable_result`), or None where it was redacted."""
    head, _, rest = recorded.partition("/")
    if head.startswith("$"):
        folder = os.environ.get(head[1:])
        return Path(folder, rest) if folder else None
    if head == "<tasks>":
        from retbench.spec.reader import shipped_tasks_dir

        tasks = shipped_tasks_dir()
        return tasks / rest if tasks else None
    if head.startswith("<"):
        return None
    path = Path(recorded).expanduser()
    return path if path.is_absolute() else results_dir / path  # absolute: a result written before paths were portable


def stale_reason(path: Path, spec_hash: str | None = None, weights: Path | None = None) -> str | None:
    """Why the stored result ``path`` no longer describes its model or task, or None.

    A result records its task's version and spec hash, and the checkpoint file it was computed
    from with that file's sha256. When the task spec changed, when ``weights`` (the file this run
    would read) has other bytes than the recorded file had (another file of the same name, a
    ``local:`` folder of the same name, a checkpoint replaced in place), or, with ``weights``
    unknown, the recorded file is still there but its bytes changed, skipping the result as
    finished would silently report old numbers under the new model or task. An identical copy
    elsewhere is the same model.
    """
    from retbench.adapters import file_sha256

    try:
        stored = json.loads(path.read_text())
        model, task = stored["model"], stored["task"]
    except (json.JSONDecodeError, KeyError, OSError, TypeError):
        return f"{path}: unreadable result file (delete it or rerun with --overwrite)"
    if spec_hash is not None and task.get("spec_hash") != spec_hash:
        return (f"{path} was computed with another version of task '{task.get('name')}' (v{task.get('version')}, "
                f"spec {task.get('spec_hash')}; now spec {spec_hash}): rerun with --overwrite, or use another "
                "--results-dir to keep both")
    recorded = str(model.get("weights_identity") or "")
    file = model.get("weights_path") or (model.get("weights") if model.get("weights") not in ("random", "hub") else None)
    if not recorded.startswith("sha256:"):
        return None
    local = recorded_file(file, path.parent.parent.parent) if file else None  # the result is 3 levels down
    if weights is None:
        if local is None or not local.is_file():
            return None
        weights = local
    now = file_sha256(weights)
    if recorded == f"sha256:{now}":
        return None
    if local is not None and _same_file(local, weights):
        return (f"{path} was computed from another version of {file} (sha256 {recorded[7:19]}…, the file is now "
                f"{now[:12]}…): rerun with --overwrite, or use another --results-dir to keep both")
    return (f"{path} was computed from a different file, {file} (sha256 {recorded[7:19]}…), than this run's {weights} "
            f"(sha256 {now[:12]}…): rerun with --overwrite, or use another --results-dir to keep both")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.expanduser().resolve() == b.expanduser().resolve()
    except OSError:
        return False


REQUIRED_KEYS = ("model.name", "task.name", "task.version", "protocol.name", "primary_metric", "metrics", "runs")
"""What every reader of the store relies on; a result file without one of these is reported and left out."""

TABLE_KEYS = REQUIRED_KEYS + ("created", "data.n_test")
"""What ``retbench results`` (:func:`results_table`) reads besides."""


def missing_key(data: Any, keys: tuple[str, ...] = REQUIRED_KEYS) -> str | None:
    """The first dotted key of ``keys`` (plus the primary metric's mean and each run's seed) that ``data`` lacks."""
    if not isinstance(data, dict):
        return "<root> (not a JSON object)"
    for dotted in keys:
        node: Any = data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return dotted
            node = node[part]
    primary = data["primary_metric"]
    if not isinstance(data["metrics"], dict) or not isinstance(data["metrics"].get(primary), dict) \
            or "mean" not in data["metrics"][primary]:
        return f"metrics.{primary}.mean"
    if not isinstance(data["runs"], list) or not all(isinstance(r, dict) and "seed" in r for r in data["runs"]):
        return "runs[].seed"
    return None


def iter_results(root: Path, keys: tuple[str, ...] = REQUIRED_KEYS) -> Iterator[dict[str, Any]]:
    """Every complete result under ``root`` (temporary files are ignored).

    A file that parses but lacks one of ``keys`` is left out with one warning line naming it.
    """
    if not root.is_dir():
        raise RetbenchError(f"results directory does not exist: {root}")
    for path in sorted(root.glob("*/*/*.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # .sweep/ state and other bookkeeping, not results
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RetbenchError(f"{path}: corrupt result file: {exc}") from None
        if (missing := missing_key(data, keys)) is not None:
            warn(f"{path}: not a complete result (no key '{missing}'); left out (delete it or rerun with --overwrite)")
            continue
        protocol = data["protocol"]["name"]
        if not isinstance(protocol, str) or safe_name(protocol) != protocol:  # leaderboards are files named by it
            warn(f"{path}: protocol name {protocol!r} is not a file name (letters, digits, '.', '_', '-'; not "
                 "starting with '.'); left out (not a result retbench wrote)")
            continue
        data["_path"] = str(path)
        yield data


def number(value: Any) -> float:
    """A stored number as float; ``null`` (how results store NaN) and absent values are NaN (missing)."""
    return float("nan") if value is None else float(value)


def results_table(root: Path) -> pd.DataFrame:
    """One row per result: model, task, protocol, primary metric, every scalar metric's mean and CI (NaN: missing),
    and what the primary metric's CI resampled (``primary_ci_over``: ``"61 test patients × 5 runs"``; empty without a
    CI)."""
    from retbench.resampling import ci_over

    rows = []
    for r in iter_results(root, TABLE_KEYS):
        row = {
            "model": r["model"]["name"], "task": r["task"]["name"], "task_version": r["task"]["version"],
            "protocol": r["protocol"]["name"], "primary_metric": r["primary_metric"],
            "primary": number(r["metrics"][r["primary_metric"]]["mean"]), "n_test": r["data"]["n_test"],
            "seeds": len({run["seed"] for run in r["runs"]}), "k": r.get("headline_k"), "created": r["created"],
            "path": r["_path"],
        }
        primary = r["metrics"][r["primary_metric"]]
        row["primary_ci_over"] = ci_over(primary["ci_method"]) if "ci_method" in primary else ""
        for name, m in r["metrics"].items():
            if "std" in m:
                row[name] = number(m["mean"])
                if "ci95" in m:
                    low, high = m["ci95"] or (None, None)
                    row[f"{name}_ci_low"], row[f"{name}_ci_high"] = number(low), number(high)
        rows.append(row)
    return pd.DataFrame(rows)
