"""warehouse of lmlm-pipeline."""
