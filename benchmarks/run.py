"""goplug's benchmark suite: ``make bench`` (or ``python benchmarks/run.py [--quick]``).

Every configuration (a row) runs in a fresh worker process (this script with ``--worker``), at
least twice, the repetitions interleaved: all rows once, then all rows again. Latency rows pin the
worker, and with it every server or plugin it spawns, to one core; bulk rows and the scale row
run unpinned. The table and ``benchmarks/results.json`` give the median of the runs and their
spread, each row's ratio to the raw Python floor, and the pass/fail of each target. README.md in
this directory says what each row measures.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import importlib
import json
import operator
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NODE_PLUGIN = os.path.join(REPO, "examples", "node", "plugin.js")
DEFAULT_OUT = os.path.join(HERE, "results.json")

PAYLOAD_NAMES = ("64B", "4KiB", "1MiB", "16MiB")
BULK = ("1MiB", "16MiB")
CALLERS = (1, 8)
# (subject, group, module, function) of the round-trip rows, in table order within a payload.
SUBJECTS = (
    ("raw-uds", "reference", "reference", "rtt_raw"),
    ("grpc-uds", "reference", "reference", "rtt_grpc"),
    ("stdlib-http", "reference", "reference", "rtt_http"),
    ("raw-aio", "reference", "reference", "rtt_raw_aio"),
    ("goplug-sync", "goplug", "goplug_rows", "rtt_sync"),
    ("goplug-aio", "aio", "goplug_rows", "rtt_aio"),
    ("goplug-node", "node", "goplug_rows", "rtt_node"),
)
# raw-aio is the floor of an asyncio client (the goplug-aio rows' event loop) on the raw-uds
# server: measured for the small payloads, where the event loop is what it shows.
SMALL_ONLY = frozenset({"raw-aio"})
# Round trips over TCP + mutual TLS on loopback (tls_rows.py): (subject, group, function) and
# the (payload, callers) each is measured with; raw-tls is the floor of the goplug-tls rows.
TLS_SUBJECTS = (
    ("raw-tls", "reference", "rtt_raw_tls", (("64B", 1), ("64B", 8), ("1MiB", 1))),
    ("grpc-tls", "reference", "rtt_grpc_tls", (("64B", 1),)),
    ("goplug-tls", "tls", "rtt_goplug_tls", (("64B", 1), ("64B", 8), ("1MiB", 1))),
)
NUMERIC_FIELDS = ("p50_us", "p99_us", "calls_per_s", "mb_per_s")
NO_SPREAD = ("samples", "loaded", "notifications")
BUSY = 0.25  # cores used by other processes during a row, above which the table flags it
# --quick runs these rows only: every row a target needs, and a few beside them for context.
QUICK_ROWS = (
    *(
        f"{s}-64B-1"
        for s in (
            "raw-uds",
            "grpc-uds",
            "stdlib-http",
            "raw-aio",
            "goplug-sync",
            "goplug-aio",
            "goplug-node",
        )
    ),
    *(f"{s}-64B-8" for s in ("raw-uds", "raw-aio", "goplug-sync", "goplug-aio")),
    *(f"{s}-{p}-1" for p in ("4KiB", "1MiB", "16MiB") for s in ("raw-uds", "goplug-sync")),
    *(f"goplug-aio-{p}-1" for p in ("1MiB", "16MiB")),
    "goplug-callback",
    "goplug-discovery",
    "python-floor-cold-start",
    "goplug-cold-start",
    "goplug-scale-500",
    "goplug-launch-cold-start",
    "goplug-launch-flood",
    "goplug-launch-flood-1core",
    "raw-tls-64B-1",
    "grpc-tls-64B-1",
    "goplug-tls-64B-1",
    "etcd-watch",
    "etcd-discovery",
)
# Figures of a row given as ratios to a figure of the same run (the row's own, or another
# row's): (row, metric, reference row, reference metric, key in the row's "ratios").
RATIOS = (
    ("goplug-launch-cold-start", "p50_us", "goplug-cold-start", "p50_us", "p50_vs_cold_start"),
    (
        "goplug-launch-cold-start",
        "answer_p50_us",
        "goplug-cold-start",
        "p50_us",
        "answer_vs_cold_start",
    ),
    *(
        entry
        for row in ("goplug-launch-flood", "goplug-launch-flood-1core")
        for entry in (
            (row, "p50_us", row, "quiet_p50_us", "p50_vs_quiet"),
            (row, "p99_us", row, "quiet_p99_us", "p99_vs_quiet"),
            (row, "calls_per_s", row, "quiet_calls_per_s", "calls_vs_quiet"),
            (row, "p50_us", row, "applog_p50_us", "p50_vs_applog"),
            (row, "p99_us", row, "applog_p99_us", "p99_vs_applog"),
            (row, "applog_p50_us", row, "quiet_p50_us", "applog_p50_vs_quiet"),
            (row, "pump_us_per_line", row, "direct_log_us_per_line", "pump_vs_direct_log"),
            (row, "app_us_per_line", row, "direct_log_us_per_line", "app_vs_direct_log"),
        )
    ),
    ("goplug-launch-flood-1core", "quiet_p50_us", "goplug-sync-64B-1", "p50_us", "quiet_vs_sync"),
    ("goplug-aio-64B-1", "p50_us", "raw-aio-64B-1", "p50_us", "p50_vs_raw_aio"),
    ("goplug-aio-64B-8", "calls_per_s", "raw-aio-64B-8", "calls_per_s", "calls_vs_raw_aio"),
)


@dataclass(frozen=True)
class RowSpec:
    name: str
    group: str  # reference | goplug | aio | node | launch | tls | etcd: up-front skip checks
    module: str
    func: str
    pinned: bool
    subject: str = ""
    payload: str = ""
    callers: int = 0
    headline: str = "p50_us"  # the figure whose spread the table shows
    fresh_process: bool = False  # every repetition in a new worker, even with --quick


def all_rows() -> list[RowSpec]:
    """Every row, in run and table order: comparable rows next to each other."""
    rows = []
    for payload in PAYLOAD_NAMES:
        for callers in CALLERS:
            if payload in BULK:
                headline = "mb_per_s"
            else:
                headline = "p50_us" if callers == 1 else "calls_per_s"
            for subject, group, module, func in SUBJECTS:
                if subject in SMALL_ONLY and payload in BULK:
                    continue
                rows.append(
                    RowSpec(
                        name=f"{subject}-{payload}-{callers}",
                        group=group,
                        module=module,
                        func=func,
                        pinned=payload not in BULK,
                        subject=subject,
                        payload=payload,
                        callers=callers,
                        headline=headline,
                    )
                )
    for payload, callers in (("64B", 1), ("64B", 8), ("1MiB", 1)):
        for subject, group, func, configs in TLS_SUBJECTS:
            if (payload, callers) not in configs:
                continue
            if payload in BULK:
                headline = "mb_per_s"
            else:
                headline = "p50_us" if callers == 1 else "calls_per_s"
            rows.append(
                RowSpec(
                    name=f"{subject}-{payload}-{callers}",
                    group=group,
                    module="tls_rows",
                    func=func,
                    pinned=payload not in BULK,
                    subject=subject,
                    payload=payload,
                    callers=callers,
                    headline=headline,
                )
            )
    rows += [
        RowSpec("etcd-watch", "reference", "etcd_rows", "watch", True),
        RowSpec("etcd-discovery", "etcd", "etcd_rows", "discovery", True),
    ]
    rows += [
        RowSpec("goplug-callback", "goplug", "goplug_rows", "callback", True),
        RowSpec("goplug-discovery", "goplug", "goplug_rows", "discovery", True),
        RowSpec("python-floor-cold-start", "reference", "reference", "floor_cold_start", True),
        RowSpec("goplug-cold-start", "goplug", "goplug_rows", "cold_start", True),
        RowSpec(
            "goplug-scale-500",
            "goplug",
            "goplug_rows",
            "scale",
            False,
            headline="load_all_s",
            fresh_process=True,  # RSS and fds are measured on the worker process itself
        ),
        RowSpec("goplug-launch-cold-start", "launch", "goplug_rows", "launch_cold_start", True),
        # The flood row with the target runs on both cores (pump thread, handler and calls
        # may run side by side); the -1core twin pins everything to one core for comparison.
        RowSpec("goplug-launch-flood", "launch", "goplug_rows", "launch_flood", False),
        RowSpec("goplug-launch-flood-1core", "launch", "goplug_rows", "launch_flood", True),
    ]
    return rows


def select_rows(rows: list[RowSpec], only: str | None) -> list[RowSpec]:
    """``--only``: comma-separated groups (reference, goplug, aio, node, launch, tls, etcd),
    names, globs, prefixes."""
    if not only:
        return rows
    tokens = [t.strip() for t in only.split(",") if t.strip()]

    def wanted(r: RowSpec) -> bool:
        return any(
            t == r.group or r.name.startswith(t) or fnmatch.fnmatchcase(r.name, t) for t in tokens
        )

    return [r for r in rows if wanted(r)]


# =========================================================================== pinning


def pin_to(core: int) -> None:
    """Pin this process to one core; threads and processes started afterwards inherit it."""
    os.sched_setaffinity(0, {core})


def default_core() -> int:
    return min(os.sched_getaffinity(0))


# =========================================================================== worker side


def worker_main(args: argparse.Namespace) -> int:
    """Run one row once and write its result (or why it could not run) to --worker-out."""

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through every try/finally: children are stopped

    signal.signal(signal.SIGTERM, terminate)
    spec = next((r for r in all_rows() if r.name == args.worker), None)
    if spec is None:
        print(f"unknown row {args.worker}", file=sys.stderr)
        return 2
    pinned = spec.pinned and not args.no_pin
    if pinned:
        pin_to(args.core)
    sys.path.insert(0, HERE)
    from common import RowContext, Skip

    ctx = RowContext(
        name=spec.name,
        subject=spec.subject,
        payload=spec.payload,
        callers=spec.callers,
        quick=args.quick,
        pinned=pinned,
        core=args.core,
        aio_loop=args.aio_loop,
        certs=args.certs or "",
    )
    out: dict[str, Any] = {"results": [], "reason": None}
    try:
        func = getattr(importlib.import_module(spec.module), spec.func)
        for _ in range(args.worker_reps):
            out["results"].append(func(ctx))
    except Skip as exc:
        out["reason"] = str(exc) or "skipped"
    except Exception as exc:
        out["reason"] = f"{type(exc).__name__}: {exc}".strip()
        out["traceback"] = traceback.format_exc()
    with open(args.worker_out, "w") as f:
        json.dump(out, f)
    return 0


# =========================================================================== parent side


def preflight(rows: list[RowSpec]) -> dict[str, str]:
    """Reasons, by group, why whole groups of rows cannot run here (checked once, up front)."""
    groups = {r.group for r in rows}
    reasons: dict[str, str] = {}
    if groups & {"goplug", "aio", "node", "launch", "tls", "etcd"}:
        try:
            from goplug import Plugin, PluginRegistry  # noqa: F401
        except Exception as exc:
            reason = f"goplug not importable ({type(exc).__name__}: {exc})"
            reasons.update(
                goplug=reason, aio=reason, node=reason, launch=reason, tls=reason, etcd=reason
            )
    if groups & {"tls", "etcd"} and "tls" not in reasons:
        import inspect

        import goplug

        if not hasattr(goplug, "TLSConfig"):
            reasons.update(tls="this goplug has no TLSConfig", etcd="this goplug has no TLSConfig")
        elif "tls" not in inspect.signature(goplug.PluginRegistry).parameters:
            reason = "this goplug's PluginRegistry takes no tls="
            reasons.update(tls=reason, etcd=reason)
    if "etcd" in groups and "etcd" not in reasons:
        try:
            import goplug.etcd
        except Exception as exc:
            reasons["etcd"] = f"goplug.etcd not importable ({type(exc).__name__}: {exc})"
    if "launch" in groups and "launch" not in reasons:
        from goplug import PluginRegistry

        if not hasattr(PluginRegistry, "launch"):
            reasons["launch"] = "this goplug has no PluginRegistry.launch"
    if "aio" in groups and "aio" not in reasons:
        try:
            from goplug import aio  # noqa: F401
        except Exception as exc:
            reasons["aio"] = f"goplug.aio not importable ({type(exc).__name__}: {exc})"
    if "node" in groups and "node" not in reasons:
        if shutil.which("node") is None:
            reasons["node"] = "node is not on PATH"
        elif not os.path.exists(NODE_PLUGIN):
            reasons["node"] = "examples/node/plugin.js does not exist"
    return reasons


def row_timeout(spec: RowSpec, quick: bool) -> float:
    if spec.name == "goplug-scale-500":
        return 60.0 if quick else 150.0
    if spec.name.startswith("goplug-launch-flood"):
        return 30.0 if quick else 180.0  # floods end at 60 s in any case (see launch_flood)
    if spec.name.startswith("etcd-"):
        return 30.0 if quick else 120.0
    return 25.0 if quick else 90.0


def other_cpu_mark() -> tuple[float, float, float]:
    """(busy + steal CPU s of the machine, CPU s of our reaped children, wall s) right now."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    machine = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return machine, children.ru_utime + children.ru_stime, time.monotonic()


