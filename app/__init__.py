"""Gradio UI and the `spa` command line: the top of the dependency graph."""
