//! Built-in benchmark (used by `omniq bench`).
