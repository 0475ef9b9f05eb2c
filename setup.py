"""Packaging of palmflow for Beam workers (Dataflow): pass `--setup_file=./setup.py`.

Beam builds a source distribution of this directory when the job is submitted
(`python setup.py sdist`, or `python -m build --sdist` where `build` is installed) and every
worker pip-installs it before running a DoFn, so the job's modules (`pipelines`, `tasks`,
`mixtures`, `palmflow`, `infra`) import on the workers exactly as they do locally.

Name, version and the packages to include are declared once, in `pyproject.toml`
(`[tool.setuptools.packages.find]`). This file adds what a worker must install besides
apache-beam (which the worker image already has): `WORKER_REQUIREMENTS`, pinned as in
`requirements.txt` (a test keeps the two in step). setuptools honours `install_requires` from
here only where `pyproject.toml` lists `dependencies` under `[project] dynamic`.

Submit commands: infra/README.md.
"""
import setuptools

# What the Beam jobs (pipelines/) import on a worker, pinned as in requirements.txt.
# The trainer's packages (jax, flax, optax, orbax, ...) are not needed there.
WORKER_REQUIREMENTS = [
    "sentencepiece==0.2.1",     # Tokenize (pipelines/blocks.py), vocabulary sample
    "numpy==2.4.6",
    "protobuf==6.33.6",
    "tensorflow==2.21.0",       # tf.Example records (blocks, tfrecord ingest)
    "pyarrow==25.0.1",          # parquet ingest
    "array_record==0.8.6",      # --format=array_record
    "tensorflow-datasets==4.9.10",  # tfds ingest
]

if __name__ == "__main__":
  setuptools.setup(install_requires=WORKER_REQUIREMENTS)
