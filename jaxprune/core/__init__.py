"""Layer 1: parameter trees, masks, budgets, schedules of budgets, results and progress.

Imports nothing from the rest of jaxprune; every other layer builds on it.
"""
