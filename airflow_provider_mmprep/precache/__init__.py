"""The precache_encodings pipeline pieces (torch needed; imported lazily by the stage).

- :mod:`.data`: tar indexing, NeMo's image transform, and the batch dataset the DataLoader workers run.
- :mod:`.engine`: one encoder process per device: encoders under ``inference_mode``, results handed off.
- :mod:`.writer`: the writer thread: pickles per sample, output tars under a temporary name, manifests.
"""
