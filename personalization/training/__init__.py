"""Training a side network and measuring it: data → features (taps, cached) → train → calibrate
→ checkpoint → evaluate; `experiment` runs the whole pipeline for one dataset and setting."""
