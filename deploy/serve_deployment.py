"""The control API's Ray Serve deployment: one MaskletAPI replica holds one LiveSession and serves
`deploy.serve_app.create_app` over it, with the health listener beside it.

    import_path: masklet.deploy.serve_deployment:app      (deploy/serve_config.yaml, `masklet serve`)
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

from fastapi import FastAPI

from masklet.deploy.api_limits import (deployment_limits, in_flight_cap, replica_max_ongoing_requests,
                                       settings_from_options)
from masklet.deploy.api_runtime import KafkaProbe, SessionSlot
from masklet.deploy.api_security import ApiLimits, generate_token
from masklet.deploy.health_listener import HealthService, Heartbeat
from masklet.deploy.serve_app import create_app
from masklet.deploy.serve_ingress import install_front_gate, reuse_address_in_replica

log = logging.getLogger(__name__)


def _serve_deployment() -> Any:
    from ray import serve

    @serve.deployment(name="MaskletAPI")
    @serve.ingress()
    class MaskletAPI:
        """One replica holds one LiveSession (model, batched encoder, trackers) and serves the API.

        `options` (the application's `args`): model, checkpoint, image_size, device, max_batch_size,
        max_wait_ms, kafka (bool), token, config (YAML path). `user_config` (live): max_streams,
        max_request_bytes. `health_host`/`health_port` (default serve.host/serve.health_port): where
        this replica's health listener binds (deploy/health_listener.py).
        """

        def __init__(self, options: Optional[dict] = None) -> None:
            # Serve starts this replica's direct-ingress HTTP server after the constructor returns
            reuse_address_in_replica()
            options = dict(options or {})
            self.settings = settings_from_options(options)
            options.pop("config", None)
            options.pop("limits", None)
            token = options.pop("token", None) or os.environ.get("MASKLET_API_TOKEN")
            if not token:
                token = generate_token()
                log.warning("MASKLET_API_TOKEN is not set; generated API token: %s", token)
            self.token = token
            serve_settings = self.settings.serve
            health_host = options.pop("health_host", None) or serve_settings.host
            health_port = options.pop("health_port", serve_settings.health_port)
            self.options = options
            self.limits: Optional[ApiLimits] = None
            self.slot = SessionSlot()
            self.heartbeat = Heartbeat()
            self.kafka = self.settings.kafka if options.get("kafka") else None
            # One Kafka reachability check (cached) for both /health/ready: the API's and the listener's
            self.kafka_probe = KafkaProbe(self.kafka) if self.kafka is not None else None
            # Before the model loads, so liveness answers during a long load too.
            self.health = HealthService(health_host, health_port, self.heartbeat,
                                        lambda: (self.slot.state, self.slot.error),
                                        stall_s=serve_settings.health_stall_s, probe=self.kafka_probe)
            self.slot.load_in_background(lambda: build_live_session(self.settings, self.options))

        def __serve_build_asgi_app__(self) -> FastAPI:
            cap = in_flight_cap(replica_max_ongoing_requests(), self.settings.limits)
            app = create_app(self.slot, self.settings.serve, token=self.token, kafka=self.kafka,
                             limits=self.settings.limits, max_in_flight=cap, heartbeat=self.heartbeat,
                             kafka_probe=self.kafka_probe)
            self.limits = app.state.limits
            install_front_gate(self.token, self.limits)  # direct ingress: the guard in front of Serve
            return app

        def reconfigure(self, user_config: dict) -> None:
            # Serve calls this after the app is built, and again on every config change.
            if self.limits is not None:
                user_config = user_config or {}
                self.limits.max_streams = int(user_config.get("max_streams", self.limits.max_streams))
                self.limits.max_body_bytes = int(user_config.get("max_request_bytes", self.limits.max_body_bytes))

        def __del__(self) -> None:  # Serve calls it when the replica stops: free the port at once
            if getattr(self, "health", None) is not None:
                self.health.close()

    return MaskletAPI


_MODEL_OPTIONS = {"model": "name", "checkpoint": "checkpoint", "image_size": "image_size", "device": "device",
                  "precision": "precision", "model_factory": "factory"}


def build_live_session(settings: Any, options: dict) -> Any:
    """The replica's LiveSession. Its stages are Ray actors (`pipeline.backend: ray`, the default:
    frames are decoded and records built there, not in this replica), or objects in this process
    (`inprocess`: small setups and tests)."""
    from masklet.actors.backend import InProcessBackend, RayBackend
    from masklet.pipeline.config import ModelSettings
    from masklet.pipeline.configure import live_config, model_spec
    from masklet.pipeline.live import LiveSession

    overrides = {field: options[key] for key, field in _MODEL_OPTIONS.items() if options.get(key) is not None}
    if overrides:  # validated like the YAML and env values
        model = ModelSettings(**{**settings.model.model_dump(), **overrides})
        settings = settings.model_copy(update={"model": model})
    spec = model_spec(settings)
    executor = {key: options[key] for key in ("max_batch_size", "max_wait_ms") if key in options}
    config = live_config(settings, spec, max_streams=options.get("max_streams"), **executor)
    backend = InProcessBackend() if settings.pipeline.backend == "inprocess" else RayBackend()
    return LiveSession(backend, spec, config)


def app(args: Optional[dict] = None) -> Any:
    """Serve application builder (`import_path: masklet.deploy.serve_deployment:app`; the config's `args` are `options`).

    A builder rather than a bound application, so importing this module for `create_app` (tests,
    other ASGI servers) neither imports Ray Serve nor loads a model.
    """
    return _serve_deployment().options(**deployment_limits()).bind(dict(args or {}))
