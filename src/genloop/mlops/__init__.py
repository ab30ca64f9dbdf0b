"""Everything that talks to MLflow (runs, registry aliases, the pyfunc model) and to the DVC remote."""
