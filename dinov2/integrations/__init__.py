"""Adapters to other frameworks (Hugging Face Hub, TerraTorch). Each imports its framework only when used; the
frameworks are extras of the package (`hub`, `terratorch`)."""
