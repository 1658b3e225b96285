//! API keys, users, JWT (placeholder while being written).
