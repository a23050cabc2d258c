"""The embedded Tansu broker: start, probe, restart, stop, and the `masklet broker` command."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from masklet.pipeline.kafka.broker import EmbeddedBroker, probe_metadata

REPO_ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); its state letter says it is gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def test_module_broker_answers_metadata_and_creates_topics(broker, kafka_settings):
    from kafka import KafkaAdminClient

    assert broker.running
    assert probe_metadata(broker.host, broker.port)
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    try:
        assert kafka_settings.topics.frames in admin.list_topics()
    finally:
        admin.close()


def test_start_stop_reaps_the_process_and_frees_the_port():
    with EmbeddedBroker(port=0) as running:
        pid, port = running._process.pid, running.port
        assert _alive(pid)
        assert probe_metadata("127.0.0.1", port)
        running.restart()  # same port, fresh memory-only storage, topics recreated
        assert probe_metadata("127.0.0.1", port)
        pid = running._process.pid
    assert not _alive(pid)
    assert not probe_metadata("127.0.0.1", port, timeout=0.3)


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_masklet_broker_prints_bootstrap_and_stops_on_ctrl_c(tmp_path, sigint):
    """Ctrl-C (SIGINT) stops `masklet broker`, also when it was started with SIGINT ignored, as a shell
    starts a script's background jobs (`masklet broker &`): Python keeps an ignored SIGINT ignored
    unless the command restores it (deploy/signals.py)."""
    from masklet.pipeline.kafka.broker import free_port

    port = free_port()
    command = [sys.executable, "-m", "masklet.deploy.kafka_cli", "broker", "--port", str(port)]
    if sigint == "ignored":  # the shell's `trap '' INT`, inherited through exec like a background job's
        command = ["bash", "-c", 'trap "" INT; exec "$@"', "bash", *command]
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        first_line = process.stdout.readline()
        assert first_line.strip() == f"bootstrap_servers=127.0.0.1:{port}"
        assert probe_metadata("127.0.0.1", port)
        children = [int(pid) for pid in
                    Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
        process.send_signal(signal.SIGINT)
        # generous: 15 s was too short once on a loaded 2-core machine (the whole suite running)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "broker stopped" in out
    assert children and not any(_alive(pid) for pid in children)
    deadline = time.monotonic() + 2
    while probe_metadata("127.0.0.1", port, timeout=0.2) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not probe_metadata("127.0.0.1", port, timeout=0.2)
