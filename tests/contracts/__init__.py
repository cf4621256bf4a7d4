"""Cross-cutting guarantees: import rules, docs, determinism, fuzzing, faults, cancel, options."""
