"""Operations: health status, Prometheus metrics, webhook alerts and structured logs (plain modules, no Dagster)."""
