"""Human feedback: the store, review app, importers, collect intake and feedback-driven tuning."""
