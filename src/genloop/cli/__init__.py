"""The command line (typer): one command per stage, `loop`, services, review and feedback."""
