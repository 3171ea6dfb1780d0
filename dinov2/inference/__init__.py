"""Inference over whole scenes: inputs (`sources`, STAC items and searches in `stac`), windowed reading
(`reader`), chip layout and blending (`grid`), normalisation statistics (`normstats`), writers (COG, GeoParquet),
outputs in a folder or object storage (`output_store`), the embedding loop (`embed`) and similarity search over
chip embeddings (`index`, `search`). Optional libraries are imported where they are used.
"""
