"""The pipeline: one module per stage of dvc.yaml (`stages/<stage>.py` is its thin CLI)."""
