"""The ``retbench`` parser and its commands: run, list, validate, results, leaderboard (pretrain and sweep are
defined in their packages and added here).

Arguments are parsed here and turned into one :class:`~retbench.config.RunConfig`;
nothing below this module sees argparse.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from retbench.cli.common import add_tasks_path_argument, csv_list, err, extra_task_folders, out
from retbench.config import PRECISIONS
from retbench.errors import RetbenchError

EPILOG = """examples:
  retbench run --model classical --task eye4class
  retbench run --model classical,timm:resnet18 --task @bundled --protocol linear_probe,few_shot
  retbench run --model retfound.cfp --weights ~/ckpt/RETFound_mae_natureCFP.pth --task @bundled
  retbench run --model flair --task messidor --protocol zero_shot
  retbench list tasks
  retbench list models --format markdown
  retbench leaderboard --results-dir results --out leaderboards
Data root: --data-root DIR or $RETBENCH_DATA. Feature cache: --cache-dir or $RETBENCH_CACHE.
Checkpoints: --weights PATH, else $RETBENCH_WEIGHTS/<official file name>, else the Hugging Face cache."""


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(prog="retbench", description="Benchmark retinal foundation models on "
                                     "declarative tasks with zero-shot, few-shot and linear-probe protocols.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    from retbench.pretrain.cli import add_pretrain_parser

    add_pretrain_parser(sub)
    from retbench.sweep import add_sweep_parser

    add_sweep_parser(sub)
    from retbench.cli.data import add_data_parser

    add_data_parser(sub)
    lst = sub.add_parser("list", help="list tasks, models, protocols, metrics or task groups",
                         description="List what is registered.")
    lst.add_argument("what", choices=["tasks", "models", "protocols", "metrics", "groups"])
    lst.add_argument("--pattern", default="*", help="glob filter on names (e.g. 'mx_*', 'retfound*')")
    lst.add_argument("--format", choices=["table", "markdown", "csv", "json"], default="table",
                     help="table (default), markdown (GitHub pipe table, as in the README), csv or json")
    add_tasks_path_argument(lst)
    val = sub.add_parser("validate", help="validate task specs (all shipped ones by default)",
                         description="Parse and validate YAML task specs; exit 1 if any is invalid.")
    val.add_argument("files", nargs="*", help="spec files (default: every shipped and RETBENCH_TASKS_PATH task)")
    add_tasks_path_argument(val)
    res = sub.add_parser("results", help="show the result store as a table; export CSV",
                         description="Show stored results, one row per (model, task, protocol): the primary metric's "
                                     "mean over runs and its 95% CI, a percentile bootstrap over what 'CI over' names "
                                     "(test patients, or images where no patient id exists, × the runs).")
    res.add_argument("--results-dir", default="results", help="result store (default: ./results)")
    res.add_argument("--csv", help="also write the full table (every metric and CI) as CSV to this path")
    res.add_argument("--task", action="append", help="only these tasks (repeatable, comma-separated)")
    res.add_argument("--protocol", action="append", help="only these protocols")
    lb = sub.add_parser("leaderboard", help="render leaderboards (markdown, CSV, HTML, figures) from the result store",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Write <out>/<protocol>.md, .csv and .html per protocol and PNG figures in <out>/figures:\n"
                        "models x tasks + mean, 95% CIs, best in bold. With --baseline, the best baseline of each column\n"
                        "is underlined and every other model gets its difference and stars (* p < 0.01, ** p < 0.001)\n"
                        "from a paired Wilcoxon signed-rank test over seeds (task x seed for the mean), corrected over\n"
                        "the models compared; results of one task made under different task versions, splits or\n"
                        "protocol settings are refused. The same store gives byte-identical files.",
                        epilog="example: retbench leaderboard --baseline classical --out leaderboards")
    lb.add_argument("--results-dir", default="results", help="result store (default: ./results)")
    lb.add_argument("--out", default="leaderboards", help="output folder (default: ./leaderboards)")
    lb.add_argument("--protocol", action="append", help="only these protocols (default: all in the store)")
    lb.add_argument("--metric", help="show this metric for every task instead of each task's primary metric")
    lb.add_argument("--baseline", action="append", metavar="MODEL",
                    help="a baseline model (repeatable, comma-separated; a family name such as 'classical' works when "
                    "unambiguous); default: none, so no underlines, deltas or stars")
    lb.add_argument("--correction", choices=["holm", "bh", "none"], default="holm",
                    help="multiple-comparison correction over the models compared with a baseline: holm (default), "
                    "bh (Benjamini-Hochberg) or none")
    lb.add_argument("--resamples", type=int, default=1000,
                    help="bootstrap resamples for single-run CIs and paired differences (default and minimum: 1000)")
    lb.add_argument("--no-figures", action="store_true", help="write the tables only, no PNG figures")
    return parser


def _add_run(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="evaluate models on tasks", formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Evaluate every model on every task with every protocol that applies.\n"
                         "Finished (model, task, protocol) results are skipped unless --overwrite.",
                         epilog="Task selectors: names, globs ('mx_*') or @groups (@bundled, @dr_grading, @all).")
    run.add_argument("--model", "-m", action="append", required=True,
                     help="model name(s): family[.tag] or family:arg, e.g. classical, timm:resnet18 (repeatable)")
    run.add_argument("--task", "-t", action="append", required=True, help="task name(s), globs or @group (repeatable)")
    run.add_argument("--protocol", "-p", action="append",
                     help="protocol(s) (default: linear_probe, few_shot, zero_shot where the task allows)")
    run.add_argument("--data-root", help="folder holding the datasets (default: $RETBENCH_DATA)")
    run.add_argument("--results-dir", default="results", help="result store (default: ./results)")
    run.add_argument("--cache-dir", default="", help="feature cache (default: $RETBENCH_CACHE or ~/.cache/retbench)")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    run.add_argument("--weights", help="checkpoint file or folder for the model (default: the official file name under "
                     "$RETBENCH_WEIGHTS, else the Hugging Face cache); 'random' = the architecture untrained; "
                     "'hub' = timm's pretrained download for timm:<name>")
    run.add_argument("--batch-size", type=int, default=None,
                     help="images per forward pass (default: the largest that fits on CUDA, halved; 64 on CPU, 16 above 256 px)")
    run.add_argument("--workers", type=int, default=None,
                     help="DataLoader workers (default: cores - 1; 0, decoding in line, on 2 cores or fewer)")
    run.add_argument("--overwrite", action="store_true", help="recompute results that already exist")
    run.add_argument("--skip-bad-images", action="store_true",
                     help="skip unreadable images (recorded in the result) instead of failing")
    run.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache (nor the pixel cache)")
    run.add_argument("--no-pixel-cache", action="store_true",
                     help="neither read nor write the cache of preprocessed pixels (<cache>/pixels, shared by every "
                     "model and task with one resize recipe; bounded by $RETBENCH_PIXEL_CACHE_MAX_GB, default 20); "
                     "also $RETBENCH_NO_PIXEL_CACHE=1. Features are the same either way")
    run.add_argument("--shots", type=int, nargs="+", help="few-shot k values (default: 1 2 4 8 16 where possible)")
    run.add_argument("--seeds", type=int, help="number of seeds for few-shot and linear probe")
    run.add_argument("--precision", choices=PRECISIONS, default="release",
                     help="CUDA forward pass: 'release' (default) = each model's release's own precision (e.g. RETFound's "
                     "fp16 autocast, FLAIR's fp32), or fp32 / fp16 / bf16 autocast for every model; CPU always runs "
                     "fp32. The precision used is recorded in each result (model.precision)")
    run.add_argument("--leaderboard", metavar="DIR", help="afterwards, write leaderboards into DIR")
    run.add_argument("--profile", action="store_true",
                     help="afterwards, print where the time went per model: decode + preprocess, forward, probe fits, "
                     "summary + bootstrap, writing (the same figures are stored in each result's timings)")
    add_tasks_path_argument(run)


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one line and exit 2."""
    from retbench.determinism import pin_cpu_kernels

    pin_cpu_kernels()  # before torch loads: the same kernels, so the same numbers on the same CPU model
    args = build_parser().parse_args(argv)
    try:
        with extra_task_folders(getattr(args, "tasks_path", None)):
            return COMMANDS[args.command](args)
    except RetbenchError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 2


