"""The user's device: private side network, local history, HTTP client to the cloud."""
