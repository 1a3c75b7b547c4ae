"""ml_collections config files for train.py and eval.py (`--config configs/<name>.py`)."""
