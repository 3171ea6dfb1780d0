"""Data: sensor registry, datasets, augmentations, collate, masking and loaders.

Kept import-light: nothing here is imported by `dinov2.models` or `hubconf`.
"""
