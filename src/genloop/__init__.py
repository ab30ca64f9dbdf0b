"""genloop: a generative-AI data flywheel on Prefect, MLflow and DVC.

Importing the package has no side effects: no folders are made, no tracking URI is set
and no server is contacted until a stage runs.
"""

__version__ = "0.1.0"
