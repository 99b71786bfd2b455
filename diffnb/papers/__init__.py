"""One thin module per paper, each built on diffnb's core primitives (processors, hooks, inversion)."""
