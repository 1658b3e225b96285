//! CORS (placeholder).
