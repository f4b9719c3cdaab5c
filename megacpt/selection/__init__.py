"""Data selection for DACP (docs/method.md §2): per-document scorers, rank combination, budgeted sampling.

Scorers (`megacpt score ...`) write Parquet files keyed by ``doc_id`` (0-based document index of an
indexed dataset) whose schema metadata names the dataset they score (`scores.py`); `megacpt select`
combines them into a subset written as a new indexed dataset plus a manifest; `megacpt report
selection` summarises one or several selections.
"""
