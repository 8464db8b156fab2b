//! The YAML syntax layer: the only file that names the YAML crate.
//!
//! It turns the source text into a [`Raw`] tree that keeps mapping order and nothing
//! YAML-specific, so that `validate` can be written (and the YAML crate swapped) without
//! caring about the parser. Aliases and merge keys (`<<: *defaults`) are already resolved
//! in the tree; positions are not kept (see `lines.rs` for those).

use std::fmt;

/// A parsed YAML value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Raw {
    /// An empty value (`key:` with nothing after it) or an explicit `null` / `~`.
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Raw>),
    /// In file order. Non-string scalar keys are kept as their text (`1:` is `"1"`).
    Map(Vec<(String, Raw)>),
    /// A value with an explicit tag such as `!include x`, which the schema never uses.
    Tagged(String),
}

impl Raw {
    /// Describes the kind of value for "expected X, found Y" messages.
    pub(crate) fn kind(&self) -> String {
        match self {
            Raw::Null => "an empty value".into(),
            Raw::Bool(b) => format!("the boolean {b}"),
            Raw::Int(n) => format!("the number {n}"),
            Raw::Float(x) => format!("the number {x}"),
            Raw::Str(s) => format!("the string {s:?}"),
            Raw::Seq(_) => "a list".into(),
            Raw::Map(_) => "a mapping".into(),
            Raw::Tagged(tag) => format!("a value tagged {tag} (tags are not supported)"),
        }
    }
}

/// A document the YAML parser rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    /// 1-based, when the parser knows it.
    pub(crate) line: Option<usize>,
    pub(crate) message: String,
    /// For a repeated mapping key, the key: the parser's position is that of the mapping,
    /// so the caller looks for the repeat itself.
    pub(crate) duplicate_key: Option<String>,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

pub(crate) fn parse(source: &str) -> Result<Raw, SyntaxError> {
    let syntax = |e: serde_yaml::Error| {
        let message = e.to_string();
        // "duplicate entry with key \"k\"", prefixed by the mapping's path when nested.
        let marker = "duplicate entry with key \"";
        let duplicate_key = message
            .find(marker)
            .and_then(|at| message[at + marker.len()..].split_once('"'))
            .map(|(key, _)| key.to_owned());
        SyntaxError {
            line: e.location().map(|l| l.line()),
            message: format!("invalid YAML: {message}"),
            duplicate_key,
        }
    };
    let mut value: serde_yaml::Value = serde_yaml::from_str(source).map_err(syntax)?;
    value.apply_merge().map_err(syntax)?;
    Ok(convert(value))
}

fn convert(value: serde_yaml::Value) -> Raw {
    use serde_yaml::Value;
    match value {
        Value::Null => Raw::Null,
        Value::Bool(b) => Raw::Bool(b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Raw::Int(i.into())
            } else if let Some(u) = n.as_u64() {
                Raw::Int(u.into())
            } else {
                Raw::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => Raw::Str(s),
        Value::Sequence(items) => Raw::Seq(items.into_iter().map(convert).collect()),
        Value::Mapping(map) => Raw::Map(
            map.into_iter()
                .map(|(k, v)| (key_text(k), convert(v)))
                .collect(),
        ),
        Value::Tagged(tagged) => Raw::Tagged(tagged.tag.to_string()),
    }
}

/// Keys are names in this schema; a non-string key becomes its text so that the unknown-key
/// check reports it like any other misspelling.
fn key_text(key: serde_yaml::Value) -> String {
    use serde_yaml::Value;
    match key {
        Value::String(s) => s,
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Sequence(_) | Value::Mapping(_) | Value::Tagged(_) => "(complex key)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_scalar_kinds() {
        let raw = parse("b: 1\na: [x, true, ~, 2.5, -3]\n1: k\n").unwrap();
        let Raw::Map(entries) = raw else {
            panic!("expected a map")
        };
        let keys: Vec<_> = entries.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["b", "a", "1"]);
        assert_eq!(
            entries[1].1,
            Raw::Seq(vec![
                Raw::Str("x".into()),
                Raw::Bool(true),
                Raw::Null,
                Raw::Float(2.5),
                Raw::Int(-3)
            ])
        );
    }

    #[test]
    fn resolves_aliases_and_merge_keys() {
        let raw = parse("base: &b {x: 1}\nuse:\n  <<: *b\n  y: 2\n").unwrap();
        let Raw::Map(entries) = raw else {
            panic!("expected a map")
        };
        let Raw::Map(used) = &entries[1].1 else {
            panic!("expected a map")
        };
        let keys: Vec<_> = used.iter().map(|(k, _)| k.as_str()).collect();
        assert!(keys.contains(&"x") && keys.contains(&"y") && !keys.contains(&"<<"));
    }

    #[test]
    fn syntax_errors_carry_a_line() {
        let err = parse("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert!(err.line.is_some(), "{err:?}");
        let dup = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert!(dup.message.contains("duplicate"), "{dup:?}");
        assert_eq!(dup.duplicate_key.as_deref(), Some("a"));
        assert_eq!(parse("").unwrap(), Raw::Null);
        assert!(
            matches!(parse("x: !tag 1\n").unwrap(), Raw::Map(m) if matches!(m[0].1, Raw::Tagged(_)))
        );
    }
}
