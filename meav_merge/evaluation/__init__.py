"""Measuring what a vector does: preference accuracy, fast re-weighted scoring, λ sweeps, tables, judged generation, and the multi-domain coefficient search."""
