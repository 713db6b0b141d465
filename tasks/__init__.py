"""Prefect tasks: thin wrappers with retries, logging and I/O around one core call each."""
