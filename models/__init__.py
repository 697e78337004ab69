"""models of lmlm-pipeline."""
