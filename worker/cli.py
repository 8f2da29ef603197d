"""The `segment-worker` commands: parse arguments, build, run. No logic of its own."""

from __future__ import annotations

import csv
import logging
import signal
import sys
import threading
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import orjson
import typer
from pythonjsonlogger.json import JsonFormatter
from rich.console import Console
from rich.table import Table

from config.settings import Settings, SettingsError, load_settings
from schemas.reader import SegmentReader
from worker.generator import DRIFTS, SHOP_EVENTS, SHOP_USERS, STARTS, Drift, iso
from worker.metrics import Metrics

app = typer.Typer(
    help="Streaming customer segmentation: Kafka events -> profiles -> River segments -> Redis.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True, soft_wrap=True)  # whole lines, so they can be grepped

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="YAML settings file (also SEGMENT_CONFIG).", dir_okay=False
    ),
]


EmbeddedOption = Annotated[
    bool,
    typer.Option(
        "--embedded/--given",
        help="Embedded Tansu and redis-server, or the broker and Redis of the settings.",
    ),
]


JsonOption = Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")]


def _within_timeline(value: float) -> float:
    if not 0 < value < 1:
        raise typer.BadParameter(f"{value} is not within the timeline: a fraction between 0 and 1")
    return value


DriftOption = Annotated[
    list[Drift] | None,
    typer.Option(
        help="A drift of the schedule, repeatable: sale, new_persona (default: both).",
        show_default=False,
    ),
]
StationaryOption = Annotated[bool, typer.Option("--stationary", help="No drift at all.")]
SaleAtOption = Annotated[
    float,
    typer.Option(
        callback=_within_timeline, help="When the sale starts, as a fraction of the timeline."
    ),
]
NewPersonaAtOption = Annotated[
    float,
    typer.Option(
        callback=_within_timeline,
        help="When the new persona arrives, as a fraction of the timeline.",
    ),
]


def _schedule(
    drift: list[Drift] | None, stationary: bool, sale_at: float, new_persona_at: float
) -> tuple[tuple[str, ...], dict[str, float]]:
    """The drift schedule the options ask for: the drifts, and when each starts."""
    if stationary and drift:
        raise typer.BadParameter("a stationary shop has no drift", param_hint="--drift")
    drifts = () if stationary else tuple(drift or DRIFTS)
    return drifts, {Drift.sale: sale_at, Drift.new_persona: new_persona_at}


LogFormatOption = Annotated[
    str | None,
    typer.Option(
        "--log-format", help="text or json (also SEGMENT_WORKER_LOG_FORMAT).", show_default=False
    ),
]


def _settings(config: Path | None, log_format: str | None = None) -> Settings:
    overrides = {"worker": {"log_format": log_format}} if log_format else {}
    try:
        settings = load_settings(config, **overrides)
    except SettingsError as exc:
        errors.print(f"[red]configuration error[/]\n{exc}")
        raise typer.Exit(2) from None
    handler = logging.StreamHandler(sys.stderr)
    if settings.worker.log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.worker.log_level, handlers=[handler], force=True)
    logging.getLogger("kafka").setLevel(logging.ERROR)
    logging.getLogger("kafka.net.transport").addFilter(_read_after_close)
    return settings


def _read_after_close(record: logging.LogRecord) -> bool:
    """Drop kafka-python 3.0's traceback for a read that races a close.

    When a client closes a connection while its network thread is between "readable" and
    `recv`, the socket is already None and the read logs an AttributeError at ERROR. The
    connection is closing anyway, so it is noise on a clean shutdown, not a fault; every
    other transport error still shows.
    """
    return not (record.exc_info and isinstance(record.exc_info[1], AttributeError))


@app.command()
def run(
    config: ConfigOption = None,
    log_format: LogFormatOption = None,
    stop_after_idle: Annotated[
        float | None,
        typer.Option(
            help="Exit 0 once no event arrived for this many seconds and all is committed."
        ),
    ] = None,
) -> None:
    """Run the worker: join the consumer group and serve until SIGTERM."""
    from worker.app import Worker, settled_gc
    from worker.retry import Permanent

    settings = _settings(config, log_format)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():  # a second signal: the operator means it
            logging.getLogger(__name__).error("second signal; exiting without draining")
            raise SystemExit(1)
        logging.getLogger(__name__).info("signal %d: draining, committing, checkpointing", signum)
        stop.set()
        grace = threading.Timer(settings.worker.shutdown_grace_s, lambda: _force_exit(settings))
        grace.daemon = True
        grace.start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        with settled_gc():
            Worker(settings, Metrics(), stop).run(stop_after_idle=stop_after_idle)
    except Permanent as exc:
        errors.print(f"[red]cannot run[/]: {exc}")
        raise typer.Exit(2) from None