def cmd_run(args: argparse.Namespace) -> int:
    """``retbench run``."""
    from retbench.config import RunConfig
    from retbench.runner import run
    from retbench.tasks import resolve_tasks

    config = RunConfig(
        models=csv_list(args.model), tasks=tuple(resolve_tasks(list(csv_list(args.task)))),
        protocols=csv_list(args.protocol), data_root=args.data_root, results_dir=args.results_dir,
        cache_dir=args.cache_dir, device=args.device, weights=args.weights, batch_size=args.batch_size,
        num_workers=args.workers, overwrite=args.overwrite, skip_bad_images=args.skip_bad_images,
        use_cache=not args.no_cache, pixel_cache=not args.no_pixel_cache,
        shots=tuple(args.shots) if args.shots else None, seeds=args.seeds,
        precision=args.precision,
    )
    started = time.perf_counter()
    results = run(config, on_result=_print_result)
    wall = time.perf_counter() - started
    done = sum(r.status == "done" for r in results)
    existing = sum(r.status == "existing" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    err.print(f"{done} written, {existing} already in {config.results_dir}, {skipped} not applicable")
    if skipped and not done and not existing:
        err.print("[red]error:[/red] nothing was run: every requested evaluation was skipped "
                  "(reasons above)", highlight=False, soft_wrap=True)
        return 2
    if args.leaderboard:
        from retbench.leaderboard import write_leaderboards

        for path in write_leaderboards(Path(config.results_dir), Path(args.leaderboard)):
            err.print(f"leaderboard: {path}")
    if getattr(args, "profile", False):
        _print_profile(results, wall)
    return 0


def _print_profile(results: list[Any], wall: float) -> None:
    """``--profile``: seconds per model and section over the results this run wrote, and the rest of the run."""
    from retbench.timing import profile_table

    timed = [(r.data["model"]["name"], r.data["timings"]) for r in results if r.status == "done"]
    if not timed:
        err.print("profile: no result was computed in this run (existing results are skipped; --overwrite recomputes)")
        return
    out.print(profile_table(timed), highlight=False, soft_wrap=True)
    inside = sum(t.get("total_s", 0.0) for _, t in timed)
    out.print(f"wall time {wall:.2f} s: {inside:.2f} s in the {len(timed)} results above, {max(wall - inside, 0):.2f} s "
              "outside them (loading tasks and models, imports, skipped work); features come from the first result "
              "of a task that reads them (cached after)", highlight=False, soft_wrap=True)


def _print_result(result: object) -> None:
    from retbench.resampling import ci_over
    from retbench.runner import Result

    assert isinstance(result, Result)
    if result.status == "skipped":
        err.print(f"[yellow]skip[/yellow] {result.reason}", highlight=False)
    elif result.status == "existing":
        err.print(f"[dim]exists[/dim] {result.path}", highlight=False)
    else:
        d = result.data
        m = d["metrics"][d["primary_metric"]]
        over = f" over {ci_over(m['ci_method'])}" if "ci_method" in m else ""
        ci = f" (95% CI {m['ci95'][0]:.3f}–{m['ci95'][1]:.3f}{over})" if "ci95" in m else ""
        out.print(f"{d['model']['name']:<24} {d['task']['name']:<24} {d['protocol']['name']:<22} "
                  f"{d['primary_metric']}={m['mean']:.3f}{ci}", highlight=False)


def cmd_list(args: argparse.Namespace) -> int:
    """``retbench list``."""
    import fnmatch

    rows, columns = LISTERS[args.what]()
    rows = [r for r in rows if fnmatch.fnmatch(str(r[columns[0]]), args.pattern)]
    if args.format == "table":
        table = Table(*columns, show_lines=False)
        for r in rows:
            table.add_row(*(str(r[c]) for c in columns))
        out.print(table)
    else:
        sys.stdout.write(format_rows(rows, columns, args.format))
    return 0


def format_rows(rows: list[dict], columns: list[str], fmt: str) -> str:
    """Rows as GitHub markdown, CSV or JSON text."""
    if fmt == "json":
        return json.dumps([{c: r[c] for c in columns} for r in rows], indent=1) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    from tabulate import tabulate

    cells = [[str(r[c]).replace("|", "\\|") for c in columns] for r in rows]
    return tabulate(cells, headers=columns, tablefmt="github") + "\n"


def _warn_invalid_specs(problems: list[str]) -> None:
    for problem in problems:
        err.print(f"[yellow]warning:[/yellow] skipped invalid task spec: {problem}", highlight=False, soft_wrap=True)


def _list_tasks() -> tuple[list[dict], list[str]]:
    from retbench.tasks import task_specs

    specs, problems = task_specs()
    _warn_invalid_specs(problems)
    rows = []
    for name, s in specs.items():
        rows.append({"task": name, "version": s.version, "modality": s.modality, "problem": s.problem,
                     "classes": len(s.classes), "primary": s.primary_metric, "groups": ", ".join(s.groups)})
    return rows, ["task", "version", "modality", "problem", "classes", "primary", "groups"]


def _list_models() -> tuple[list[dict], list[str]]:
    from retbench.adapters import list_models

    return list_models(), ["model", "source", "licence", "input", "feature", "text", "differs"]


def _list_protocols() -> tuple[list[dict], list[str]]:
    from retbench.protocols import PROTOCOLS

    rows = [{"protocol": n, "description": PROTOCOLS.get(n).description} for n in PROTOCOLS.names()]
    return rows, ["protocol", "description"]


def _list_metrics() -> tuple[list[dict], list[str]]:
    from retbench.metrics import METRICS

    rows = [{"metric": n, "higher_is_better": METRICS.get(n).higher_is_better, "description": METRICS.get(n).description}
            for n in METRICS.names()]
    return rows, ["metric", "higher_is_better", "description"]


def _list_groups() -> tuple[list[dict], list[str]]:
    from retbench.tasks import task_groups, task_specs

    _warn_invalid_specs(task_specs()[1])
    return [{"group": f"@{g}", "tasks": ", ".join(t)} for g, t in sorted(task_groups().items())], ["group", "tasks"]


LISTERS = {"tasks": _list_tasks, "models": _list_models, "protocols": _list_protocols, "metrics": _list_metrics,
           "groups": _list_groups}


def cmd_validate(args: argparse.Namespace) -> int:
    """``retbench validate``: every problem is reported, one line each."""
    from retbench.spec import parse_spec
    from retbench.tasks import task_index

    files = [Path(f) for f in args.files] or list(task_index().values())
    failures = 0
    for path in files:
        try:
            spec = parse_spec(path)
            out.print(f"[green]ok[/green]   {spec.name} v{spec.version}  ({path})", highlight=False)
        except RetbenchError as exc:
            failures += 1
            out.print(f"[red]FAIL[/red] {exc}", highlight=False, soft_wrap=True)
    out.print(f"{len(files) - failures} valid, {failures} invalid")
    return 1 if failures else 0


def cmd_results(args: argparse.Namespace) -> int:
    """``retbench results``."""
    from retbench.store import results_table

    frame = results_table(Path(args.results_dir))
    if frame.empty:
        err.print(f"no results in {args.results_dir}")
        return 0
    if args.task:
        frame = frame[frame["task"].isin(csv_list(args.task))]
    if args.protocol:
        frame = frame[frame["protocol"].isin(csv_list(args.protocol))]
    if args.csv:
        from retbench.atomic_files import atomic_write_bytes

        target = Path(args.csv)
        try:  # the folder is created; the file is complete or absent
            atomic_write_bytes(target, frame.to_csv(index=False).encode())
        except RetbenchError as exc:  # "cannot write <file>: <why>": say which option named the file
            why = str(exc).removeprefix(f"cannot write {target}: ")
            raise RetbenchError(f"--csv {args.csv}: cannot write: {why}") from None
        err.print(f"wrote {len(frame)} rows to {args.csv}")
    table = Table("model", "task", "protocol", "metric", "mean", "95% CI", "CI over", "runs", "n test")
    for r in frame.sort_values(["task", "protocol", "primary"], ascending=[True, True, False]).to_dict("records"):
        m = r["primary_metric"]
        low, high = r.get(f"{m}_ci_low"), r.get(f"{m}_ci_high")
        ci = f"{low:.3f}–{high:.3f}" if low is not None and low == low and high == high else ""
        mean = f"{r['primary']:.3f}" if r["primary"] == r["primary"] else "–"  # NaN (stored as null): no value
        table.add_row(r["model"], r["task"], r["protocol"], m, mean, ci, r["primary_ci_over"] if ci else "",
                      str(r["seeds"]), str(r["n_test"]))
    out.print(table)
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    """``retbench leaderboard``."""
    from retbench.leaderboard import write_leaderboards

    written: list[Path] = []
    paths = write_leaderboards(Path(args.results_dir), Path(args.out), list(csv_list(args.protocol)) or None,
                               args.metric, baselines=csv_list(args.baseline), correction=args.correction,
                               resamples=args.resamples, figures=not args.no_figures, written=written)
    if not paths:
        err.print(f"no results in {args.results_dir}")
    for p in paths:
        out.print(f"wrote {p} (+ .csv, .html)", highlight=False)
    figures = [p for p in written if p.suffix == ".png"]
    if figures:
        out.print(f"wrote {len(figures)} figures in {figures[0].parent}", highlight=False)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    """``retbench pretrain``."""
    from retbench.pretrain.cli import cmd_pretrain as run_pretrain

    return run_pretrain(args)


def cmd_sweep(args: argparse.Namespace) -> int:
    """``retbench sweep``."""
    from retbench.sweep import cmd_sweep as run_sweep

    return run_sweep(args)


def cmd_data(args: argparse.Namespace) -> int:
    """``retbench data prepare|check`` (in :mod:`retbench.cli.data`)."""
    from retbench.cli.data import cmd_data as run_data

    return run_data(args)


COMMANDS = {"run": cmd_run, "pretrain": cmd_pretrain, "sweep": cmd_sweep, "list": cmd_list, "validate": cmd_validate,
            "results": cmd_results, "leaderboard": cmd_leaderboard, "data": cmd_data}
