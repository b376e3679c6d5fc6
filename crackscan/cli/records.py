"""Commands that read or maintain the crack records: runs, query, compare, report, db."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from crackscan.cli.common import (
    UserError,
    add,
    db_flag,
    print_json,
    read_database,
)

log = logging.getLogger("crackscan")

# management.store.VERDICT_FILTERS (a test keeps them equal; the CLI imports management lazily)
VERDICT_FILTERS = ("confirmed", "rejected", "site_visit", "unreviewed", "any")


def cmd_runs(args) -> int:
    from management.db import session_factory
    from management.formats import render
    from management.store import list_runs

    engine = read_database(args.db)
    with session_factory(engine)() as session:
        runs = list_runs(session)
    print(render(runs, args.format))
    return 0


# query flags that filter or shape cracks only: lining features have no width, type or
# severity, and are listed merged (physical) only
CRACK_ONLY_FLAGS = (("--detections", "detections"), ("--min-width-mm", "min_width_mm"),
                    ("--type", "type"), ("--severity", "severity"), ("--verdict", "verdict"))


def cmd_query(args) -> int:
    from management.db import session_factory
    from management.formats import render
    from management.store import parse_chainage, query_cracks, query_features, query_physical

    if args.features:
        given = [flag for flag, name in CRACK_ONLY_FLAGS  # "--min-width-mm 0" is given too
                 if getattr(args, name) is not None and getattr(args, name) is not False]
        if given:
            raise UserError(f"--features cannot be combined with {', '.join(given)}: lining "
                            "features take --run, --kind, --chainage, --min-length-mm, --tunnel, "
                            "--sort and --limit")
    elif args.kind is not None:
        raise UserError("--kind filters lining features: add --features")
    elif args.detections and args.verdict is not None:
        raise UserError("--verdict filters physical cracks (an inspector reviews those): "
                        "drop --detections")
    chainage = parse_chainage(args.chainage) if args.chainage else None
    engine = read_database(args.db)
    with session_factory(engine)() as session:
        if args.features:
            records = query_features(session, run=args.run, kind=args.kind,
                                     min_length_mm=args.min_length_mm, chainage=chainage,
                                     sort=args.sort, limit=args.limit, tunnel=args.tunnel)
        else:
            query = query_cracks if args.detections else query_physical
            verdict = {} if args.detections else {"verdict": args.verdict}
            records = query(session, run=args.run, min_width_mm=args.min_width_mm,
                            min_length_mm=args.min_length_mm, chainage=chainage,
                            crack_type=args.type, severity=args.severity, sort=args.sort,
                            limit=args.limit, tunnel=args.tunnel, **verdict)
    print(render(records, args.format))
    return 0


def cmd_compare(args) -> int:
    import math

    from management.compare import CHANGE_COLUMNS, change_rows
    from management.db import session_factory
    from management.errors import RunNotFound
    from management.formats import render
    from management.inspections import compare_inspections
    from management.store import QueryError

    if not math.isfinite(args.offset_m):
        raise UserError(f"--offset-m must be a finite number, got {args.offset_m!r}")
    engine = read_database(args.db)
    with session_factory(engine)() as session:
        try:
            report = compare_inspections(session, args.run_a, args.run_b,
                                         tolerance_mm=args.tolerance_mm, align=args.align,
                                         offset_m=args.offset_m)
        except RunNotFound as exc:
            raise UserError(str(exc)) from None
        except QueryError as exc:  # name the flags, not the parameters
            raise UserError(str(exc).replace("tolerance_mm", "--tolerance-mm")
                            .replace("offset_m", "--offset-m")) from None
    alignment = report["alignment"] if report["alignment"]["method"] == "joints" else None
    if args.format == "json":
        print_json(report)
        return 0
    rows = change_rows(report)
    if args.format == "table":
        s = report["summary"]
        aligned = (f"offset {args.offset_m:g} m" if alignment is None else
                   f"aligned on {alignment['joints_matched']} ring joints, scale "
                   f"{alignment['scale']:.4f}, rms {alignment['rms_m']:.3f} m")
        print(f"{args.run_a} -> {args.run_b}: {s['before']} cracks before, {s['after']} after; "
              f"{s['matched']} matched ({s['grown']} grown), {s['new']} new, {s['gone']} gone "
              f"(tolerance {args.tolerance_mm:g} mm, {aligned})")
        if not rows:
            return 0
    print(render(rows, args.format, columns=CHANGE_COLUMNS), end="")
    return 0


def cmd_report(args) -> int:
    from management.db import session_factory
    from management.errors import RunNotFound
    from management.report import build_report

    engine = read_database(args.db)
    with session_factory(engine)() as session:
        try:
            report = build_report(session, args.run, Path(args.out), section_m=args.section_m,
                                  largest=args.largest)
        except RunNotFound:
            raise UserError(f"no run {args.run!r} in the database; list the runs with "
                            "`crackscan runs`") from None
    print(f"report of run {report['run']}: {report['cracks']} physical cracks (from "
          f"{report['detections']} detections) -> {report['path']}")
    return 0


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def cmd_serve(args) -> int:
    import uvicorn

    from management.web.app import Tokens, create_app, read_token_file

    tokens = read_token_file(Path(args.token_file)) if args.token_file else Tokens()
    if args.host not in LOOPBACK and not tokens.required:
        raise UserError(f"--host {args.host} serves the crack records beyond this machine: give "
                        "--token-file (lines 'read TOKEN' / 'review TOKEN'), or bind 127.0.0.1")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1..65535, got {args.port}")
    engine = read_database(args.db)
    app = create_app(engine, tokens)
    log.info("serving the crack records of %s at http://%s:%d/ (%s)", engine.url.render_as_string(
        hide_password=True), args.host, args.port,
        "token needed" if tokens.required else "open: loopback only")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            access_log=False, server_header=False)
    server = uvicorn.Server(config)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn stops gracefully, then raises the signal again
        pass
    if not server.started:
        raise UserError(f"cannot serve at {args.host}:{args.port} (is the port in use?)")
    log.info("stopped serving")
    return 0


def cmd_db(args) -> int:
    from management import schema
    from management.db import make_engine, resolve_url

    # Not the schema check of every other command: this is the command that fixes the schema.
    if args.action == "merge":
        return _merge_runs(args)
    engine = make_engine(resolve_url(args.db), check_schema=False,
                         create=args.action == "upgrade")
    try:
        before = schema.current_revision(engine)
        if args.action == "current":
            print(before or "none")
            return 0
        after = schema.upgrade(engine)
    finally:
        engine.dispose()
    shown = engine.url.render_as_string(hide_password=True)
    print(f"database {shown}: schema {after} "
          + ("(already)" if after == before else f"(was {before or 'none'})"))
    return 0


def _merge_runs(args) -> int:
    """``crackscan db merge``: (re)build physical cracks of one run or of every run."""
    from management.db import session_factory
    from management.store import list_runs, merge_run

    if not args.link_mm > 0:
        raise UserError(f"--link-mm must be > 0, got {args.link_mm}")
    engine = read_database(args.db)
    sessions = session_factory(engine)
    with sessions() as session:
        runs = [args.run] if args.run else [run["id"] for run in list_runs(session)]
    for run_id in runs:
        with sessions.begin() as session:
            count = merge_run(session, run_id, args.link_mm)
        print(f"run {run_id}: {count} physical cracks")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = add(sub, "runs", cmd_runs, "list inspection runs")
    db_flag(p)
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")

    p = add(sub, "query", cmd_query, "query physical cracks (or, with --detections, the per-frame "
            "records; with --features, the lining features)")
    db_flag(p)
    p.add_argument("--run")
    p.add_argument("--detections", action="store_true",
                   help="the per-frame detections instead of the physical cracks merged from them")
    p.add_argument("--features", action="store_true",
                   help="the physical lining features (joints, stains, holes... of a multi-class "
                        "model) instead of cracks")
    p.add_argument("--kind", help="with --features: features of this kind (a class name of the "
                   "model, e.g. joint)")
    p.add_argument("--min-width-mm", type=float, help="maximum width at least this")
    p.add_argument("--min-length-mm", type=float)
    p.add_argument("--chainage", metavar="A:B", help="chainage range in metres")
    p.add_argument("--type", choices=["longitudinal", "circumferential", "diagonal", "network"])
    p.add_argument("--severity", help="a severity class name (config severity.names)")
    p.add_argument("--tunnel", help="the runs of this tunnel (run --tunnel)")
    p.add_argument("--verdict", choices=VERDICT_FILTERS,
                   help="physical cracks with this inspector's verdict (`serve` reviews them); "
                        "default: all but those rejected")
    p.add_argument("--sort", default="chainage_m",
                   help="chainage_m (default), length_mm, width_max_mm, width_mean_mm or arc_mm "
                        "(--features: chainage_m, length_mm, area_mm2 or arc_mm); a leading '-' "
                        "sorts largest first, e.g. --sort=-width_max_mm")
    p.add_argument("--limit", type=int)
    p.add_argument("--format", choices=["table", "csv", "json", "geojson"], default="table")

    p = add(sub, "compare", cmd_compare, "compare two inspections of one tunnel: new cracks, "
            "growth in length and width, cracks no longer seen")
    p.add_argument("run_a", metavar="RUN_A", help="the earlier inspection's run id")
    p.add_argument("run_b", metavar="RUN_B", help="the later inspection's run id")
    db_flag(p)
    p.add_argument("--tolerance-mm", type=float, default=50.0,
                   help="cracks of the two runs this close (over at least half of the shorter "
                        "one) are one crack")
    p.add_argument("--align", choices=["joints", "offset"],
                   help="how RUN_B's chainages are brought into RUN_A's: joints: piecewise "
                        "linearly between the ring joints both runs saw (undoes odometer scale "
                        "and drift); offset: add --offset-m. Default: joints where both runs "
                        "have at least 5 ring joints stored, else offset")
    p.add_argument("--offset-m", type=float, default=0.0,
                   help="added to RUN_B's chainages first (odometer offset between the drives); "
                        "with --align joints, roughly that offset at RUN_B's first joint (picks "
                        "between alignments a whole ring apart)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table",
                   help="table: a summary line and the changes; csv: one row per change; json: "
                        "the whole report")

    p = add(sub, "report", cmd_report, "write one run's inspection report as one HTML file: crack "
            "map, statistics per chainage section, the largest cracks")
    p.add_argument("--run", required=True, help="the run's id (see `crackscan runs`)")
    p.add_argument("--out", required=True, metavar="FILE.html", help="the HTML file to write")
    db_flag(p)
    p.add_argument("--section-m", type=float, default=10.0,
                   help="length of the chainage sections of the statistics table (m)")
    p.add_argument("--largest", type=int, default=10,
                   help="how many of the largest cracks to list with their mask crops")

    p = add(sub, "serve", cmd_serve, "serve the crack records as a web application: tunnels and "
            "inspections, the lining map, each crack's photos and history, comparison, "
            "inspectors' review, exports (docs/web.md)")
    db_flag(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other needs --token-file)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--token-file", metavar="FILE",
                   help="lines 'read TOKEN' / 'review TOKEN': every request then needs one "
                        "(reading, or reading and reviewing)")

    p = add(sub, "db", cmd_db, "show or upgrade the database schema (back the database up before "
            "an upgrade)")
    p.add_argument("action", choices=["upgrade", "current", "merge"],
                   help="upgrade: migrate the database to this crackscan's schema; merge: "
                        "rebuild physical cracks from the detections (--run, --link-mm); "
                        "current: print the database's schema revision ('none': empty, or from "
                        "before migrations)")
    db_flag(p)
    p.add_argument("--run", help="merge: this run only (default: every run)")
    p.add_argument("--link-mm", type=float, default=10.0,
                   help="merge: detections of different frames this close are one crack")
