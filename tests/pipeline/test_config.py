import pytest

from masklet.pipeline.config import DEFAULT_MAX_PIXELS, ConfigError, MaskletSettings, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("MASKLET_") and name != "MASKLET_TEST_VIDEOS":
            monkeypatch.delenv(name)


def test_defaults_match_the_design():
    settings = load_settings()
    assert settings.model.name == "sam2.1_hiera_tiny" and settings.model.checkpoint == "auto"
    assert settings.pipeline.max_batch_size == 8 and settings.pipeline.max_wait_ms == 10
    assert settings.pipeline.max_pixels == DEFAULT_MAX_PIXELS == 4096 * 2160
    assert settings.kafka.topics.frames == "masklet.frames"
    assert settings.kafka.topics.deadletter == "masklet.deadletter"
    assert (settings.kafka.session_timeout_ms, settings.kafka.heartbeat_interval_ms) == (6000, 1000)
    assert settings.kafka.max_poll_interval_ms == 10_000
    assert settings.serve.host == "127.0.0.1" and settings.serve.api_token is None
    assert settings.pipeline.policy_for(live=True) == "DROP_OLDEST"
    assert settings.pipeline.policy_for(live=False) == "WAIT"
    assert settings.model.checkpoint_for_model_api() == "auto"


def test_yaml_then_env_then_overrides(tmp_path, monkeypatch):
    config = tmp_path / "masklet.yaml"
    config.write_text("model:\n  image_size: 512\n  device: cpu\nkafka:\n  bootstrap_servers: a:1\n")
    monkeypatch.setenv("MASKLET_KAFKA__BOOTSTRAP_SERVERS", "b:2, c:3")
    monkeypatch.setenv("MASKLET_KAFKA__TOPICS__FRAMES", "cam.frames")
    monkeypatch.setenv("MASKLET_API_TOKEN", "s3cret")
    settings = load_settings(config, pipeline={"backend": "inprocess"})
    assert settings.model.image_size == 512 and settings.model.device == "cpu"
    assert settings.kafka.bootstrap_server_list == ["b:2", "c:3"]
    assert settings.kafka.topics.frames == "cam.frames"
    assert settings.serve.api_token.get_secret_value() == "s3cret"
    assert "s3cret" not in settings.model_dump_json()
    assert settings.pipeline.backend == "inprocess"


def test_config_file_from_env(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("pipeline:\n  snapshot_every_n_frames: 10\n")
    monkeypatch.setenv("MASKLET_CONFIG", str(config))
    assert load_settings().pipeline.snapshot_every_n_frames == 10


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"model": {"name": "sam3"}}, "model.name: unknown model 'sam3'"),
        ({"model": {"image_size": 1000}}, "model.image_size: image_size must be a multiple of 16"),
        ({"model": {"device": "tpu"}}, "model.device"),
        ({"pipeline": {"queue_policy": "LIFO"}}, "pipeline.queue_policy"),
        ({"pipeline": {"snapshot_every_n_frames": 100}}, "replay_buffer_frames (64) must be >= snapshot_every_n_frames"),
        ({"kafka": {"bootstrap_servers": "nohost"}}, "bootstrap server 'nohost' is not host:port"),
        ({"kafka": {"heartbeat_interval_ms": 3000}}, "at most a third of session_timeout_ms"),
        ({"kafka": {"security_protocol": "SASL_SSL"}}, "needs sasl_mechanism, sasl_plain_username, sasl_plain_password"),
        ({"kafka": {"topics": {"frames": "bad topic"}}}, "not a legal Kafka topic name"),
        ({"serve": {"host": "0.0.0.0"}}, "requires an api_token"),
        ({"serve": {"port": 70000}}, "serve.port"),
        ({"kafka": {"bootstrap_server": "x:1"}}, "kafka.bootstrap_server: Extra inputs are not permitted"),
    ],
)
def test_invalid_values_give_one_clear_line(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_settings(**overrides)
    message = str(info.value)
    assert expected in message and "\n" not in message and message.startswith("invalid configuration:")


def test_env_typos_and_bad_types_are_reported(monkeypatch):
    monkeypatch.setenv("MASKLET_PIPELINE__MAX_BATCH_SIZE", "eight")
    with pytest.raises(ConfigError, match="pipeline.max_batch_size"):
        load_settings()


def test_bad_yaml_file_names_the_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        load_settings(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(scalar)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.yaml")


def test_kafka_client_kwargs_carry_security():
    settings = load_settings(
        kafka={
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": "u",
            "sasl_plain_password": "p",
            "ssl_cafile": "/etc/ca.pem",
        }
    )
    consumer = settings.kafka.consumer_kwargs()
    assert consumer["sasl_plain_password"] == "p" and consumer["ssl_cafile"] == "/etc/ca.pem"
    assert consumer["group_id"] == "masklet" and consumer["session_timeout_ms"] == 6000
    assert "p" not in repr(settings.kafka.sasl_plain_password)


def test_random_checkpoint_maps_to_none():
    assert MaskletSettings(model={"checkpoint": "random"}).model.checkpoint_for_model_api() is None


def test_a_deeply_nested_config_file_is_one_line_not_a_traceback(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("pipeline: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nesting depth"):
        load_settings(path)


def test_one_default_per_setting_whatever_the_command():
    """segment, run and serve map settings through pipeline/configure.py, and the configs' own
    defaults equal the settings' (they used to disagree: max_batch_size was 8, 4 and 8)."""
    from masklet.actors.payloads import ModelSpec
    from masklet.pipeline.configure import engine_config, executor_config, live_config
    from masklet.pipeline.engine_types import EngineConfig
    from masklet.pipeline.executor_config import ExecutorConfig
    from masklet.pipeline.live_types import LiveConfig

    settings = load_settings()
    shared = set(ExecutorConfig.__dataclass_fields__) & set(type(settings.pipeline).model_fields) - {"colocate"}
    assert {"max_batch_size", "max_wait_ms", "objects_per_tracker", "max_pixels"} <= shared
    for name in shared:
        assert getattr(ExecutorConfig(), name) == getattr(settings.pipeline, name), name
    spec = ModelSpec("sam2.1_hiera_tiny", None, 256, "cpu")
    mapped = executor_config(settings, spec)
    assert mapped == engine_config(settings, spec).executor == live_config(settings, spec).executor
    assert EngineConfig().executor == LiveConfig().executor == ExecutorConfig()
    assert all(getattr(mapped, n) == getattr(ExecutorConfig(), n) for n in shared)
