"""Airflow hooks of the provider (import only inside Airflow)."""
