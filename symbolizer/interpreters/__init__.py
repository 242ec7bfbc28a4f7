"""Interpreters whose frames stand in for their eval loops: one package each."""
