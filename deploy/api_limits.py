"""How much the control API takes on at once, and where each number comes from.

Ray Serve's request limits of the MaskletAPI deployment (max_ongoing_requests, max_queued_requests)
are set in one place, the deployment's entry in deploy/serve_config.yaml: `serve deploy` applies
them from there, `masklet serve` reads them from there (`deployment_limits`), and
deploy/rayservice.yaml embeds the same applications. Beyond both, Serve answers 503 itself.

Inside the replica the app answers 503 + Retry-After itself (`in_flight_cap`): past
limits.max_in_flight_requests ordinary requests, and past limits.max_event_streams SSE feeds.
max_ongoing_requests is set far above their sum, so a burst reaches the app (which answers it in
milliseconds) instead of Serve's backpressure, whose 503 through the proxy carries no Retry-After
and which would refuse /health/live too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from masklet.pipeline.config import LimitsSettings

SERVE_CONFIG = Path(__file__).resolve().parent / "serve_config.yaml"
# Serve request slots that neither ordinary requests nor SSE feeds may take: /health/live answers.
HEALTH_REQUEST_RESERVE = 8


def settings_from_options(options: dict) -> Any:
    """The MaskletSettings of a deployment: its `config` file (or MASKLET_CONFIG), MASKLET_* env vars,
    and a `limits` mapping in the options (the Serve config's `args.limits`) over both."""
    from masklet.pipeline.config import load_settings

    overrides = {"limits": dict(options["limits"])} if options.get("limits") else {}
    return load_settings(options.get("config"), **overrides)


def deployment_limits(serve_config: Path = SERVE_CONFIG) -> dict:
    """Ray Serve's request limits of the MaskletAPI deployment, from the one place they are set: the
    deployment's entry in deploy/serve_config.yaml (`serve deploy` reads it there; `masklet serve`
    reads it here; deploy/rayservice.yaml embeds the same applications)."""
    import yaml

    try:
        config = yaml.safe_load(serve_config.read_text(encoding="utf-8"))
        [entry] = [d for a in config["applications"] for d in a.get("deployments", ()) if d.get("name") == "MaskletAPI"]
        limits = {key: int(entry[key]) for key in ("max_ongoing_requests", "max_queued_requests")}
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{serve_config}: no MaskletAPI max_ongoing_requests/max_queued_requests "
                         f"({type(exc).__name__}: {exc})") from None
    in_flight_cap(limits["max_ongoing_requests"], LimitsSettings())  # the default limits fit, or one line
    return limits


def in_flight_cap(max_ongoing_requests: int, limits: LimitsSettings) -> int:
    """The app's own cap on ordinary requests (limits.max_in_flight_requests), checked to fit inside
    Serve's max_ongoing_requests together with the SSE feeds and the /health reserve: the app then
    answers 503 + Retry-After itself long before Serve's proxy would (its 503 has no Retry-After)."""
    needed = limits.max_in_flight_requests + limits.max_event_streams + HEALTH_REQUEST_RESERVE
    if max_ongoing_requests < needed:
        raise ValueError(f"max_ongoing_requests ({max_ongoing_requests}) must be at least "
                         f"limits.max_in_flight_requests ({limits.max_in_flight_requests}) + limits.max_event_streams "
                         f"({limits.max_event_streams}) + {HEALTH_REQUEST_RESERVE} (kept for /health/*)")
    return limits.max_in_flight_requests


def replica_max_ongoing_requests() -> int:
    """The running replica's max_ongoing_requests (a config file may have changed it), else the YAML's."""
    try:
        from ray import serve

        return int(serve.get_replica_context()._deployment_config.max_ongoing_requests)
    except Exception:  # noqa: BLE001 - outside a replica, or another Ray version: the packaged value
        return deployment_limits()["max_ongoing_requests"]
