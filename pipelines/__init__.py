"""Dagster-free stage logic of the deliberative-alignment pipeline. `python -m pipelines --help` lists the stages."""
