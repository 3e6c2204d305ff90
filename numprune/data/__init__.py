"""Offline assets (embedded model, corpora) and the token windows drawn from text sources."""
