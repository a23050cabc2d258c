"""CLI commands of the Kafka path: `masklet broker`, `masklet ingest`, `masklet prompt`, `masklet run`.

`register(subparsers)` adds them to the main `masklet` parser; `python -m pipeline.kafka.cli`
runs them standalone. Every command but `broker` takes `--bootstrap-servers` (env
`MASKLET_KAFKA__BOOTSTRAP_SERVERS`) and `--config`, and uses the SASL/TLS settings from config.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from masklet.deploy.metrics_flags import add_metrics_arguments, start_metrics
from masklet.deploy.model_args import add_model_arguments
from masklet.deploy.signals import restore_ctrl_c

EXIT_OK, EXIT_ERROR, EXIT_GAVE_UP, EXIT_INCOMPLETE = 0, 1, 3, 4


def _pair(text: str) -> tuple[float, float]:
    try:
        x, y = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected x,y, got {text!r}") from None
    return x, y


def _box(text: str) -> tuple[float, float, float, float]:
    try:
        x0, y0, x1, y1 = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected x0,y0,x1,y1, got {text!r}") from None
    return x0, y0, x1, y1


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap-servers", help="host:port[,host:port] (default: config / "
                        "MASKLET_KAFKA__BOOTSTRAP_SERVERS / 127.0.0.1:9092)")
    parser.add_argument("--config", help="YAML config file (default: MASKLET_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show kafka client logs")


def _settings(args: argparse.Namespace):
    from masklet.pipeline.config import load_settings
    from masklet.pipeline.kafka.client import settings_from

    settings = load_settings(args.config)
    return settings, settings_from(args.bootstrap_servers, settings.kafka)


def _quiet_kafka_logs(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # kafka-python logs every dropped connection at ERROR; recovery is reported by our own warnings.
        logging.getLogger("kafka").setLevel(logging.CRITICAL)


def run_broker(args: argparse.Namespace) -> int:
    from masklet.pipeline.kafka.broker import serve_forever

    return serve_forever(args.host, args.port)


def run_ingest(args: argparse.Namespace) -> int:
    from masklet.monitoring.stats import Stats
    from masklet.pipeline.config import ConfigError
    from masklet.pipeline.kafka.ingest import ReconnectPolicy, ingest
    from masklet.actors.sources import SourceError

    _quiet_kafka_logs(args.verbose)
    stats, metrics = Stats(), None
    try:
        settings, kafka = _settings(args)
        metrics = start_metrics(args, stats.snapshot, "ingest")
        report = ingest(args.source, args.stream, kafka, realtime=args.realtime, max_frames=args.max_frames,
                        jpeg_quality=args.jpeg_quality, max_pixels=settings.pipeline.max_pixels,
                        reconnect=ReconnectPolicy(max_reconnects=args.max_reconnects), stats=stats)
    except (ConfigError, SourceError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if metrics is not None:
            metrics.close()
    print(report.summary())
    if report.gave_up:
        return EXIT_GAVE_UP
    return EXIT_OK if report.delivery.complete else EXIT_INCOMPLETE


def run_prompt(args: argparse.Namespace) -> int:
    from masklet.pipeline.config import ConfigError
    from masklet.pipeline.kafka.prompts import build_prompt, publish_prompt
    from masklet.actors.messages import MessageError

    _quiet_kafka_logs(args.verbose)
    try:
        _, kafka = _settings(args)
        prompt = build_prompt(args.stream, args.object, frame_idx=args.frame, points=args.point or (),
                              negative_points=args.negative_point or (), box=args.box,
                              remove=args.remove, refine=args.refine)
    except (ConfigError, MessageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    report = publish_prompt(prompt, kafka)
    if not report.complete:
        print(f"error: prompt not acknowledged: {report.summary()}", file=sys.stderr)
        return EXIT_INCOMPLETE
    print(prompt.to_json_bytes().decode())
    return EXIT_OK


def run_run(args: argparse.Namespace) -> int:
    """`masklet run`: until SIGINT/SIGTERM (or --idle-exit), then flush, commit and leave the group."""
    import signal
    import threading

    from masklet.model.checkpoints import CheckpointError
    from masklet.actors.backend import InProcessBackend, RayBackend
    from masklet.pipeline.config import ConfigError, load_settings
    from masklet.pipeline.configure import live_config, model_spec
    from masklet.pipeline.kafka.client import settings_from
    from masklet.pipeline.kafka.run import KafkaRunner
    from masklet.deploy.model_args import model_overrides
    from masklet.deploy.segment import RANDOM_WEIGHTS_WARNING

    _quiet_kafka_logs(args.verbose)
    try:
        settings = load_settings(args.config, model=model_overrides(args))
        kafka = settings_from(args.bootstrap_servers, settings.kafka)
        if args.group_id:
            kafka = kafka.model_copy(update={"group_id": args.group_id})
        if args.no_resume_objects:
            kafka = kafka.model_copy(update={"resume": kafka.resume.model_copy(update={"enabled": False})})
        ps = settings.pipeline
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if settings.model.checkpoint == "random":
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    try:
        model = model_spec(settings)
        config = live_config(settings, model, queue_capacity=args.queue_capacity,
                             ring_buffer_frames=args.ring_buffer_frames, max_streams=args.max_streams)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    backend = InProcessBackend() if (args.backend or ps.backend) == "inprocess" else RayBackend()
    # After the backend: ray.init installs its own SIGTERM handler, which would kill the driver
    # before it flushes, commits and leaves the group.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        runner = KafkaRunner(kafka, backend, model, config, overload=args.overload, max_pixels=ps.max_pixels)
        try:
            metrics = start_metrics(args, runner.stats_snapshot, "run")
        except OSError as exc:
            runner.close()
            print(f"error: metrics on {args.metrics_host}:{args.metrics_port}: {exc}", file=sys.stderr)
            return EXIT_ERROR
        print(f"masklet run: consuming {kafka.topics.frames} + {kafka.topics.prompts} as group "
              f"{kafka.group_id!r} on {kafka.bootstrap_servers}", file=sys.stderr, flush=True)
        try:
            report = runner.run(stop.is_set, idle_exit_s=args.idle_exit)
        finally:
            if metrics is not None:
                metrics.close()
    finally:
        backend.shutdown()
    print(report.summary(), flush=True)
    return EXIT_OK


def register(subparsers) -> None:
    broker = subparsers.add_parser("broker", help="start the embedded Kafka-compatible broker (memory-only, loopback)")
    broker.add_argument("--host", default="127.0.0.1")
    broker.add_argument("--port", type=int, default=9092)
    broker.set_defaults(func=run_broker)

    ingest = subparsers.add_parser("ingest", help="publish a video/RTSP/HTTP source to the frames topic")
    ingest.add_argument("source", help="video file, image folder, http(s):// or rtsp:// URL")
    ingest.add_argument("--stream", required=True, help="stream id (the record key)")
    ingest.add_argument("--realtime", action="store_true", help="pace frames by pts instead of as fast as possible")
    ingest.add_argument("--max-frames", type=_positive_int)
    ingest.add_argument("--jpeg-quality", type=int, default=90)
    ingest.add_argument("--max-reconnects", type=int, default=5, help="reconnect attempts in a row before giving up")
    add_metrics_arguments(ingest)
    _connection_args(ingest)
    ingest.set_defaults(func=run_ingest)

    prompt = subparsers.add_parser("prompt", help="publish a prompt/v1 message to the prompts topic")
    prompt.add_argument("--stream", required=True)
    prompt.add_argument("--object", type=int, required=True)
    prompt.add_argument("--frame", type=int, default=0)
    what = prompt.add_mutually_exclusive_group(required=True)
    what.add_argument("--point", type=_pair, action="append", help="positive click x,y (repeatable)")
    what.add_argument("--box", type=_box, help="x0,y0,x1,y1")
    what.add_argument("--remove", action="store_true", help="stop tracking the object")
    prompt.add_argument("--negative-point", type=_pair, action="append", help="negative click x,y (repeatable)")
    prompt.add_argument("--refine", action="store_true", help="correct the object's mask at --frame")
    _connection_args(prompt)
    prompt.set_defaults(func=run_prompt)

    run = subparsers.add_parser("run", help="consume frames + prompts, publish masklets (live streams)")
    add_model_arguments(run)
    run.add_argument("--group-id", help="consumer group (default: config kafka.group_id, 'masklet')")
    run.add_argument("--overload", default="drop", choices=("drop", "pause"),
                     help="drop: DROP_OLDEST per stream, drops reported in the next record (live); "
                          "pause: stop fetching until the stream has room, nothing dropped (archives)")
    run.add_argument("--queue-capacity", type=_positive_int, default=8, help="frames queued per stream")
    run.add_argument("--ring-buffer-frames", type=_positive_int, default=32, help="recent frames kept for late prompts")
    run.add_argument("--max-streams", type=_positive_int, default=16)
    run.add_argument("--no-resume-objects", action="store_true",
                     help="start every stream empty instead of re-adding the objects of its last record "
                          "(after a crash, restart or rebalance)")
    run.add_argument("--idle-exit", type=float, metavar="S", help="exit after S seconds without input or work")
    run.add_argument("--backend", choices=("ray", "inprocess"), help=argparse.SUPPRESS)
    add_metrics_arguments(run)
    _connection_args(run)
    run.set_defaults(func=run_run)


def main(argv: Optional[Sequence[str]] = None) -> int:
    restore_ctrl_c()
    parser = argparse.ArgumentParser(prog="masklet", description=__doc__.splitlines()[0])
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
