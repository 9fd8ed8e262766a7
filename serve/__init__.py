"""Ray Serve endpoints over the MLflow-registered models (issue 6: not built yet)."""
