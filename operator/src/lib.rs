//! The Weir operator and command-line tool.

pub mod graph;
pub mod lint;
pub mod manifest;
pub mod messaging;
pub mod operator;
pub mod render;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod up;
