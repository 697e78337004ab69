"""flows of lmlm-pipeline."""
