//! Limits (placeholder while being written).
