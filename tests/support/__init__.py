"""Test helpers: plan factories and drivers for the runtime, multi-process groups, tokenizer
fixtures. They live here, not in the packages, so they never ship in the wheel."""
