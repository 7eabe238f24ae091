pub mod config;
pub mod plugins;
