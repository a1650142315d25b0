"""This machine's servers and environment: `gptflow up`/`down`, the record of the servers it
started, the embedded Prefect server's watcher and the environment defaults every entry point
applies. Imports no flow."""
