"""Settings -> kafka-python keyword arguments (no broker needed)."""
from kafka import KafkaConsumer, KafkaProducer

from masklet.pipeline.config import KafkaSettings
from masklet.pipeline.kafka.client import PROFILES, consumer_kwargs, crc32c_available, producer_kwargs, settings_from


def test_plaintext_defaults_are_tuned_for_live_latency_and_recovery():
    kwargs = producer_kwargs(KafkaSettings(bootstrap_servers="127.0.0.1:19092"))
    assert kwargs["bootstrap_servers"] == ["127.0.0.1:19092"]
    assert kwargs["security_protocol"] == "PLAINTEXT"
    assert kwargs["enable_idempotence"] is False
    assert kwargs["linger_ms"] == 0 and kwargs["batch_size"] == 1024 * 1024  # live: no linger
    assert set(kwargs) <= set(KafkaProducer.DEFAULT_CONFIG)
    assert crc32c_available()


def test_the_latency_profile_sets_fetch_wait_linger_and_commit_cadence():
    live, bulk = KafkaSettings(), KafkaSettings(live={"profile": "throughput"})
    assert consumer_kwargs(live)["fetch_max_wait_ms"] == PROFILES["live"].fetch_max_wait_ms == 50
    assert consumer_kwargs(bulk)["fetch_max_wait_ms"] == 500  # kafka-python's default
    assert producer_kwargs(bulk)["linger_ms"] == 5
    assert PROFILES["live"].commit_interval_s < PROFILES["throughput"].commit_interval_s
    assert consumer_kwargs(live, fetch_max_wait_ms=7)["fetch_max_wait_ms"] == 7  # callers may still override


def test_sasl_ssl_scram_and_tls_files_pass_through(tmp_path):
    ca, cert, key = (tmp_path / name for name in ("ca.pem", "client.pem", "client.key"))
    settings = KafkaSettings(
        bootstrap_servers="kafka-1.example:9093,kafka-2.example:9093",
        security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
        sasl_plain_username="masklet", sasl_plain_password="s3cret",
        ssl_cafile=ca, ssl_certfile=cert, ssl_keyfile=key,
    )
    for kwargs in (producer_kwargs(settings), consumer_kwargs(settings)):
        assert kwargs["bootstrap_servers"] == ["kafka-1.example:9093", "kafka-2.example:9093"]
        assert kwargs["security_protocol"] == "SASL_SSL"
        assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
        assert kwargs["sasl_plain_username"] == "masklet"
        assert kwargs["sasl_plain_password"] == "s3cret"  # unwrapped from SecretStr for the client
        assert (kwargs["ssl_cafile"], kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == (str(ca), str(cert), str(key))


def test_tls_only_has_no_sasl_keys(tmp_path):
    settings = KafkaSettings(security_protocol="SSL", ssl_cafile=tmp_path / "ca.pem")
    kwargs = consumer_kwargs(settings)
    assert kwargs["security_protocol"] == "SSL" and kwargs["ssl_cafile"] == str(tmp_path / "ca.pem")
    assert not any(name.startswith("sasl_") for name in kwargs)


def test_consumer_commits_manually_and_uses_group_timeouts():
    kwargs = consumer_kwargs(KafkaSettings(group_id="workers"))
    assert kwargs["enable_auto_commit"] is False
    assert kwargs["group_id"] == "workers"
    assert (kwargs["session_timeout_ms"], kwargs["heartbeat_interval_ms"], kwargs["max_poll_interval_ms"]) == (
        6000, 1000, 10000)
    assert set(kwargs) <= set(KafkaConsumer.DEFAULT_CONFIG)
    assert "group_id" not in consumer_kwargs(KafkaSettings(), group=False)


def test_bootstrap_override_keeps_the_rest_of_the_settings():
    base = KafkaSettings(group_id="g", security_protocol="SSL")
    settings = settings_from("10.0.0.1:9092", base)
    assert settings.bootstrap_servers == "10.0.0.1:9092"
    assert settings.group_id == "g" and settings.security_protocol == "SSL"
    assert settings_from(None, base) is base
