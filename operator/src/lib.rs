//! The Weir operator and command-line tool.

pub mod manifest;
pub mod operator;
pub mod render;
