"""The model zoo: one file per model, each with `build(**params)` and `load_data(**data)`.

A model is registered by adding a block to `mlgate.yaml` that names its module;
nothing in `automation/` changes.
"""
