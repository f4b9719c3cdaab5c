"""Fused kernels (one fused op per file, each with its pure-torch reference beside it).

They live inside the package: a top-level folder named ``kernels`` would shadow Hugging Face's ``kernels``
distribution, which transformers imports."""
