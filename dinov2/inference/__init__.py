"""Inference over whole scenes: inputs (`sources`), windowed reading (`reader`), chip layout and blending
(`grid`), normalisation statistics (`normstats`), writers (COG, GeoParquet), the embedding loop (`embed`) and
similarity search over chip embeddings (`search`). Optional libraries are imported where they are used.
"""