def other_cpu_since(mark: tuple[float, float, float]) -> float:
    """Cores kept busy by processes outside this benchmark (or stolen by the hypervisor) since
    ``mark``: the machine's busy time less what the worker and its descendants used."""
    now = other_cpu_mark()
    wall = now[2] - mark[2]
    if wall <= 0:
        return 0.0
    return round(max(0.0, (now[0] - mark[0]) - (now[1] - mark[1])) / wall, 3)


def run_worker(
    spec: RowSpec, args: argparse.Namespace, reps: int, timeout: float
) -> tuple[list[dict[str, Any]], str | None, float]:
    """Run ``reps`` repetitions of a row in a fresh process: (results, failure reason, seconds).

    Each repetition starts its own servers or plugins; the worker process is shared."""
    # The worker's temp files (sockets, plugin dirs) go under a root of our own, removed below
    # even if the worker had to be killed.
    root = tempfile.mkdtemp(
        prefix="gpb-run-", dir="/tmp" if len(tempfile.gettempdir()) > 30 else None
    )
    out_path = os.path.join(root, "result.json")
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in finally)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        spec.name,
        "--worker-out",
        out_path,
        "--core",
        str(args.core),
        "--aio-loop",
        args.aio_loop,
        "--worker-reps",
        str(reps),
    ]
    if args.quick:
        cmd.append("--quick")
    if args.no_pin:
        cmd.append("--no-pin")
    if args.certs:
        cmd += ["--certs", args.certs]
    t0 = time.monotonic()
    load0 = other_cpu_mark()
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=REPO,
            env=dict(os.environ, TMPDIR=root),
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGTERM)  # the worker stops its own children on SIGTERM
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            return [], f"timed out after {timeout:.0f} s", time.monotonic() - t0
        text = ""
        if os.path.exists(out_path):
            with open(out_path) as f:
                text = f.read()
        if not text:
            log.seek(0)
            tail = log.read().decode(errors="replace").strip()[-300:]
            return [], f"worker exited with {proc.returncode}: {tail}", time.monotonic() - t0
        out = json.loads(text)
        other = other_cpu_since(load0)
        for result in out["results"]:
            result["other_load_cores"] = other
        if args.verbose and out.get("traceback"):
            print(out["traceback"], file=sys.stderr)
        return out["results"], out["reason"], time.monotonic() - t0
    finally:
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def quiet_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs during which other processes kept at most BUSY of a core busy."""
    return [r for r in runs if (r.get("other_load_cores") or 0.0) <= BUSY]


def aggregate(
    spec: RowSpec, all_runs: list[dict[str, Any]], failures: list[str], reps: int
) -> dict[str, Any]:
    """One row of results.json: medians over the runs, their spread, the runs themselves.

    When at least ``reps`` runs were undisturbed by other processes, only those count; else the
    ``reps`` least disturbed."""
    quiet = quiet_runs(all_runs)
    if len(quiet) >= reps:
        runs = quiet
    else:
        runs = sorted(all_runs, key=lambda r: r.get("other_load_cores") or 0.0)[:reps]
    row: dict[str, Any] = {"name": spec.name}
    for key in NUMERIC_FIELDS:
        row[key] = None
    row["ratio_to_raw"] = None
    row["pinned"] = spec.pinned
    if not runs:
        row.update(skipped=failures[0] if failures else "not run", runs=[], spread=None)
        return row
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    spread: dict[str, float] = {}
    for key in keys:
        values = [r[key] for r in runs if r.get(key) is not None]
        if not values or key == "other_load_cores":
            continue
        mid = statistics.median(values)
        row[key] = mid
        if len(values) > 1 and mid and key not in NO_SPREAD:
            spread[key] = (max(values) - min(values)) / abs(mid)
    row["other_load_cores_max"] = max((r.get("other_load_cores") or 0.0) for r in runs)
    notes: list[str] = []
    for r in runs:
        for n in r.get("notes", []):
            if n not in notes:
                notes.append(n)
    notes += [f"a run failed: {f}" for f in failures]
    if len(runs) < len(all_runs):
        notes.append(f"{len(all_runs) - len(runs)} run(s) disturbed by other processes set aside")
    row.update(
        skipped=None,
        spread=spread,
        headline=spec.headline,
        runs=[{k: v for k, v in r.items() if k != "notes"} for r in runs],
        runs_set_aside=[
            {k: v for k, v in r.items() if k != "notes"}
            for r in all_runs
            if not any(r is u for u in runs)
        ],
        notes=notes,
    )
    return row


def add_ratios(rows: dict[str, dict[str, Any]], specs: list[RowSpec]) -> None:
    """ratio_to_raw: p50 / raw p50 with one caller, raw calls/s / calls/s with several
    (both read "times the raw floor's time per call"; 1.0 for raw itself). The floor is
    raw-uds with the same payload and callers, raw-tls for the -tls rows."""
    for spec in specs:
        row = rows[spec.name]
        if not spec.subject or row["skipped"]:
            continue
        floor = "raw-tls" if spec.subject.endswith("-tls") else "raw-uds"
        raw = rows.get(f"{floor}-{spec.payload}-{spec.callers}")
        if not raw or raw["skipped"]:
            continue
        if spec.callers == 1 and row["p50_us"] and raw["p50_us"]:
            row["ratio_to_raw"] = row["p50_us"] / raw["p50_us"]
            row["ratio_basis"] = "p50"
        elif row["calls_per_s"] and raw["calls_per_s"]:
            row["ratio_to_raw"] = raw["calls_per_s"] / row["calls_per_s"]
            row["ratio_basis"] = "calls_per_s"


def add_same_run_ratios(rows: dict[str, dict[str, Any]]) -> None:
    """row["ratios"][key] = row[metric] / ref[ref_metric] for each entry of RATIOS measured."""
    for name, metric, ref_name, ref_metric, key in RATIOS:
        row, ref = rows.get(name), rows.get(ref_name)
        if not row or not ref or row["skipped"] or ref["skipped"]:
            continue
        value, base = row.get(metric), ref.get(ref_metric)
        if value is not None and base:
            row.setdefault("ratios", {})[key] = value / base
    for name in ("goplug-launch-flood", "goplug-launch-flood-1core"):
        row = rows.get(name)
        if row and not row["skipped"]:
            p50, quiet, cost = (
                row.get("p50_us"),
                row.get("quiet_p50_us"),
                row.get("direct_log_us_per_line"),
            )
            if p50 is not None and quiet is not None and cost:
                # How many records' worth of logging (as the application logs them itself) a
                # call waited for, at the median: (flood p50 - quiet p50) / cost of one record.
                row["p50_excess_in_records"] = (p50 - quiet) / cost


# =========================================================================== targets


@dataclass(frozen=True)
class Target:
    """``row.metric OP factor * ref.ref_metric`` (or ``OP factor`` when there is no ref)."""

    row: str
    metric: str
    op: str  # "<=", ">=", "<"
    factor: float
    ref: str | None = None
    ref_metric: str | None = None
    label: str = ""


TARGETS = (
    Target("goplug-sync-64B-1", "p50_us", "<=", 1.3, "raw-uds-64B-1", "p50_us", "p50"),
    Target("goplug-sync-64B-1", "p99_us", "<=", 2.0, "raw-uds-64B-1", "p99_us", "p99"),
    Target(
        "goplug-sync-64B-1",
        "calls_per_s",
        ">=",
        15.0,
        "grpc-uds-64B-1",
        "calls_per_s",
        "calls/s vs grpc",
    ),
    Target(
        "goplug-sync-64B-8", "calls_per_s", ">=", 0.8, "raw-uds-64B-8", "calls_per_s", "calls/s"
    ),
    Target("goplug-aio-64B-1", "p50_us", "<=", 2.0, "raw-uds-64B-1", "p50_us", "p50"),
    Target("goplug-sync-1MiB-1", "mb_per_s", ">=", 0.9, "raw-uds-1MiB-1", "mb_per_s", "MB/s"),
    Target("goplug-sync-16MiB-1", "mb_per_s", ">=", 0.9, "raw-uds-16MiB-1", "mb_per_s", "MB/s"),
    Target("goplug-node-64B-1", "p50_us", "<=", 3.0, "raw-uds-64B-1", "p50_us", "p50"),
    Target("goplug-callback", "calls_per_s", ">=", 50_000, label="notifications/s"),
    Target(
        "goplug-callback", "p50_us", "<=", 2.0, "goplug-sync-64B-1", "p50_us", "p50 vs execute p50"
    ),
    Target("goplug-discovery", "p50_us", "<=", 20_000, label="renamed->loaded p50 µs"),
    Target("goplug-discovery", "p99_us", "<=", 50_000, label="renamed->loaded p99 µs"),
    Target(
        "goplug-cold-start",
        "p50_us",
        "<=",
        2.0,
        "python-floor-cold-start",
        "p50_us",
        "p50 vs floor",
    ),
    Target("goplug-scale-500", "load_all_s", "<=", 3.0, label="all loaded s"),
    Target("goplug-scale-500", "rss_per_plugin_kib", "<=", 64.0, label="KiB RSS/plugin"),
    Target("goplug-scale-500", "idle_cpu_pct", "<", 1.0, label="idle CPU %"),
    Target("goplug-scale-500", "fds_per_plugin", "<=", 2.0, label="fds/plugin"),
    # Plugins on other hosts: TCP + mutual TLS on loopback, and discovery through etcd.
    Target("goplug-tls-64B-1", "p50_us", "<=", 1.5, "raw-tls-64B-1", "p50_us", "p50"),
    Target(
        "goplug-tls-64B-1",
        "calls_per_s",
        ">=",
        10.0,
        "grpc-tls-64B-1",
        "calls_per_s",
        "calls/s vs grpc-tls",
    ),
    Target("etcd-discovery", "p50_us", "<=", 3.0, "etcd-watch", "p50_us", "p50 vs etcd watch"),
    # A plugin's log flood slows calls no more than the logging itself does: on 2 cores, p50
    # during the flood <= 1.5x p50 while the application logs the same lines itself (README:
    # why not 2x the quiet p50 there); on one core, the bound asked for, 2x the quiet p50.
    Target(
        "goplug-launch-flood",
        "p50_us",
        "<=",
        1.5,
        "goplug-launch-flood",
        "applog_p50_us",
        "p50 flood vs app logging",
    ),
    Target(
        "goplug-launch-flood-1core",
        "p50_us",
        "<=",
        2.0,
        "goplug-launch-flood-1core",
        "quiet_p50_us",
        "p50 flood vs quiet",
    ),
)
OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
}


def evaluate(target: Target, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "row": target.row,
        "what": target.label or target.metric,
        "metric": target.metric,
        "op": target.op,
        "factor": target.factor,
        "ref": target.ref,
        "value": None,
        "limit": None,
        "status": "n/a",
    }
    row = rows.get(target.row)
    value = None if row is None or row["skipped"] else row.get(target.metric)
    if value is None:
        out["text"] = f"{out['what']}: n/a ({target.row} not measured)"
        return out
    limit = target.factor
    if target.ref is not None:
        ref = rows.get(target.ref)
        ref_value = None if ref is None or ref["skipped"] else ref.get(target.ref_metric or "")
        if not ref_value:
            out["text"] = f"{out['what']}: n/a ({target.ref} not measured)"
            return out
        limit = target.factor * ref_value
        shown = f"{value / ref_value:.2f}x {target.op} {target.factor:g}x"
    else:
        shown = f"{fmt(value)} {target.op} {fmt(target.factor)}"
    ok = OPS[target.op](value, limit)
    out.update(value=value, limit=limit, status="PASS" if ok else "FAIL")
    out["text"] = f"{out['what']} {shown} {out['status']}"
    return out


# =========================================================================== output


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def print_table(
    results: list[dict[str, Any]], targets: list[dict[str, Any]], core: int, reps: int, no_pin: bool
) -> None:
    by_row: dict[str, list[str]] = {}
    for t in targets:
        by_row.setdefault(t["row"], []).append(t["text"])
    header = ["name", "pin", "p50 µs", "p99 µs", "calls/s", "MB/s", "x raw", "spread", "target"]
    lines = []
    busy_rows = 0
    for r in results:
        pin = f"cpu{core}" if r["pinned"] and not no_pin else "-"
        if r["skipped"]:
            lines.append([r["name"], pin, "", "", "", "", "", "", f"SKIPPED: {r['skipped']}"])
            continue
        name = r["name"]
        if (r.get("other_load_cores_max") or 0.0) > BUSY:
            name += " !"
            busy_rows += 1
        spread = (r.get("spread") or {}).get(r.get("headline") or "p50_us")
        target = "; ".join(by_row.get(r["name"], []))
        lines.append(
            [
                name,
                pin,
                fmt(r["p50_us"]),
                fmt(r["p99_us"]),
                fmt(r["calls_per_s"], 0),
                fmt(r["mb_per_s"]),
                f"{r['ratio_to_raw']:.2f}" if r["ratio_to_raw"] is not None else "-",
                f"{spread * 100:.0f}%" if spread is not None else f"{len(r['runs'])} run",
                "; ".join(x for x in (target, _extra_text(r)) if x),
            ]
        )
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(8)]
    if no_pin:
        pinned = "no row pinned (--no-pin)"
    else:
        pinned = f"cpu{core}: the row ran pinned to core {core}, server and clients alike"
    print(f"\ngoplug benchmarks: median of {reps} runs per row; {pinned}")
    print(
        "spread: (max - min) / median of the row's headline figure (p50 with 1 caller, calls/s "
        "with 8, MB/s for bulk); x raw: time per call relative to raw-uds (raw-tls for the "
        "-tls rows)"
    )
    for line in [header, *lines]:
        cells = [
            c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(line[:8])
        ]
        print("  ".join(cells) + "  " + line[8])
    counts = {s: sum(1 for t in targets if t["status"] == s) for s in ("PASS", "FAIL", "n/a")}
    print(f"targets: {counts['PASS']} pass, {counts['FAIL']} fail, {counts['n/a']} not measured")
    if busy_rows:
        print(
            f"! {busy_rows} row(s) ran while other processes kept more than {BUSY} of a core "
            "busy (see other_load_cores_max in results.json): their figures are doubtful"
        )


def _extra_text(row: dict[str, Any]) -> str:
    name = row["name"]
    if name == "raw-tls-64B-1" and row.get("tls_connect_p50_us") is not None:
        return (
            f"(new connection -> first answer: mutual TLS {fmt(row['tls_connect_p50_us'])} µs, "
            f"plain TCP {fmt(row.get('tcp_connect_p50_us'))} µs)"
        )
    if name == "etcd-watch":
        return (
            "(p50/p99 = put by one client -> the watch event in another; the put's own round "
            f"trip p50 {fmt(row.get('put_p50_us'))} µs)"
        )
    if name == "etcd-discovery":
        text = "(p50/p99 = a plugin put into etcd -> loaded"
        if row.get("discovered_p50_us") is not None:
            text += f"; put -> discovered p50 {fmt(row['discovered_p50_us'])} µs"
        return text + ")"
    if name == "goplug-discovery" and row.get("discovered_p50_us") is not None:
        disc = fmt(row["discovered_p50_us"])
        return f"(p50/p99 = renamed->loaded; renamed->discovered p50 {disc})"
    if name == "goplug-callback":
        return "(p50/p99 = notify->callback, calls/s = notifications/s)"
    if name == "python-floor-cold-start" and row.get("interpreter_p50_us") is not None:
        return f"(python -c pass alone: p50 {fmt(row['interpreter_p50_us'])} µs)"
    if name == "goplug-scale-500" and row.get("rss_host_kib") is not None:
        return f"(host RSS {fmt(row['rss_host_kib'])} KiB)"
    ratios = row.get("ratios") or {}
    if name == "goplug-aio-64B-1" and "p50_vs_raw_aio" in ratios:
        return f"(p50 {ratios['p50_vs_raw_aio']:.2f}x raw-aio, the same event loop's floor)"
    if name == "goplug-aio-64B-8" and "calls_vs_raw_aio" in ratios:
        return f"(calls/s {ratios['calls_vs_raw_aio']:.2f}x raw-aio)"
    if name == "goplug-launch-cold-start":
        parts = ["p50/p99 = launch() -> handle"]
        if "p50_vs_cold_start" in ratios:
            parts.append(
                f"{ratios['p50_vs_cold_start']:.2f}x goplug-cold-start p50; launch -> first "
                f"answer {ratios['answer_vs_cold_start']:.2f}x"
            )
        else:
            parts.append("goplug-cold-start not measured: no ratio")
        return "(" + "; ".join(parts) + ")"
    if name.startswith("goplug-launch-flood"):
        parts = [f"p50/p99 during {fmt(row.get('flood_log_mb'), 0)} MB of logs"]
        if "p50_vs_quiet" in ratios:
            parts.append(
                f"{ratios['p50_vs_quiet']:.2f}x/{ratios['p99_vs_quiet']:.2f}x quiet "
                f"p50/p99 ({fmt(row.get('quiet_p50_us'))}/{fmt(row.get('quiet_p99_us'))} µs)"
            )
        if "p50_vs_applog" in ratios:
            parts.append(
                f"{ratios['p50_vs_applog']:.2f}x/{ratios['p99_vs_applog']:.2f}x p50/p99 while "
                f"the app logs the lines itself ({fmt(row.get('applog_p50_us'))}/"
                f"{fmt(row.get('applog_p99_us'))} µs = {ratios['applog_p50_vs_quiet']:.2f}x "
                "quiet p50)"
            )
        parts.append(
            f"absorbs {fmt(row.get('lines_per_s'), 0)} lines/s = "
            f"{fmt(row.get('log_mb_per_s'))} MB/s ({fmt(row.get('flood_log_mb_per_s'))} "
            "during calls)"
        )
        if row.get("pump_us_per_line") is not None:
            parts.append(
                f"pump+handler {fmt(row['pump_us_per_line'])} µs/line = "
                f"{fmt(row.get('pump_cpu_s_per_mb'), 2)} CPU s/MB; "
                f"{fmt(row.get('direct_log_us_per_line'))} µs when the app logs it itself"
            )
        return "(" + "; ".join(parts) + ")"
    return ""


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "cpu_count": os.cpu_count(),
        "cpus_allowed": sorted(os.sched_getaffinity(0)),
        "pinned_core": None if args.no_pin else args.core,
        "quick": args.quick,
        "repetitions": args.reps,
        "aio_loop": args.aio_loop,
    }
    try:
        with open("/proc/cpuinfo") as f:
            models = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu_model"] = models[0] if models else None
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    for mod in ("goplug", "grpc", "uvloop"):
        try:
            info[f"{mod}_version"] = getattr(importlib.import_module(mod), "__version__", "?")
        except Exception:
            info[f"{mod}_version"] = None
    node = shutil.which("node")
    if node:
        try:
            info["node_version"] = subprocess.run(
                [node, "--version"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["node_version"] = None
    return info


def parse_args(argv: list[str]) -> argparse.Namespace:
    default_loop = "asyncio"  # the loop users get by default; --aio-loop uvloop to compare
    p = argparse.ArgumentParser(description="goplug benchmark suite (see benchmarks/README.md)")
    p.add_argument("--quick", action="store_true", help="short loops; whole run under 60 s")
    p.add_argument(
        "--only",
        help="comma-separated groups (reference, goplug, aio, node, launch), "
        "row names, name prefixes or globs",
    )
    p.add_argument("--reps", type=int, default=2, help="runs of each row (default 2, minimum 2)")
    p.add_argument("--core", type=int, default=None, help="core for pinned rows (default: first)")
    p.add_argument("--no-pin", action="store_true", help="run every row unpinned")
    p.add_argument(
        "--aio-loop",
        choices=("asyncio", "uvloop"),
        default=default_loop,
        help=f"event loop of the goplug-aio rows (default {default_loop})",
    )
    p.add_argument(
        "--out", default=DEFAULT_OUT, help="results file (default benchmarks/results.json)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole run; rows left when it runs out are skipped "
        "(default 55 with --quick, 570 otherwise)",
    )
    p.add_argument(
        "--no-retry-busy",
        dest="retry_busy",
        action="store_false",
        help="do not run again the runs that other processes disturbed (full runs only)",
    )
    p.add_argument("--list", action="store_true", help="print the row names and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="print failing rows' tracebacks")
    p.add_argument("--certs", help=argparse.SUPPRESS)  # the run's TLS certificates (a dir)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--worker-reps", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.core is None:
        args.core = default_core()
    if args.budget is None:
        args.budget = 55.0 if args.quick else 570.0
    if args.reps < 2 and not args.worker:
        p.error("--reps must be at least 2 (each configuration runs at least twice)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    specs = select_rows(all_rows(), args.only)
    left_out = 0
    if args.quick:
        left_out = sum(1 for s in specs if s.name not in QUICK_ROWS)
        specs = [s for s in specs if s.name in QUICK_ROWS]
    if args.list:
        for s in specs:
            print(s.name)
        return 0
    if not specs:
        quick = " with --quick" if args.quick else ""
        print(f"no row matches --only {args.only!r}{quick}", file=sys.stderr)
        return 2
    # One set of certificates for every TLS row of the run, removed when the run ends.
    certs_made = None
    if not args.certs and any(s.module in ("tls_rows", "etcd_rows") for s in specs):
        from common import Skip, write_certs

        certs_made = tempfile.mkdtemp(prefix="gpb-certs-")
        try:
            write_certs(certs_made)
            args.certs = certs_made
        except Skip as exc:
            print(f"no certificates for the TLS rows: {exc}", file=sys.stderr)
    try:
        return run(args, specs, left_out)
    finally:
        if certs_made:
            shutil.rmtree(certs_made, ignore_errors=True)


def run(args: argparse.Namespace, specs: list[RowSpec], left_out: int) -> int:
    """Run the rows, print the table, write results.json."""
    started = time.monotonic()
    load_before = os.getloadavg()
    blocked = preflight(specs)
    for group, reason in sorted(blocked.items()):
        if any(s.group == group for s in specs):
            print(f"skipping {group} rows: {reason}", file=sys.stderr)
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in specs}
    failures: dict[str, list[str]] = {s.name: [] for s in specs}
    for s in specs:
        if s.group in blocked:
            failures[s.name].append(blocked[s.group])
    # Full runs interleave the repetitions (every row once, then every row again) so drift hits
    # all rows alike; --quick runs a row's repetitions in one worker to save its start-up.
    if args.quick:
        # Rows that carry a target, and the rows they are compared with, come first: if the
        # budget runs out on a busy machine, what is lost is the rest.
        needed = {t.row for t in TARGETS} | {t.ref for t in TARGETS if t.ref}
        plan = []
        for s in sorted(specs, key=lambda s: s.name not in needed):
            plan += [(s, 1)] * args.reps if s.fresh_process else [(s, args.reps)]
    else:
        plan = [(s, 1) for _ in range(args.reps) for s in specs]
    plan = [(s, n) for s, n in plan if not failures[s.name]]
    took: dict[str, float] = {}

    def execute(spec: RowSpec, reps: int, label: str) -> None:
        left = args.budget - (time.monotonic() - started)
        if left < 3:
            failures[spec.name].append("time budget of the run exhausted")
            return
        timeout = min(row_timeout(spec, args.quick) * reps, left)
        results, reason, secs = run_worker(spec, args, reps, timeout)
        took[spec.name] = secs
        runs[spec.name] += results
        if reason:
            failures[spec.name].append(reason)
        status = f"FAILED: {reason}" if reason else "ok"
        print(f"{label} {spec.name} x{reps}: {secs:.1f} s {status}", file=sys.stderr)

    for i, (spec, reps) in enumerate(plan, 1):
        if not failures[spec.name]:  # a row that failed once is not run again
            execute(spec, reps, f"[{i}/{len(plan)}]")
    if args.retry_busy and not args.quick:
        # Runs disturbed by other processes (see other_cpu_since) are run again, while the
        # budget lasts, until each row has --reps undisturbed runs or --reps extra runs.
        for _ in range(args.reps):
            for spec in specs:
                if failures[spec.name] or len(quiet_runs(runs[spec.name])) >= args.reps:
                    continue
                left = args.budget - (time.monotonic() - started)
                if left - 2 * took.get(spec.name, 10.0) > 10:
                    execute(spec, 1, "[again: other load]")
    rows = {s.name: aggregate(s, runs[s.name], failures[s.name], args.reps) for s in specs}
    add_ratios(rows, specs)
    add_same_run_ratios(rows)
    targets = [evaluate(t, rows) for t in TARGETS if t.row in rows]
    for t in targets:
        rows[t["row"]].setdefault("targets", []).append(
            {k: t[k] for k in ("what", "value", "limit", "status")}
        )
    results = [rows[s.name] for s in specs]
    print_table(results, targets, args.core, args.reps, args.no_pin)
    if left_out:
        print(f"--quick: {left_out} rows of the full run left out (run without --quick for all)")
    machine = machine_info(args)
    machine["loadavg_before"] = [round(x, 2) for x in load_before]
    machine["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    doc = {
        "machine": machine,
        "rows": results,
        "targets": targets,
        "wall_s": round(time.monotonic() - started, 1),
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(f"wrote {os.path.relpath(args.out)} in {doc['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
