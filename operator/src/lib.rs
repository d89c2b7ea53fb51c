//! The Weir operator and command-line tool.

pub mod dashboard;
pub mod graph;
pub mod lint;
pub mod manifest;
pub mod messaging;
pub mod operator;
pub mod render;
pub mod up;
