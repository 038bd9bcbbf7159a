//! sessio-engine: placeholder.