def _force_exit(settings: Settings) -> None:
    import os

    logging.getLogger(__name__).error(
        "shutdown took longer than worker.shutdown_grace_s=%.0fs; exiting; uncommitted "
        "events will be replayed",
        settings.worker.shutdown_grace_s,
    )
    os._exit(1)


@app.command()
def generate(
    users: Annotated[int, typer.Option(min=1, help="Distinct shoppers.")] = 5000,
    events: Annotated[int, typer.Option(min=1, help="Events in all.")] = 50_000,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same events.")] = 7,
    out: Annotated[Path | None, typer.Option(help="Write the events to this JSONL file.")] = None,
    kafka: Annotated[bool, typer.Option("--kafka", help="Produce to the input topics.")] = False,
    partitions: Annotated[int, typer.Option(help="Partitions of topics created by --kafka.")] = 4,
    truth: Annotated[Path | None, typer.Option(help="Write user_id,persona CSV here.")] = None,
    onsets: Annotated[
        Path | None,
        typer.Option(help="Write when each scheduled drift starts here (JSON).", dir_okay=False),
    ] = None,
    drift: DriftOption = None,
    stationary: StationaryOption = False,
    sale_at: SaleAtOption = STARTS[Drift.sale],
    new_persona_at: NewPersonaAtOption = STARTS[Drift.new_persona],
    config: ConfigOption = None,
) -> None:
    """Generate a synthetic shop's events (5+ personas, a drift schedule), to a file or
    to Kafka, with its ground truth: each user's persona and when each drift starts."""
    from worker.generator import generate as generate_shop
    from worker.replay import produce
    from worker.source import ensure_topics

    if not (out or kafka):
        errors.print("[red]give --out FILE.jsonl, --kafka, or both[/]")
        raise typer.Exit(2)
    drifts, starts = _schedule(drift, stationary, sale_at, new_persona_at)
    settings = _settings(config)
    shop = generate_shop(users, events, seed, drifts, starts)
    if out:
        with out.open("wb") as f:
            for event in shop.events:
                f.write(orjson.dumps(event) + b"\n")
        console.print(f"wrote {len(shop.events):,} events to {out}")
    if kafka:
        ensure_topics(settings.kafka, partitions)
        sent = produce(shop.events, settings)
        console.print(f"produced {sent:,} events to {settings.kafka.bootstrap_servers}")
    if truth:
        with truth.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["user_id", "persona"])
            writer.writerows(sorted(shop.truth.items()))
        console.print(f"wrote the personas of {len(shop.truth):,} users to {truth}")
    for name, at in shop.drifts.items():
        console.print(f"{name} starts at {iso(at)} ({at} ms)")
    if onsets:
        onsets.write_bytes(
            orjson.dumps(
                {name: {"timestamp": at, "time": iso(at)} for name, at in shop.drifts.items()},
                option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE,
            )
        )
        console.print(f"wrote the drifts' starts to {onsets}")


@app.command()
def demo(
    duration: Annotated[float, typer.Option(min=5, help="Seconds before the demo ends.")] = 60,
    users: Annotated[int, typer.Option(min=50, help="Distinct shoppers.")] = 3000,
    rate: Annotated[float, typer.Option(min=10, help="Events per second produced.")] = 1500,
    config: ConfigOption = None,
) -> None:
    """The whole pipeline embedded (broker, Redis, generator, worker) with a live table."""
    from worker.demo import run_demo

    settings = _settings(config)
    logging.getLogger().setLevel(logging.WARNING)  # the live table is the output
    _interruptible()  # SIGTERM ends it as Ctrl-C does: the worker drains, a summary follows
    run_demo(settings, duration, users, rate, console)


@app.command()
def segments(config: ConfigOption = None) -> None:
    """Print the live segments stored in Redis."""
    from worker.demo import segment_table

    settings = _settings(config)
    console.print(segment_table(_reader(settings), "Segments"))


@app.command()
def inspect(user_id: str, config: ConfigOption = None) -> None:
    """Print one user's segment as other services read it."""
    settings = _settings(config)
    user = _reader(settings).get(user_id)
    if user is None:
        console.print(f"no segment stored for {user_id!r}")
        raise typer.Exit(1)
    table = Table(title=f"seg:user:{user_id}", show_header=False)
    for field, value in user.model_dump().items():
        table.add_row(field, str(value))
    console.print(table)


