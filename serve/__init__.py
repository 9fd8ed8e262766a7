"""The HTTP endpoint: Ray Serve + FastAPI over the MLflow-registered generalist (serve/README.md)."""
