"""Prefect flows and thin tasks over pipeline/ and scorers/. The only package that imports prefect."""
import os

# Set before prefect is imported (the package is imported before any of its modules):
# no analytics, nothing waiting on the internet, and room for the local server's first start
# (database migrations take ~15 s on a busy 2-core machine; Prefect's default limit is 20 s).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
