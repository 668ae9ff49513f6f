"""The Kafka drift consumer: at-least-once in, exactly one job out.

Each poll batch is decided in one transaction (`drift.decide_batch`); bad events go to the
dead-letter topic (acknowledged by the broker) first; only then are the offsets committed.
A crash between the two re-delivers the batch, and the event ids make the replay a no-op.
Broker errors never stop the loop: kafka-python reconnects, and we back off and retry.

No record can wedge the consumer. One that cannot be parsed, whatever it holds, is dead-lettered
with the reason. When the database refuses a batch, the consumer backs off (doubling, up to a
minute) while the database is down; if it answers, the events are decided one by one and the one
it refuses is parked on the dead-letter topic with the reason, so its neighbours go on.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from automation.config import MlgateConfig
from triggers.drift.events import BadEvent, DriftEvent, decide_batch, parse_event

log = logging.getLogger(__name__)

# Group timeouts chosen on purpose: kafka-python's default max_poll_interval_ms stalled the
# first join for more than 20 s against Tansu; a batch here takes milliseconds.
CONSUMER_SETTINGS: dict[str, Any] = {
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    "session_timeout_ms": 10_000,
    "heartbeat_interval_ms": 1_000,
    "max_poll_interval_ms": 60_000,
    "max_poll_records": 1_000,
    "request_timeout_ms": 15_000,
    "reconnect_backoff_max_ms": 2_000,
}


@dataclass
class ConsumerStats:
    consumed: int = 0
    jobs: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    errors: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


class DriftConsumer:
    """`run()` until `stop()`; safe to run in a thread of `mlgate serve`."""

    def __init__(self, config: MlgateConfig, engine: Engine, bootstrap_servers: str,
                 on_decision: Any = None) -> None:
        self.config, self.engine, self.bootstrap = config, engine, bootstrap_servers
        self.kafka = config.service.kafka
        self.stats = ConsumerStats()
        self.on_decision = on_decision   # callback(outcome: str) for metrics
        self._stop = threading.Event()
        self.ready = threading.Event()   # set once the group assigned partitions
        self._producer: Any = None

    def stop(self) -> None:
        self._stop.set()

    def _consumer(self) -> Any:
        from kafka import KafkaConsumer

        return KafkaConsumer(self.kafka.topic, bootstrap_servers=self.bootstrap, group_id=self.kafka.group_id,
                             client_id="mlgate-drift", **CONSUMER_SETTINGS, **security_from_env())

    def _dead_letter(self, record: Any, reason: str, outcome: str = "dead_letter") -> None:
        from kafka import KafkaProducer

        log.warning("drift event dead-lettered", extra={"offset": record.offset, "reason": reason,
                                                        "outcome": outcome})
        if self._producer is None:
            self._producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", retries=5,
                                           client_id="mlgate-dead-letter", **security_from_env())
        headers = [("mlgate.error", reason[:1000].encode()), ("mlgate.topic", record.topic.encode()),
                   ("mlgate.partition", str(record.partition).encode()), ("mlgate.offset", str(record.offset).encode())]
        # kafka-python refuses a record with neither key nor value, which other clients may have written
        key = record.key if record.key is not None or record.value is not None else b""
        self._producer.send(self.kafka.dead_letter_topic, value=record.value, key=key, headers=headers)
        self.stats.dead_lettered += 1
        if self.on_decision:
            self.on_decision(outcome)

    def process(self, records: list[Any]) -> None:
        """Decide a batch durably; raises if anything could not be made durable."""
        parsed: list[tuple[Any, DriftEvent]] = []
        for record in records:
            try:
                parsed.append((record, parse_event(record.value, self.config)))
            except BadEvent as exc:
                self._dead_letter(record, str(exc))
            except Exception as exc:   # whatever a record holds, it never stops the ones after it
                self._dead_letter(record, f"undecidable record: {type(exc).__name__}: {str(exc)[:200]}")
        try:
            decisions = decide_batch(self.engine, self.config, [event for _, event in parsed], source="kafka")
        except Exception:
            if not self._database_answers():
                raise                     # an outage: back off and read the batch again
            decisions = self._decide_one_by_one(parsed)
        if self._producer is not None:
            self._producer.flush(timeout=30)   # raises when the broker did not take them
        for decision in decisions:
            outcome = "duplicate" if decision.duplicate else decision.outcome
            self.stats.outcomes[outcome] = self.stats.outcomes.get(outcome, 0) + 1
            self.stats.jobs += outcome == "job"
            self.stats.duplicates += decision.duplicate
            if self.on_decision:
                self.on_decision(outcome)
        self.stats.consumed += len(records)

    def _database_answers(self) -> bool:
        from sqlalchemy import text

        try:
            with self.engine.connect() as conn:
                conn.execute(text("select 1"))
            return True
        except Exception:
            return False

    def _decide_one_by_one(self, parsed: list[tuple[Any, DriftEvent]]) -> list[Any]:
        """The database answers but refused the batch: decide each event alone; park the ones it refuses."""
        decisions = []
        for record, event in parsed:
            try:
                decisions.extend(decide_batch(self.engine, self.config, [event], source="kafka"))
            except Exception as exc:
                if not self._database_answers():
                    raise
                self._dead_letter(record, f"parked: the database refused it: {type(exc).__name__}: "
                                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''}", "parked")
        return decisions

    def run(self) -> None:
        from kafka.errors import KafkaError

        consumer = None
        failures = 0   # consecutive: the back-off doubles, so a refusing database is never hammered
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = self._consumer()
                batches = consumer.poll(timeout_ms=500)
                if consumer.assignment():
                    self.ready.set()
                records = [r for batch in batches.values() for r in batch]
                if records:
                    try:
                        self.process(records)
                    except BaseException:
                        # nothing of this poll is committed: rewind so it is read again
                        for partition, batch in batches.items():
                            consumer.seek(partition, batch[0].offset)
                        raise
                    consumer.commit()
                failures = 0
            except KafkaError as exc:
                # retriable or not, the answer is the same: keep the uncommitted offsets, back off, go on
                self.stats.errors += 1
                log.warning("kafka error; retrying", extra={"error": f"{type(exc).__name__}: {exc}"})
                self._stop.wait(1.0)
            except Exception as exc:
                self.stats.errors += 1
                failures += 1
                log.error("drift batch failed; it will be read again",
                          extra={"error": f"{type(exc).__name__}: {exc}", "retry_in": min(60.0, 2.0 ** failures)})
                self._stop.wait(min(60.0, 2.0 ** failures))
        if consumer is not None:
            consumer.close(autocommit=False)
        if self._producer is not None:
            self._producer.close(timeout=5)


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")
# environment variable -> kafka-python setting; secrets come from the environment, never mlgate.yaml
SECURITY_ENV = {"KAFKA_SASL_MECHANISM": "sasl_mechanism", "KAFKA_SASL_USERNAME": "sasl_plain_username",
                "KAFKA_SASL_PASSWORD": "sasl_plain_password", "KAFKA_SSL_CAFILE": "ssl_cafile",
                "KAFKA_SSL_CERTFILE": "ssl_certfile", "KAFKA_SSL_KEYFILE": "ssl_keyfile"}


def security_from_env() -> dict[str, str]:
    """TLS and SASL settings for every Kafka client mlgate makes, from KAFKA_SECURITY_PROTOCOL and friends."""
    from automation.errors import UsageError

    protocol = os.environ.get("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT").upper()
    if protocol not in SECURITY_PROTOCOLS:
        raise UsageError(f"KAFKA_SECURITY_PROTOCOL={protocol!r} is not one of {', '.join(SECURITY_PROTOCOLS)}")
    settings = {setting: os.environ[name] for name, setting in SECURITY_ENV.items() if os.environ.get(name)}
    if protocol.startswith("SASL"):
        mechanism = settings.setdefault("sasl_mechanism", "PLAIN").upper()
        if mechanism not in SASL_MECHANISMS:
            raise UsageError(f"KAFKA_SASL_MECHANISM={mechanism!r} is not one of {', '.join(SASL_MECHANISMS)}")
        settings["sasl_mechanism"] = mechanism
        if mechanism != "OAUTHBEARER" and not ("sasl_plain_username" in settings and "sasl_plain_password" in settings):
            raise UsageError(f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD")
    elif any(name.startswith("KAFKA_SASL") for name in SECURITY_ENV if os.environ.get(name)):
        raise UsageError("KAFKA_SASL_* is set but KAFKA_SECURITY_PROTOCOL is not SASL_PLAINTEXT or SASL_SSL")
    return {"security_protocol": protocol, **settings}


def publish(bootstrap_servers: str, topic: str, events: list[dict[str, Any]], timeout: float = 30.0) -> None:
    """Send drift events (keyed by model, so a model's events stay in order) and wait for acks."""
    import json

    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", retries=5, linger_ms=5,
                             **security_from_env())
    try:
        for event in events:
            producer.send(topic, key=event["data"]["model"].encode(), value=json.dumps(event).encode())
        producer.flush(timeout=timeout)
    finally:
        producer.close(timeout=timeout)
