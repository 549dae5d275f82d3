"""The embedded default: `make base` (demo/base.py) builds the shipped base model, `make demo` (demo/run.py) runs the pipeline."""
