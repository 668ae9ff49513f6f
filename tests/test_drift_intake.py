"""Drift events: the retrain policy (both databases), HTTP intake, and the Kafka consumer against a
real Kafka-protocol broker (Tansu): dead letters, redelivery, broker restart, offsets after durability."""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from automation.config import MlgateConfig, parse_config
from automation.store import open_store
from tests.conftest import FAST_CONFIG, clean_tables, read_topic, wait_for
from triggers.local_broker import TansuBroker
from triggers.jobs import queue
from triggers.drift import events as drift
from triggers.app import ServiceState, create_app
from triggers.drift.consumer import DriftConsumer, publish
from triggers.metrics import ServiceMetrics
from triggers.request_guard import sign

NOW = datetime.now(timezone.utc)


def make_config(tmp_path: Path, topic: str | None = None, **drift_policy: Any) -> MlgateConfig:
    raw = copy.deepcopy(FAST_CONFIG)
    raw["defaults"]["drift"] = {"threshold": 0.3, "cooldown_minutes": 30} | drift_policy
    raw["service"] = {"data_roots": ["/data", "s3://drift-bucket/windows/"]}
    if topic:
        raw["service"]["kafka"] = {"topic": topic, "dead_letter_topic": f"{topic}.dead"}
    return parse_config(yaml.safe_dump(raw), "mlgate.yaml", tmp_path)


def event(model: str = "digits_mlp", share: float = 0.6, **data: Any) -> dict[str, Any]:
    columns = [{"column": "px_3", "score": 0.001, "method": "ks", "threshold": 0.05}]
    body = drift.make_event(model, share, columns, NOW - timedelta(hours=1), NOW, source="tests")
    body["data"].update(data)
    return body


def decide(engine: Any, config: MlgateConfig, *bodies: dict[str, Any]) -> list[drift.Decision]:
    return drift.decide_batch(engine, config, [drift.parse_event(b, config) for b in bodies], "test")


@pytest.fixture
def engine(db_url: str) -> Any:
    clean_tables(db_url)
    return open_store(db_url)


