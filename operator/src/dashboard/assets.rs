//! The page: static HTML, CSS and vanilla JavaScript compiled into the binary. Nothing is
//! fetched from elsewhere at run time.

pub const INDEX: &str = include_str!("assets/index.html");
pub const APP_JS: &str = include_str!("assets/app.js");
pub const APP_CSS: &str = include_str!("assets/app.css");
