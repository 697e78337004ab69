"""tasks of lmlm-pipeline."""
