"""The pipeline: one module per DVC stage of dvc.yaml, each running its stage (`stages/<stage>.py` is the thin CLI)."""
