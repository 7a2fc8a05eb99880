"""The benchmarks: each module measures one claim and writes `benchmarks/results/<name>.json`;
its `render(results)` turns that file into the Markdown tables the docs site shows."""
