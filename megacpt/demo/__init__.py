"""The embedded study (`megacpt demo`): FinPythia's data-selection experiment end to end at toy scale.

- ``corpora/``: real text fetched through the package registries (or a synthetic stand-in) -> JSONL corpora
- ``stages.py``: resumable stages recorded in a manifest (sizes + SHA-256 of every output)
- ``pipeline.py``: the stages of the study, each one or more public ``megacpt`` commands
- ``report.py``: results -> report.md / report.html / report.json
- ``cli.py``: ``megacpt demo``'s flags
"""
