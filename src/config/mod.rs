//! Service configuration and the map: reading, layering (defaults < file < environment
//! < command line) and validation, with errors that name the file, line and key.
//! Everything else receives checked, typed values and never sees raw TOML.

mod cli;
mod error;
mod map;
mod service;
mod tree;
mod yaml;

pub use cli::{parse_cli, usage, Args, Command};
pub use error::{ConfigError, Origin};
pub use map::{Map, Mode, SourceMap, SourceUrl, TableMap};
pub use service::{
    AppConfig, Config, DatabaseConfig, LogFormat, LogsConfig, OnError, OnSlotLost, ServerConfig,
    SEARCH_PATH,
};
