"""Metrics, statistics and image reports."""
