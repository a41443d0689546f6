"""What every process runs on: settings, logs and signals, metrics, traces, bounded PostgreSQL sessions."""
