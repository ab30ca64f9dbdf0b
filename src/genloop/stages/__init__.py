"""The eight stages of the loop, each a module with `run(cfg, ws) -> dict`; `table` lists them."""
