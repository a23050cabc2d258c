"""Masklet configuration: one pydantic model per concern, loaded from YAML plus `MASKLET_*` env vars.

Precedence (highest first): keyword overrides, `MASKLET_<SECTION>__<FIELD>` env vars,
`MASKLET_API_TOKEN`, the YAML file (argument or `MASKLET_CONFIG`), defaults.
"""
from __future__ import annotations

import contextvars
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from masklet.actors.prompt_limits import InputLimits
from masklet.actors.messages import MessageError
from masklet.actors.safe_yaml import load_yaml
from masklet.actors.sources import DEFAULT_MAX_PIXELS

CONFIG_MAX_DEPTH = 32  # sections hold mappings of scalars; anything deeper is a mistake or an attack
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

KNOWN_MODEL_NAMES = tuple(
    f"{family}_hiera_{size}" for family in ("sam2", "sam2.1") for size in ("tiny", "small", "base_plus", "large")
)


_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class ConfigError(ValueError):
    """Configuration could not be read or is invalid; the message is ready to show to a user."""


class _Section(BaseModel):
    # Unknown keys are typos more often than not; refuse them instead of silently ignoring.
    model_config = ConfigDict(extra="forbid", validate_default=True)


DEFAULT_MODEL_FACTORY = "masklet.model:build_model"


