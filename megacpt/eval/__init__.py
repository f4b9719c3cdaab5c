"""Evaluation: financial tasks (FPB, FiQA SA, Headline, NER, custom), held-out perplexity, lm-eval export."""
