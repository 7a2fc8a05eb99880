"""The federated simulation: Flower's ServerApp (the coordinator), its records, and the launcher."""