class ModelSettings(_Section):
    # The plug-in seam: "module:function" building a model that follows masklet.model.protocols.
    # (Declared first: `name` is checked against it.)
    factory: str = Field(DEFAULT_MODEL_FACTORY, description="module:function(name, checkpoint, image_size, device, **kw)")
    name: str = "sam2.1_hiera_tiny"
    checkpoint: str = Field("auto", description='"auto" (download official weights), "random", or a file path')
    image_size: int = Field(1024, ge=64, le=4096)
    device: str = Field("auto", description='"auto", "cpu", "cuda" or "cuda:N"')
    # fp32: exact (bit-identical to the official predictor on CPU); bf16: autocast, as the official
    # predictor runs on GPUs (faster, with a measured drift; see bench/results/precision_bench.json).
    precision: Literal["fp32", "bf16"] = "fp32"

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, factory: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", factory):
            raise ValueError(f"model factory must be 'module:function', got {factory!r}")
        return factory

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str, info: ValidationInfo) -> str:
        # Our factory knows the eight official variants; a plug-in factory names its own models.
        if info.data.get("factory", DEFAULT_MODEL_FACTORY) == DEFAULT_MODEL_FACTORY and name not in KNOWN_MODEL_NAMES:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(KNOWN_MODEL_NAMES)}")
        return name

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_form(cls, checkpoint: str) -> str:
        checkpoint = checkpoint.strip()
        if not checkpoint:
            raise ValueError('checkpoint must be "auto", "random" or a file path')
        return checkpoint

    @field_validator("image_size")
    @classmethod
    def _image_size_multiple(cls, size: int) -> int:
        if size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (the encoder's patch grid), got {size}")
        return size

    @field_validator("device")
    @classmethod
    def _device_form(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError(f'device must be "auto", "cpu", "cuda" or "cuda:N", got {device!r}')
        return device

    def checkpoint_for_model_api(self) -> Optional[str]:
        """The `checkpoint` argument of `model.build_model`: None means random weights."""
        return None if self.checkpoint == "random" else self.checkpoint


class PipelineSettings(_Section):
    max_batch_size: int = Field(8, ge=1, le=256)
    max_wait_ms: float = Field(10.0, ge=0, le=10_000)
    # AUTO: WAIT for files/archives (never drop), DROP_OLDEST for live sources (count drops).
    queue_policy: Literal["AUTO", "WAIT", "DROP_OLDEST"] = "AUTO"
    queue_capacity: int = Field(32, ge=1, le=100_000, description=(
        "files: frames in flight per stream, also capped so that at most 128 MiB of decoded pixels are held "
        "(720p 32, 1080p 11, 4K 3); "
        "live streams take theirs from `masklet run --queue-capacity`"))
    snapshot_every_n_frames: int = Field(30, ge=1)
    replay_buffer_frames: int = Field(64, ge=1, description="per-stream frames kept for tracker replay")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    backend: Literal["ray", "inprocess"] = "ray"
    # Placement: objects packed onto one tracker actor process (1 = one process per object), and
    # streams sharing one decoder / publisher actor. Actors are reused across inputs and streams.
    objects_per_tracker: int = Field(16, ge=1, le=10_000)
    max_step_batch: int = Field(8, ge=1, le=1_000, description="objects per batched tracker forward pass")
    streams_per_decoder: int = Field(4, ge=1, le=1_000)
    streams_per_publisher: int = Field(4, ge=1, le=1_000)
    # Streams get a publisher of their own until this many exist, then share: publishing is the
    # CPU-heaviest per-stream stage, so two streams on one publisher would use one core.
    publishers_before_sharing: int = Field(2, ge=1, le=1_000)
    # Encoder and trackers in one process, embeddings kept on the device: auto = on for CUDA.
    colocate: Literal["auto", "on", "off"] = "auto"

    @model_validator(mode="after")
    def _replay_covers_snapshots(self) -> "PipelineSettings":
        # A replacement tracker replays every frame since its last snapshot from this buffer.
        if self.replay_buffer_frames < self.snapshot_every_n_frames:
            raise ValueError(
                f"replay_buffer_frames ({self.replay_buffer_frames}) must be >= snapshot_every_n_frames "
                f"({self.snapshot_every_n_frames}), or a restarted tracker cannot replay to its last snapshot"
            )
        return self

    def policy_for(self, *, live: bool) -> Literal["WAIT", "DROP_OLDEST"]:
        if self.queue_policy != "AUTO":
            return self.queue_policy
        return "DROP_OLDEST" if live else "WAIT"


class KafkaTopics(_Section):
    frames: str = "masklet.frames"
    prompts: str = "masklet.prompts"
    masklets: str = "masklet.masklets"
    deadletter: str = "masklet.deadletter"

    @field_validator("frames", "prompts", "masklets", "deadletter")
    @classmethod
    def _legal_topic(cls, topic: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", topic) or topic in {".", ".."}:
            raise ValueError(f"{topic!r} is not a legal Kafka topic name (letters, digits, '.', '_', '-')")
        return topic


class ResumeSettings(_Section):
    """`masklet run`: objects survive a restart (see pipeline/kafka/resume.py)."""

    # Re-add a stream's objects from its newest record in the masklets topic when the stream opens
    # on this member (after a crash, a restart or a rebalance); off = every stream starts empty.
    enabled: bool = True
    # A record more than this many frames before the first new frame is too stale to seed from.
    max_gap_frames: int = Field(90, ge=1)
    # Offsets read per backward step from the high watermark of the stream's partition.
    window: int = Field(256, ge=1)
    # Stop looking after this many records: a stream with nothing recent starts empty.
    scan_records: int = Field(20_000, ge=1)
    # The scan runs inside the poll loop, so it must end well within max_poll_interval_ms.
    timeout_s: float = Field(3.0, gt=0, le=30)


class KafkaLiveSettings(_Section):
    """`masklet run` on live streams: latency profile, cross-topic order, reordering (pipeline/kafka/README.md)."""

    # live: short fetch waits (50 ms), no linger, frequent commits (each hop through the embedded
    # broker adds ~10-20 ms p50); throughput: the client defaults' long fetch waits and batching
    # (hops add up to ~0.5 s on the embedded broker, polling costs ~nothing). pipeline/kafka/README.md.
    profile: Literal["live", "throughput"] = "live"
    # A frame waits until the stream's prompts partition is read up to date (every prompt sent
    # before the frame is applied first); if that cannot be confirmed within this bound it goes on.
    prompt_wait_ms: int = Field(1000, ge=0, le=60_000)
    # A gap in a stream's frame indices (e.g. after a broker restart) is waited for this long, or
    # until this many later frames are held, before the missing frames are reported lost.
    reorder_window_ms: int = Field(3000, ge=0, le=600_000)
    reorder_window_frames: int = Field(128, ge=1, le=100_000)


class KafkaSettings(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    topics: KafkaTopics = Field(default_factory=KafkaTopics)
    resume: ResumeSettings = Field(default_factory=ResumeSettings)
    live: KafkaLiveSettings = Field(default_factory=KafkaLiveSettings)
    group_id: str = "masklet"
    client_id: str = "masklet"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Optional[Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]] = None
    sasl_plain_username: Optional[str] = None
    sasl_plain_password: Optional[SecretStr] = None
    ssl_cafile: Optional[Path] = None
    ssl_certfile: Optional[Path] = None
    ssl_keyfile: Optional[Path] = None
    # Fast failure detection: a dead consumer's partitions move to a live one within ~6 s instead
    # of the client default 45 s (6000 is also the broker's default group.min.session.timeout.ms).
    session_timeout_ms: int = Field(6000, ge=1000)
    # Kafka requires heartbeats well inside the session timeout; 1/6 of it tolerates lost beats.
    heartbeat_interval_ms: int = Field(1000, ge=100)
    # One poll loop iteration (decode + batched encode + publish of a poll's frames) must finish
    # within this bound or the member is evicted; 10 s is far above a CPU batch yet still evicts a
    # wedged worker quickly, instead of the default 5 minutes of stalled partitions.
    max_poll_interval_ms: int = Field(10_000, ge=1000)

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_port_list(cls, servers: str) -> str:
        entries = [entry.strip() for entry in servers.split(",") if entry.strip()]
        if not entries:
            raise ValueError("bootstrap_servers must list at least one host:port")
        for entry in entries:
            match = re.fullmatch(r"(\[[0-9A-Fa-f:]+\]|[^:\s]+):(\d+)", entry)
            if not match or not 0 < int(match.group(2)) < 65536:
                raise ValueError(f"bootstrap server {entry!r} is not host:port")
        return ",".join(entries)

    @model_validator(mode="after")
    def _consistent(self) -> "KafkaSettings":
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError(
                f"heartbeat_interval_ms ({self.heartbeat_interval_ms}) must be at most a third of "
                f"session_timeout_ms ({self.session_timeout_ms})"
            )
        if self.session_timeout_ms > self.max_poll_interval_ms:
            raise ValueError("session_timeout_ms must not exceed max_poll_interval_ms")
        if self.resume.timeout_s * 1000 * 2 > self.max_poll_interval_ms:
            raise ValueError(f"resume.timeout_s ({self.resume.timeout_s}) must be at most half of "
                             f"max_poll_interval_ms ({self.max_poll_interval_ms} ms): the scan runs in the poll loop")
        if self.security_protocol.startswith("SASL_"):
            missing = [
                name
                for name in ("sasl_mechanism", "sasl_plain_username", "sasl_plain_password")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(f"security_protocol {self.security_protocol} needs {', '.join(missing)}")
        elif self.sasl_mechanism is not None:
            raise ValueError(f"sasl_mechanism is set but security_protocol is {self.security_protocol}")
        return self

    @property
    def bootstrap_server_list(self) -> list[str]:
        return self.bootstrap_servers.split(",")

    def client_kwargs(self) -> dict[str, Any]:
        """Connection/security keyword arguments shared by kafka-python producers and consumers."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_server_list,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism is not None:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_plain_username
            kwargs["sasl_plain_password"] = self.sasl_plain_password.get_secret_value()  # type: ignore[union-attr]
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = str(value)
        return kwargs

    def consumer_kwargs(self) -> dict[str, Any]:
        return {
            **self.client_kwargs(),
            "group_id": self.group_id,
            "session_timeout_ms": self.session_timeout_ms,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "max_poll_interval_ms": self.max_poll_interval_ms,
        }


class ServeSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_token: Optional[SecretStr] = None
    max_streams: int = Field(16, ge=1, le=10_000)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest accepted request body")
    # /health/live and /health/ready on their own port, answered by a thread of the API replica: they
    # never queue behind API traffic (deploy/health_listener.py). None: off; 0: any free port.
    health_port: Optional[int] = Field(8001, ge=0, le=65535)
    health_stall_s: float = Field(30.0, gt=0, description="/health/live on health_port is 503 once the API's "
                                                          "event loop has not run for this long")
    # direct: the API replica serves HTTP itself, no wait in Serve's proxy (deploy/serve_ingress.py)
    ingress: Literal["direct", "proxy"] = "direct"
    # The API's guard (token, in-flight and SSE caps) in Serve's proxy too: past the caps the proxy answers
    # 503 itself instead of queueing (deploy/serve_ingress.py). Its counts cover every application
    # behind that proxy: turn it off where one proxy fronts several Masklet applications.
    proxy_gate: bool = True

    @model_validator(mode="after")
    def _health_port_apart(self) -> "ServeSettings":
        if self.health_port == self.port:
            raise ValueError(f"serve.health_port ({self.health_port}) must differ from serve.port; null turns it off")
        return self

    @model_validator(mode="after")
    def _token_off_loopback(self) -> "ServeSettings":
        if self.host not in _LOOPBACK_HOSTS and self.api_token is None:
            raise ValueError(f"serving on {self.host} (beyond loopback) requires an api_token (MASKLET_API_TOKEN)")
        return self


class LimitsSettings(_Section):
    """Bounded work per input (README "Limits"), as the frozen `actors.prompt_limits.InputLimits`
    the code enforces (`input_limits()`), plus the control API's caps on requests and SSE feeds.

    Ray Serve's own request limits (max_ongoing_requests, max_queued_requests) live in one place,
    the MaskletAPI entry of deploy/serve_config.yaml, which `masklet serve` reads too.
    """

    max_points_per_prompt: int = Field(64, ge=1, le=100_000)
    max_objects_per_stream: int = Field(16, ge=1, le=100_000, description="tracked objects of one stream")
    max_objects_per_run: int = Field(64, ge=1, le=1_000_000, description="tracked objects of all streams of a run")
    max_object_id: int = Field(1_000_000, ge=1, le=2**53 - 1)
    max_prompt_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="one prompt record or API prompt body")
    max_prompts_file_bytes: int = Field(1024 * 1024, ge=1024, description="segment --prompts FILE")
    max_nesting_depth: int = Field(32, ge=4, le=500, description="lists/objects nested in JSON and YAML inputs")
    max_frame_gap: int = Field(100_000, ge=1, description="Kafka: frame_idx this far past its stream's newest frame "
                                                          "is a dead letter")
    frame_gap_resync: int = Field(3, ge=1, description="...unless this many frames in a row agree on the jump")
    # Control API: ordinary requests worked on at once (beyond it: 503 + Retry-After at once), and
    # open SSE feeds (their own cap). /health/* has none.
    max_in_flight_requests: int = Field(16, ge=1, le=10_000)
    max_event_streams: int = Field(16, ge=1, le=10_000, description="open SSE feeds (/streams/{id}/events)")

    def input_limits(self) -> InputLimits:
        return InputLimits(**{name: getattr(self, name) for name in InputLimits.__dataclass_fields__})


_config_file_for_load: contextvars.ContextVar[Optional[Path]] = contextvars.ContextVar("masklet_config_file", default=None)


class _YamlFileSource(PydanticBaseSettingsSource):
    """Reads the YAML file chosen by `load_settings` (or `MASKLET_CONFIG`) as the lowest-priority source."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _config_file_for_load.get()
        if path is None and os.environ.get("MASKLET_CONFIG"):
            path = Path(os.environ["MASKLET_CONFIG"])
        if path is None:
            return {}
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
        try:  # depth-limited, aliases refused: a config file is input too (one line, never a traceback)
            data = load_yaml(text, CONFIG_MAX_DEPTH, what=str(path))
        except MessageError as exc:
            raise ConfigError(str(exc)) from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections (model, pipeline, kafka, serve)")
        return data


class _ApiTokenEnvSource(PydanticBaseSettingsSource):
    """`MASKLET_API_TOKEN` is the documented short name for `MASKLET_SERVE__API_TOKEN`."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        token = os.environ.get("MASKLET_API_TOKEN")
        return {"serve": {"api_token": token}} if token else {}


class MaskletSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MASKLET_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    model: ModelSettings = Field(default_factory=ModelSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            _ApiTokenEnvSource(settings_cls),
            _YamlFileSource(settings_cls),
        )


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, `section.field: message`, without pydantic's URLs and input dumps."""
    problems = []
    for error in exc.errors(include_url=False):
        location = ".".join(str(part) for part in error["loc"]) or "(root)"
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{location}: {message}")
    return "invalid configuration: " + "; ".join(problems)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> MaskletSettings:
    """Build settings from `config_file` (or `MASKLET_CONFIG`), `MASKLET_*` env vars and overrides.

    Raises ConfigError with a one-line, user-facing message on any problem.
    """
    token = _config_file_for_load.set(Path(config_file).expanduser() if config_file is not None else None)
    try:
        return MaskletSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    finally:
        _config_file_for_load.reset(token)
