"""Prefect entry points for `flows/prefect.yaml`: the flows live in the genloop package."""

from genloop.orchestrate.flows import collect_flow, loop_flow

__all__ = ["collect_flow", "loop_flow"]

if __name__ == "__main__":
    loop_flow()
