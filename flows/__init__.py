"""Prefect layer: flows and tasks that orchestrate curation/ and training/, nothing more.

Importing it changes nothing: Winnow's Prefect defaults are applied by
:func:`flows.prefect_env.configure_prefect`, called where a server may start.
"""
