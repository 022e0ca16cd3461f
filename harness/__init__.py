"""Harness: model, TP workers, Ray launcher, sweeps, results and reports."""
