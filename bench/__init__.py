"""Benchmarks against peers (LangGraph, Celery): ``python -m bench`` runs them all.

Never run in CI and never timed in tests: the figures depend on the machine and its load.
"""
