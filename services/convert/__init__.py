"""The convert service."""
