//! Configuration: the YAML file format and its validated, typed form.
//!
//! `model` is the contract the rest of the gateway consumes. The loader is a pipeline:
//! `raw` parses YAML into a position-less tree, `validate` converts that tree into the
//! model collecting every problem with its YAML path, and `lines` maps those paths back to
//! line numbers by scanning the source. A `Config` is only ever returned when there were no
//! problems at all.

mod describe;
mod error;
mod lines;
pub mod model;
mod raw;
mod units;
mod validate;

#[cfg(test)]
mod tests;

use std::path::Path;

pub use describe::describe;
pub use error::{ConfigError, ConfigErrors};
pub use model::*;

/// Parses and validates a configuration held in memory. `file_name` only labels errors;
/// relative file paths in the configuration are kept as written.
pub fn from_yaml_str(source: &str, file_name: &str) -> Result<Config, ConfigErrors> {
    parse(source, file_name, None)
}

/// Reads, parses and validates a configuration file. Relative certificate, key and CA
/// paths in it are resolved against the directory of the file, so the gateway can be
/// started from anywhere.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let file_name = path.display().to_string();
    let source = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file_name.clone(),
        line: None,
        path: String::new(),
        problem: format!("cannot read the configuration file: {e}"),
    })?;
    let base_dir = path.parent().unwrap_or(Path::new(""));
    parse(&source, &file_name, Some(base_dir))
}

fn parse(source: &str, file_name: &str, base_dir: Option<&Path>) -> Result<Config, ConfigErrors> {
    let index = lines::LineIndex::build(source);
    let raw = raw::parse(source).map_err(|e| {
        let repeat = e
            .duplicate_key
            .as_deref()
            .and_then(|k| index.duplicate_key(k));
        let (line, path, problem) = match (repeat, e.duplicate_key) {
            (Some((path, line)), Some(key)) => {
                let first = index
                    .line_of(path)
                    .map(|l| format!(" (first set on line {l})"))
                    .unwrap_or_default();
                (
                    Some(line),
                    Some(path),
                    format!("duplicate key {key:?}{first}"),
                )
            }
            _ => (
                e.line,
                e.line.and_then(|line| index.path_at(line)),
                e.message,
            ),
        };
        ConfigError {
            file: file_name.to_owned(),
            line,
            path: path.map(ToString::to_string).unwrap_or_default(),
            problem,
        }
    })?;
    validate::validate(&raw, base_dir).map_err(|problems| {
        let mut errors: Vec<ConfigError> = problems
            .into_iter()
            .map(|p| ConfigError {
                file: file_name.to_owned(),
                line: index.line_of(&p.path),
                path: p.path.to_string(),
                problem: p.message,
            })
            .collect();
        // Validation order follows the schema (routes after upstreams, cross-checks last);
        // file order is what someone fixing the file reads along.
        errors.sort_by_key(|e| e.line);
        ConfigErrors { errors }
    })
}