@app.command()
def explain(user_id: str, config: ConfigOption = None) -> None:
    """Why a user is in their segment: profile, distances, and the features that decide."""
    from schemas.records import RedisKeys
    from worker.features import FeatureExtractor
    from worker.model import SegmentModel
    from worker.profiles import Profile
    from worker.sink import connect

    settings = _settings(config)
    client, keys = connect(settings.redis), RedisKeys(settings.redis.key_prefix)
    blob, state = client.get(keys.profile(user_id)), client.hget(keys.model, "state")
    if blob is None:
        errors.print(f"no profile stored for {user_id!r}")
        raise typer.Exit(1)
    if state is None:
        errors.print("no model published yet")
        raise typer.Exit(1)
    try:
        model = SegmentModel.from_state(settings.model, orjson.loads(state), learning=False)
    except (ValueError, KeyError, TypeError) as exc:
        errors.print(f"the published model cannot be read with these settings: {exc}")
        raise typer.Exit(1) from None
    profile = Profile.decode(user_id, blob)
    assignment, distances, pulls = model.explain(FeatureExtractor(settings.profile)(profile))
    by_id = {s.id: s for s in model.segments.values()}
    console.print(
        f"[bold]{user_id}[/] → [bold]{assignment.segment}[/] {assignment.name!r} "
        f"(model v{model.version} revision {model.revision}; stored: {profile.segment})\n"
        f"{by_id[assignment.segment].description}",
        soft_wrap=True,  # whole lines, so they can be grepped
    )
    facts = Table(title="profile", show_header=False)
    for name in ("orders", "monetary", "sessions", "last_ts", "last_purchase_ts"):
        facts.add_row(name, str(getattr(profile, name)))
    facts.add_row("counts", ", ".join(f"{k} {v:.2f}" for k, v in sorted(profile.counts.items())))
    facts.add_row("top categories", ", ".join(c for c, _ in profile.top_categories(5)))
    console.print(facts)
    near = Table(title="distance to each segment (standardized units)")
    near.add_column("segment")
    near.add_column("name")
    near.add_column("distance", justify="right")
    for segment_id, distance in sorted(distances.items(), key=lambda kv: kv[1]):
        near.add_row(segment_id, by_id[segment_id].name, f"{distance:.3f}")
    console.print(near)
    why = Table(title=f"features: pull toward {assignment.segment} over the runner-up")
    for column in ("feature", "user", "segment centre", "population mean", "pull"):
        why.add_column(column, justify="left" if column == "feature" else "right")
    for p in pulls:
        why.add_row(
            p.feature,
            f"{p.value:.3f}",
            f"{p.segment_centre:.3f}",
            f"{p.population_mean:.3f}",
            f"{p.pull:+.3f}",
        )
    console.print(why)


def _reader(settings: Settings) -> SegmentReader:
    from worker.sink import connect

    return SegmentReader(connect(settings.redis), settings.redis.key_prefix)


