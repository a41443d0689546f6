"""Long-running processes: the relay (event store -> JetStream), the inference worker
(JetStream -> Triton -> events) and the projector (JetStream -> read models)."""
