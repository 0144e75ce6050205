"""``retbench data prepare`` and ``retbench data check``: from downloaded archives to a verified data root."""

from __future__ import annotations

import argparse
from pathlib import Path

from retbench.cli.common import add_tasks_path_argument, csv_list, err, out

EPILOG = """examples:
  retbench data prepare messidor --from ~/Downloads/IMAGES.zip --from ~/Downloads/FLAIR-main.zip
  retbench data prepare aptos2019 --from ~/Downloads/APTOS2019.zip --data-root ~/retdata
  retbench data check @public
Data root: --data-root DIR or $RETBENCH_DATA (prepare creates it). Checksums of placed files are recorded in
<data_root>/.retbench/checksums/<task>.sha256 and checked by every later prepare and check."""


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``data`` with its ``prepare`` and ``check`` subcommands."""
    data = sub.add_parser("data", help="prepare a public task's data from its downloads; check a prepared layout",
                          description="Lay out downloaded releases as the tasks read them, and verify the result.",
                          epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = dsub.add_parser("prepare", help="find a task's files in downloaded archives or folders and lay them out",
                           description="Find the files a task needs in zip / tar archives or unpacked folders (by file "
                           "name, and by content where the manifest fixes it) and place them under the data root: hard "
                           "links (else symbolic links) to files of folders, files extracted from archives, each written "
                           "atomically. Idempotent: a second run finds everything in place and does nothing.")
    prep.add_argument("task", nargs="+", help="task name(s), globs or @group (e.g. messidor, @flair)")
    prep.add_argument("--from", dest="sources", action="append", required=True, metavar="PATH",
                      help="a downloaded archive (.zip, .tar, .tar.gz, ...) or folder (repeatable; a folder's "
                      "archives are read too)")
    prep.add_argument("--mode", choices=["link", "symlink", "copy"], default="link",
                      help="how files of unpacked folders are placed: link (default: hard link, else symbolic link), "
                      "symlink, or copy; archive members are always extracted")
    _common(prep)
    chk = dsub.add_parser("check", help="verify a prepared layout: counts, missing, extra, unreadable, checksums, "
                          "duplicates", description="Check prepared tasks against their manifests; one line per "
                          "problem and a summary per task; exit 1 on any problem.")
    chk.add_argument("task", nargs="+", help="task name(s), globs or @group")
    chk.add_argument("--no-decode", action="store_true", help="skip decoding each image (checksums and counts only)")
    _common(chk)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", help="folder holding the datasets (default: $RETBENCH_DATA)")
    parser.add_argument("--manifest", metavar="FILE",
                        help="compare against this manifest (YAML) instead of the spec's, e.g. for a partial copy")
    add_tasks_path_argument(parser)


def cmd_data(args: argparse.Namespace) -> int:
    """``retbench data prepare|check``."""
    import os

    from retbench.data.check import check_task
    from retbench.data.manifest import manifest_of
    from retbench.data.prepare import prepare
    from retbench.errors import RetbenchError
    from retbench.tasks import get_task, resolve_tasks

    value = args.data_root or os.environ.get("RETBENCH_DATA")
    if not value:
        raise RetbenchError("no data root: pass --data-root DIR or set RETBENCH_DATA")
    root = Path(value).expanduser()
    manifest_file = Path(args.manifest) if args.manifest else None
    specs = [get_task(name) for name in resolve_tasks(list(csv_list(args.task)))]
    if args.data_command == "prepare":
        prepare(specs, root, [Path(p).expanduser() for p in args.sources], mode=args.mode,
                manifest_file=manifest_file, echo=lambda line: out.print(line, highlight=False, markup=False, soft_wrap=True))
        return 0
    if not root.is_dir():
        raise RetbenchError(f"data root does not exist or is not a folder: {root}")
    bad = 0
    for spec in specs:
        result = check_task(spec, root, manifest_of(spec, manifest_file), verify_images=not args.no_decode)
        for problem in result.problems:
            out.print(problem.line(spec.name), highlight=False, markup=False, soft_wrap=True)
        (err if result.problems else out).print(result.summary(), highlight=False, markup=False, soft_wrap=True)
        bad += bool(result.problems)
    return 1 if bad else 0
