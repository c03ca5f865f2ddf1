"""The study tooling, apart from the pipeline: the grid as DVC experiments, the report, the Ray cluster."""
