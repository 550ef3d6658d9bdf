//! The HTTP side (placeholder while the engine compiles).
pub mod sse;