@app.command()
def replay(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help=".jsonl or .csv, or .gz")
    ],
    topic: Annotated[str, typer.Option(help="Topic to send every valid row to.")],
    rate: Annotated[
        float | None, typer.Option(min=1, help="Events per second (default: max).")
    ] = None,
    map_: Annotated[
        list[str] | None,
        typer.Option("--map", help="CSV column=event field, repeatable (e.g. --map ts=timestamp)."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Backfill a file of events into Kafka, validating every row first."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from worker.replay import parse_mapping, produce, rows

    settings = _settings(config)
    try:
        mapping = parse_mapping(map_ or [])
        parsed = list(rows(file, mapping))
    except ValueError as exc:
        errors.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    valid = [row.event for row in parsed if row.event is not None]
    invalid = [row for row in parsed if row.event is None]
    for row in invalid[:50]:
        console.print(f"[yellow]line {row.line}[/]: {row.error}")
    if len(invalid) > 50:
        console.print(f"… and {len(invalid) - 50} more invalid rows")
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(f"replaying to {topic}", total=len(valid))
        sent = produce(
            valid,
            settings,
            topic=topic,
            rate=rate,
            on_sent=lambda n: progress.update(task, completed=n),
        )
    console.print(
        f"replayed {sent:,} of {len(parsed):,} rows from {file} to {topic}; "
        f"{len(invalid):,} invalid rows not sent"
    )


@app.command()
def bench(
    config: ConfigOption = None,
    events: Annotated[int, typer.Option(min=10_000, help="Events to pre-produce.")] = 500_000,
    users: Annotated[int, typer.Option(min=100, help="Distinct users among them.")] = 50_000,
    latency_seconds: Annotated[
        float, typer.Option(min=5, help="Length of the paced latency run.")
    ] = 30.0,
    latency_rate: Annotated[
        float | None,
        typer.Option(
            min=100, help="Events/s offered in the latency run (default: half the full speed)."
        ),
    ] = None,
    embedded: EmbeddedOption = True,
    as_json: JsonOption = False,
) -> None:
    """Measure throughput, latency, footprint, the batch alternative and scale-out."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from worker.bench import Bench, rows
    from worker.embedded import servers

    settings = _settings(config)
    _interruptible()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with (
        servers(settings, embedded) as (where, broker_pid, redis_pid),
        Progress(*columns, TimeElapsedColumn(), console=errors) as progress,
    ):
        bench = Bench(
            where, events, users, latency_seconds, progress, broker_pid, redis_pid, latency_rate
        )
        figures = bench.run()
    _report(figures, as_json, "segment-worker bench", rows(figures))


def _interruptible() -> None:
    """Ctrl-C and SIGTERM unwind the command, so that it stops what it started and deletes
    what it made, even when started with SIGINT ignored (as background jobs of a
    non-interactive shell are)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _report(
    figures: dict[str, Any], as_json: bool, title: str, rows: list[tuple[str, str, str]]
) -> None:
    """The figures as JSON on stdout, or as a (figure, measured, target) table."""
    if as_json:
        sys.stdout.write(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    table = Table(title=title)
    for column in ("figure", "measured", "target"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


@app.command()
def evaluate(
    config: ConfigOption = None,
    users: Annotated[int, typer.Option(min=100, help="Users in the generated shop.")] = SHOP_USERS,
    events: Annotated[int, typer.Option(min=10_000, help="Events they produce.")] = SHOP_EVENTS,
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 7,
    drift: DriftOption = None,
    stationary: StationaryOption = False,
    sale_at: SaleAtOption = STARTS[Drift.sale],
    new_persona_at: NewPersonaAtOption = STARTS[Drift.new_persona],
    embedded: EmbeddedOption = True,
    replay: Annotated[
        bool,
        typer.Option(
            "--replay",
            help="Through the profile and model code alone, no broker or Redis: "
            "deterministic and faster, for trying model changes.",
        ),
    ] = False,
    cut: Annotated[
        int | None,
        typer.Option(
            help="With --replay: cut the shop into batches as a worker's fetches might "
            "(partition runs, the shop 5,000 events ahead), reproducibly by this seed.",
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=4,
            help="Workers in the consumer group, at most one per partition (4): one "
            "model, the partitions shared, as scaled out. The pipeline only.",
        ),
    ] = 1,
    as_json: JsonOption = False,
) -> None:
    """Run a generated shop through the pipeline; score segments, stability and drift."""
    from worker.embedded import servers
    from worker.evaluate import Evaluation, rows

    if cut is not None and not replay:
        raise typer.BadParameter("a cut is a way of replaying: add --replay", param_hint="--cut")
    if workers > 1 and replay:
        raise typer.BadParameter("a replay has no workers: drop --replay", param_hint="--workers")
    drifts, starts = _schedule(drift, stationary, sale_at, new_persona_at)
    settings = _settings(config)
    if users < settings.model.warmup_users:
        raise typer.BadParameter(
            f"{users} users: the model seeds once it has seen model.warmup_users "
            f"({settings.model.warmup_users}), so no segment would be scored",
            param_hint="--users",
        )
    _interruptible()
    logging.getLogger("worker").setLevel(logging.WARNING)
    evaluation = partial(
        Evaluation, users=users, events=events, seed=seed, drifts=drifts, starts=starts
    )
    with console.status("generating and segmenting the shop"):
        if replay:
            figures = evaluation(settings, replay=True, cut=cut).run()
        else:
            with servers(settings, embedded) as (where, _, _):
                figures = evaluation(where, workers=workers).run()
    _report(figures, as_json, "segment-worker evaluate", rows(figures))
    if as_json:
        return
    segments = Table(title="segments: size and main persona")
    for column in ("segment", "users", "persona", "purity"):
        segments.add_column(column)
    for segment, info in figures["segments"].items():
        segments.add_row(segment, f"{info['users']:,}", info["persona"], f"{info['purity']:.0%}")
    console.print(segments)


@app.command("export-schemas")
def export_schemas(
    out: Annotated[Path | None, typer.Option(help="Directory (default: schemas/json).")] = None,
) -> None:
    """Write the JSON Schema of every event and record, for producers in other languages."""
    from schemas.jsonschema import SCHEMA_DIR, export

    for path in export(out or SCHEMA_DIR):
        console.print(f"wrote {path}")
