"""Prefect flows and thin tasks over pipeline/ and scorers/. The only package that imports prefect."""