def test_threshold_decides_whether_to_retrain(engine: Any, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    low, high = decide(engine, config, event(share=0.1), event(share=0.5))
    assert low.outcome == "below_threshold" and low.job_id is None and "< threshold 0.30" in low.reason
    assert high.outcome == "job"
    job = queue.get_job(engine, high.job_id)
    assert (job.model, job.kind, job.trigger, job.state) == ("digits_mlp", "retrain", "drift", "queued")


def test_burst_coalesces_into_one_job_with_the_newest_data(engine: Any, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    burst = [event(data_ref=f"/data/window-{i}.npz") for i in range(20)] + [event(model="digits_cnn")]
    decisions = decide(engine, config, *burst[:10]) + decide(engine, config, *burst[10:])
    assert [d.outcome for d in decisions].count("job") == 2          # one per model
    mlp_jobs = {d.job_id for d in decisions[:20]}
    assert len(mlp_jobs) == 1
    payload = queue.get_job(engine, mlp_jobs.pop()).as_dict()["payload"]
    assert payload["data_ref"] == "/data/window-19.npz" and payload["coalesced"] == 19
    # still coalesced while the job runs; a running job keeps the data it started with
    running = queue.claim(engine, "w1")
    assert decide(engine, config, event(data_ref="/data/late.npz"))[0].job_id == running.id
    assert queue.get_job(engine, running.id).as_dict()["payload"]["data_ref"] == "/data/window-19.npz"


def test_cooldown_after_a_drift_retrain(engine: Any, tmp_path: Path) -> None:
    config = make_config(tmp_path, cooldown_minutes=30)
    first = decide(engine, config, event())[0]
    job = queue.claim(engine, "w1")
    queue.finish(engine, job.id, "w1", "succeeded")
    again = decide(engine, config, event())[0]
    assert first.outcome == "job" and again.outcome == "cooldown" and job.id in again.reason
    no_cooldown = make_config(tmp_path, cooldown_minutes=0)
    assert decide(engine, no_cooldown, event())[0].outcome == "job"


def test_same_event_id_is_recorded_once(engine: Any, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    body = event()
    first, replay = decide(engine, config, body, body)
    assert first.outcome == "job" and replay.duplicate and replay.job_id == first.job_id
    assert len(queue.list_jobs(engine)) == 1


DRIFT_SECRET, DRIFT_TOKEN = "drift-hmac-secret", "drift-bearer-token"


def drift_client(engine: Any, config: MlgateConfig, **credentials: str) -> TestClient:
    state = ServiceState(config=config, engine=engine, webhook_secret="x", metrics=ServiceMetrics(engine),
                         **({"drift_secret": DRIFT_SECRET, "drift_token": DRIFT_TOKEN} | credentials))
    return TestClient(create_app(state))


def post_signed(client: TestClient, body: Any, secret: str = DRIFT_SECRET) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/events/drift", content=raw, headers={"X-Mlgate-Signature-256": sign(secret, raw),
                                                              "Content-Type": "application/json"})


def test_http_drift_intake_validates_and_decides(engine: Any, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    client = drift_client(engine, config)
    response = post_signed(client, event(share=0.9))
    assert response.status_code == 202 and response.json()["outcome"] == "job"
    bad = event()
    bad["data"]["drift_share"] = 1.5
    response = post_signed(client, bad)
    assert response.status_code == 400 and "data.drift_share" in response.json()["error"]
    response = post_signed(client, event(model="resnet_nope"))
    assert response.status_code == 422 and "unknown model 'resnet_nope'" in response.json()["error"]
    assert post_signed(client, b"{not json").status_code == 400
    by_token = client.post("/events/drift", json=event(model="digits_cnn"),
                           headers={"Authorization": f"Bearer {DRIFT_TOKEN}"})
    assert by_token.status_code == 202
    assert sorted(e.outcome for e in drift.list_drift_events(engine)) == ["job", "job"]


def test_http_drift_intake_refuses_outsiders_before_recording_anything(engine: Any, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    client = drift_client(engine, config)
    assert client.post("/events/drift", json=event(share=0.9)).status_code == 401          # no credential
    assert post_signed(client, event(share=0.9), secret="guessed").status_code == 401
    assert client.post("/events/drift", json=event(), headers={"Authorization": "Bearer guessed"}).status_code == 401
    signed = json.dumps(event(share=0.9)).encode()
    tampered = client.post("/events/drift", content=signed.replace(b"0.9", b"1.0"),
                           headers={"X-Mlgate-Signature-256": sign(DRIFT_SECRET, signed)})
    assert tampered.status_code == 401
    # a hostile data_ref is refused with a 4xx before it is recorded, whatever its disguise
    for ref in ("/etc/passwd", "/data/../etc/shadow", "file:///etc/passwd", "relative/window.npz",
                "file://attacker.example/data/x.npz", "s3://drift-bucket/other/x.npz", "s3://drift-bucket/windows/../x"):
        response = post_signed(client, event(share=0.9, data_ref=ref))
        assert response.status_code == 400 and "data_ref" in response.json()["error"], (ref, response.text)
    accepted = post_signed(client, event(share=0.9, data_ref="file:///data/window-7.npz"))
    assert accepted.status_code == 202
    assert queue.get_job(engine, accepted.json()["job_id"]).as_dict()["payload"]["data_ref"] == \
        "file:///data/window-7.npz"
    # an oversized body is refused by its declared length, before it is read or authenticated
    huge = client.post("/events/drift", content=b"x" * (65 * 1024), headers={"Content-Type": "application/json"})
    assert huge.status_code == 413
    assert [e.outcome for e in drift.list_drift_events(engine)] == ["job"]
    # with no credential configured, HTTP drift intake is off rather than open
    closed = drift_client(engine, config, drift_secret="", drift_token="")
    assert closed.post("/events/drift", json=event(share=0.9)).status_code == 403
    assert len(drift.list_drift_events(engine)) == 1


# --- Kafka ------------------------------------------------------------------------------------

class RunningConsumer:
    def __init__(self, config: MlgateConfig, engine: Any, bootstrap: str) -> None:
        self.consumer = DriftConsumer(config, engine, bootstrap)
        self.thread = threading.Thread(target=self.consumer.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.consumer.stop()
        self.thread.join(20)
        assert not self.thread.is_alive(), "the consumer did not stop"


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Any:
    return open_store(f"sqlite:///{tmp_path / 'service.db'}")


def recorded(engine: Any) -> list[drift.DriftRecord]:
    return drift.list_drift_events(engine, limit=10_000)


def test_kafka_consumer_records_each_event_once_and_dead_letters_bad_ones(
        kafka_broker: TansuBroker, sqlite_engine: Any, tmp_path: Path) -> None:
    from kafka import KafkaProducer

    config = make_config(tmp_path)
    good = [event(share=0.7), event(share=0.05), event(model="digits_cnn")]
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
    producer.send(config.service.kafka.topic, b"{this is not json")
    producer.send(config.service.kafka.topic, json.dumps(event(model="unknown_model")).encode())
    producer.send(config.service.kafka.topic, json.dumps(event(data_ref="/etc/passwd")).encode())
    for body in good + [good[0]]:                                   # the last one is a redelivery
        producer.send(config.service.kafka.topic, json.dumps(body).encode())
    producer.flush()
    running = RunningConsumer(config, sqlite_engine, kafka_broker.bootstrap)
    try:
        assert wait_for(lambda: running.consumer.stats.consumed == 7, 60), running.consumer.stats
    finally:
        running.stop()
    outcomes = {r.id: r.outcome for r in recorded(sqlite_engine)}
    assert outcomes == {good[0]["id"]: "job", good[1]["id"]: "below_threshold", good[2]["id"]: "job"}
    assert running.consumer.stats.duplicates == 1 and len(queue.list_jobs(sqlite_engine)) == 2
    dead = read_topic(kafka_broker.bootstrap, config.service.kafka.dead_letter_topic, 3)
    reasons = sorted(dict(r.headers)["mlgate.error"].decode() for r in dead)
    assert reasons[0] == "data_ref '/etc/passwd' is outside the configured data roots"
    assert reasons[1].startswith("not JSON") and reasons[2].startswith("unknown model 'unknown_model'")
    assert b"{this is not json" in {r.value for r in dead}           # the original bytes, kept for replay


def test_no_record_wedges_the_consumer(kafka_broker: TansuBroker, engine: Any, tmp_path: Path) -> None:
    """Poison records of every kind are dead-lettered with the reason and the consumer goes on, on both
    databases. An id of 199 characters is valid, and its job's dedupe key must still fit the column."""
    from kafka import KafkaProducer

    topic = f"poison-{uuid.uuid4().hex[:8]}"
    config = make_config(tmp_path, topic)
    long_id = event(model="digits_cnn") | {"id": "x" * 199}
    after = event(share=0.7)
    poison = [None, b"[" * 20_000 + b"]" * 20_000, b"\xff\xfe{not utf-8", json.dumps(event() | {"pad": "y" * 200_000}).encode(),
              json.dumps(event() | {"id": "z" * 5000}).encode(), b"null", b"[]", b'"a string"',
              json.dumps({"data": {"x": {"y": [[[[[[[[[[]]]]]]]]]]}}}).encode()]
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all", max_request_size=2_000_000)
    for value in poison + [json.dumps(long_id).encode(), json.dumps(after).encode()]:
        producer.send(topic, value, key=b"k", partition=0)   # one partition: the good ones come after the poison
    producer.flush()
    running = RunningConsumer(config, engine, kafka_broker.bootstrap)
    try:
        assert wait_for(lambda: running.consumer.stats.consumed == len(poison) + 2, 90), running.consumer.stats
    finally:
        running.stop()
    outcomes = {r.id: r.outcome for r in recorded(engine)}
    assert outcomes == {long_id["id"]: "job", after["id"]: "job"}
    assert running.consumer.stats.dead_lettered == len(poison) and running.consumer.stats.errors == 0
    dead = read_topic(kafka_broker.bootstrap, config.service.kafka.dead_letter_topic, len(poison))
    reasons = sorted(dict(r.headers)["mlgate.error"].decode() for r in dead)
    assert len(reasons) == len(poison) and "empty record (null value)" in reasons
    assert "JSON nested too deeply" in reasons and any(r.startswith("record of ") for r in reasons)
    assert sum(r.startswith("not JSON") for r in reasons) == 1                       # the invalid UTF-8
    assert any("id: String should have at most 200 characters" in r for r in reasons)


def test_offsets_are_committed_only_after_the_batch_is_durable(kafka_broker: TansuBroker, sqlite_engine: Any,
                                                                tmp_path: Path) -> None:
    config = make_config(tmp_path, threshold=0.99)                  # record only: no jobs to coalesce
    from automation.store import make_engine

    down = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")   # nothing listens there
    bodies = [event(share=0.5) for _ in range(25)]
    publish(kafka_broker.bootstrap, config.service.kafka.topic, bodies)
    running = RunningConsumer(config, down, kafka_broker.bootstrap)
    try:
        assert wait_for(lambda: running.consumer.stats.errors >= 2, 60)
        assert running.consumer.stats.consumed == 0
        running.consumer.engine = sqlite_engine                    # the database is back
        assert wait_for(lambda: len(recorded(sqlite_engine)) == 25, 60)
    finally:
        running.stop()
    # a new member of the group starts from the committed offsets: nothing is read twice
    publish(kafka_broker.bootstrap, config.service.kafka.topic, [event(share=0.5)])
    second = RunningConsumer(config, sqlite_engine, kafka_broker.bootstrap)
    try:
        assert wait_for(lambda: second.consumer.stats.consumed >= 1, 60)
    finally:
        second.stop()
    assert second.consumer.stats.consumed == 1 and second.consumer.stats.duplicates == 0
    assert len(recorded(sqlite_engine)) == 26


def test_consumer_survives_a_broker_restart(kafka_broker: TansuBroker, sqlite_engine: Any, tmp_path: Path) -> None:
    config = make_config(tmp_path, threshold=0.99)
    running = RunningConsumer(config, sqlite_engine, kafka_broker.bootstrap)
    try:
        publish(kafka_broker.bootstrap, config.service.kafka.topic, [event() for _ in range(5)])
        assert wait_for(lambda: len(recorded(sqlite_engine)) == 5, 60)
        kafka_broker.stop()
        time.sleep(3)                                                # the consumer sees the broker gone
        kafka_broker.start()                                         # same port, empty (in-memory) broker
        publish(kafka_broker.bootstrap, config.service.kafka.topic, [event() for _ in range(5)])
        assert wait_for(lambda: len(recorded(sqlite_engine)) == 10, 90), running.consumer.stats
        assert running.thread.is_alive()
    finally:
        running.stop()
    assert running.consumer.stats.duplicates == 0


@pytest.fixture
def durable_broker() -> Any:
    broker = TansuBroker(durable=True).start()
    yield broker
    broker.close()


def test_a_broker_restart_with_unconsumed_records_loses_and_repeats_nothing(durable_broker: TansuBroker,
                                                                          sqlite_engine: Any, tmp_path: Path) -> None:
    """The broker keeps its log (in S3): records published while no consumer ran survive its restart, are
    consumed once from the committed offsets, and make exactly the jobs they should."""
    config = make_config(tmp_path)
    topic = config.service.kafka.topic
    drifted = event(share=0.7)
    running = RunningConsumer(config, sqlite_engine, durable_broker.bootstrap)
    try:
        publish(durable_broker.bootstrap, topic, [drifted])
        assert wait_for(lambda: len(recorded(sqlite_engine)) == 1, 60), running.consumer.stats
    finally:
        running.stop()                                    # offsets committed; nobody consumes now
    unconsumed = [drifted] + [event(share=0.1) for _ in range(4)] + [event(model="digits_cnn", share=0.8)]
    publish(durable_broker.bootstrap, topic, unconsumed)
    durable_broker.stop()
    durable_broker.start()                                # same address; the log and the offsets are kept
    resumed = RunningConsumer(config, sqlite_engine, durable_broker.bootstrap)
    try:
        assert wait_for(lambda: resumed.consumer.stats.consumed >= len(unconsumed), 90), resumed.consumer.stats
        time.sleep(2)                                     # anything read twice would show by now
    finally:
        resumed.stop()
    assert resumed.consumer.stats.consumed == len(unconsumed)   # from the committed offset: none read again
    outcomes = sorted(r.outcome for r in recorded(sqlite_engine))
    assert outcomes == ["below_threshold"] * 4 + ["job", "job"] and resumed.consumer.stats.duplicates == 1
    assert sorted(j.model for j in queue.list_jobs(sqlite_engine)) == ["digits_cnn", "digits_mlp"]


def test_monitor_post_signs_its_event_and_hides_credentials_in_errors(engine: Any, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from automation.errors import MlgateError
    from tests.conftest import app_on_a_port
    from triggers.local_broker import free_port
    from triggers.drift.monitor import post_drift_event

    config = make_config(tmp_path)
    state = ServiceState(config=config, engine=engine, webhook_secret="x", metrics=ServiceMetrics(engine),
                         drift_secret=DRIFT_SECRET)
    with app_on_a_port(create_app(state)) as port:
        monkeypatch.delenv("MLGATE_DRIFT_SECRET", raising=False)
        monkeypatch.delenv("MLGATE_DRIFT_TOKEN", raising=False)
        with pytest.raises(MlgateError, match="needs MLGATE_DRIFT_SECRET or MLGATE_DRIFT_TOKEN"):
            post_drift_event(f"http://127.0.0.1:{port}/events/drift", event(share=0.9))
        monkeypatch.setenv("MLGATE_DRIFT_SECRET", DRIFT_SECRET)
        sent = event(share=0.9)
        assert post_drift_event(f"http://127.0.0.1:{port}/events/drift", sent).endswith("/events/drift")
        assert [e.id for e in drift.list_drift_events(engine)] == [sent["id"]]
        with pytest.raises(MlgateError) as refused:
            post_drift_event(f"http://ops:hunter2@127.0.0.1:{free_port()}/events/drift", event())
        assert "hunter2" not in str(refused.value) and "127.0.0.1" in str(refused.value)


def test_kafka_tls_and_sasl_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from automation.errors import UsageError
    from triggers.drift.consumer import security_from_env

    for name in ("KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD",
                 "KAFKA_SSL_CAFILE", "KAFKA_SSL_CERTFILE", "KAFKA_SSL_KEYFILE"):
        monkeypatch.delenv(name, raising=False)
    assert security_from_env() == {"security_protocol": "PLAINTEXT"}
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "sasl_ssl")
    with pytest.raises(UsageError, match="needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"):
        security_from_env()
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "scram-sha-512")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "mlgate")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "pw")
    monkeypatch.setenv("KAFKA_SSL_CAFILE", "/etc/ssl/kafka-ca.pem")
    assert security_from_env() == {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                                   "sasl_plain_username": "mlgate", "sasl_plain_password": "pw",
                                   "ssl_cafile": "/etc/ssl/kafka-ca.pem"}
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    with pytest.raises(UsageError, match="KAFKA_SASL_\\* is set"):
        security_from_env()
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "tls-please")
    with pytest.raises(UsageError, match="is not one of"):
        security_from_env()
    # the settings are ones kafka-python accepts: a consumer is built with them (no connection is made)
    from kafka import KafkaConsumer

    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.delenv("KAFKA_SSL_CAFILE")
    consumer = KafkaConsumer(bootstrap_servers="127.0.0.1:1", api_version=(2, 8), **security_from_env())
    consumer.close()
