"""Helpers with no stage of their own: every stage may import them, and they import nothing else of ours."""
