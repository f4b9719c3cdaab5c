"""The scoring pass: per-document NLL of an indexed dataset under a model, as a library.

- ``nll``: the definition and the fast batched computation (``chunk_nll``, ``sequence_nll``,
  ``score_documents``), fused output layer, no [N, V] logits; also what ``eval`` uses.
- ``job``: ``score_dataset``, the pass over a whole dataset: sharded, resumable, data parallel.
- ``parallel``: tensor/pipeline-parallel layouts of the model for the pass.
- ``files``: score files (Parquet keyed by ``doc_id`` + metadata) and their resumable sharded writer,
  shared by every scorer (``selection``'s POS entropy, similarity and DSIR too).
- ``cli``: `megacpt score perplexity`; ``flags``: the flags every scorer shares.

Nothing is imported here: ``files`` and ``flags`` are what the text scorers of ``selection`` need, and they
must not pay for torch and the model stack that ``nll``/``job``/``parallel`` import.
"""
