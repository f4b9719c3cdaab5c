"""The scoring pass: per-document NLL of an indexed dataset under a model, as a library.

- ``nll``: the definition and the fast batched computation (``chunk_nll``, ``sequence_nll``,
  ``score_documents``), fused output layer, no [N, V] logits; also what ``eval`` uses.
- ``job``: ``score_dataset``, the pass over a whole dataset: sharded, resumable, data parallel.
- ``parallel``: tensor/pipeline-parallel layouts of the model for the pass.
- ``files``: score files (Parquet keyed by ``doc_id`` + metadata) and their resumable sharded writer,
  shared by every scorer (``selection``'s POS entropy, similarity and DSIR too).
- ``cli``: `megacpt score perplexity`.
"""
from megacpt.score.job import check_vocab, score_dataset
from megacpt.score.nll import ScoringConfig, chunk_nll, chunk_spans, score_documents, sequence_nll
from megacpt.score.parallel import PipelineStageScorer, parallel_scoring_model

__all__ = ["ScoringConfig", "chunk_nll", "sequence_nll", "score_documents", "score_dataset", "chunk_spans",
           "check_vocab", "PipelineStageScorer", "parallel_scoring_model"]
