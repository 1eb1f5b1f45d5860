"""First-party rewards: OCR, compositional checker, CLIP-based preference models, reward servers.

Modules stay light to import; engines and weights are built in each reward's ``load()``.
"""
