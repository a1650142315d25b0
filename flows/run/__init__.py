"""What wraps a flow run: its context (preflight, cancel watch, parent MLflow run), the
concurrency slots and their leases, the training stages' retries and the gate's events."""
