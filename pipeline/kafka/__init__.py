"""Live streams over Kafka: embedded broker, ingest, prompts, dead letters, recovering producer.

See README.md in this folder for the wire format, delivery guarantees and how `masklet run` plugs in.
"""
