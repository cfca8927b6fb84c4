"""`surge plan`: what a model needs on given hardware, from its config alone (no weights)."""
