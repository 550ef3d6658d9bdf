//! carewall: an OpenAI-compatible streaming moderation gateway for
//! mental-health support chat. See `ARCHITECTURE.md` for the code map.

pub mod admin;
pub mod audit;
pub mod classifier;
pub mod cli;
pub mod config;
pub mod demo;
pub mod error;
pub mod logging;
pub mod moderation;
pub mod policy;
pub mod proxy;
pub mod telemetry;
