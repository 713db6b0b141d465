"""Prefect flows: compose tasks; no torch code here."""
