//! A YAML path -> line number index, built by scanning the source text.
//!
//! The YAML parser gives values without positions, so error messages get their line from
//! here instead. The scanner understands block-style YAML (indented `key:` lines, `- `
//! items, indentless sequences, `- key: v` items, comments, quoted keys, block scalars)
//! and deliberately nothing more: whatever it cannot follow (flow collections, aliases,
//! complex keys) simply has no entry, and [`LineIndex::line_of`] falls back to the
//! nearest ancestor that has one. A wrong guess can therefore only make a line less
//! precise, never point into an unrelated part of the file, because every recorded path
//! is a real prefix chain of keys and items seen in order.
//!
//! Lines are 1-based, as editors and the YAML parser count them.

use std::collections::HashMap;
use std::fmt;

/// One step of a path into the YAML document.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// A path from the document root, displayed as `routes[1].sticky.query`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub(crate) struct YamlPath(pub(crate) Vec<Seg>);

impl YamlPath {
    pub(crate) fn root() -> Self {
        Self(Vec::new())
    }

    pub(crate) fn key(&self, key: &str) -> Self {
        let mut segs = self.0.clone();
        segs.push(Seg::Key(key.to_owned()));
        Self(segs)
    }

    pub(crate) fn index(&self, index: usize) -> Self {
        let mut segs = self.0.clone();
        segs.push(Seg::Index(index));
        Self(segs)
    }

    pub(crate) fn parent(&self) -> Option<Self> {
        let (_, rest) = self.0.split_last()?;
        Some(Self(rest.to_vec()))
    }
}

impl fmt::Display for YamlPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(top level)");
        }
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Index(n) => write!(f, "[{n}]")?,
                // Keys that would read as path syntax (upstream names with dots, say) are
                // quoted so the path stays unambiguous.
                Seg::Key(k) if !is_plain_key(k) => write!(f, "[{k:?}]")?,
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
            }
        }
        Ok(())
    }
}

fn is_plain_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Where each block-style key and list item starts.
#[derive(Debug, Default)]
pub(crate) struct LineIndex {
    lines: HashMap<YamlPath, usize>,
    /// Keys seen again in the same mapping, with the line of the repeat.
    duplicates: Vec<(YamlPath, usize)>,
}

impl LineIndex {
    pub(crate) fn build(source: &str) -> Self {
        let mut scanner = Scanner::default();
        for (i, line) in source.lines().enumerate() {
            scanner.line(i + 1, line.strip_suffix('\r').unwrap_or(line));
        }
        Self {
            lines: scanner.lines,
            duplicates: scanner.duplicates,
        }
    }

    /// The line of `path`, or of its nearest ancestor the scanner saw; `None` only when no
    /// ancestor has a line (the root, or a document written entirely in flow style).
    pub(crate) fn line_of(&self, path: &YamlPath) -> Option<usize> {
        let mut current = Some(path.clone());
        while let Some(p) = current {
            if let Some(&line) = self.lines.get(&p) {
                return Some(line);
            }
            current = p.parent();
        }
        None
    }

    /// The path of the entry starting on `line`: context for a syntax error, where the
    /// parser knows the line but not which setting it belongs to. Only an exact line
    /// counts: near a syntax error the scanner may be as lost as the parser.
    pub(crate) fn path_at(&self, line: usize) -> Option<&YamlPath> {
        self.lines
            .iter()
            .filter(|&(_, &l)| l == line)
            // An item and the key on its `- key:` line: the key says more.
            .max_by_key(|&(p, _)| p.0.len())
            .map(|(p, _)| p)
    }

    /// The first repeat of a mapping key named `key`, for the parser's duplicate-key
    /// error, which only gives the position of the whole mapping.
    pub(crate) fn duplicate_key(&self, key: &str) -> Option<(&YamlPath, usize)> {
        self.duplicates
            .iter()
            .find(|(p, _)| matches!(p.0.last(), Some(Seg::Key(k)) if k == key))
            .map(|(p, line)| (p, *line))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Map,
    Seq,
}

/// A block collection being scanned: its entries start at column `col`.
#[derive(Debug)]
struct Frame {
    col: usize,
    kind: Kind,
    path: YamlPath,
    next_index: usize,
    /// The path of the latest key or item, which a more indented line belongs to.
    last: Option<YamlPath>,
    /// Whether the latest entry had no inline value, so a nested block may follow.
    open: bool,
}

/// Lines that belong to a value started on an earlier line and hold no keys.
#[derive(Debug, Clone, Copy)]
enum Skip {
    None,
    /// A `|` or `>` scalar: lines more indented than the owning entry (or blank).
    BlockScalar {
        owner_col: usize,
    },
    /// A flow collection spanning lines: until the brackets balance.
    Flow {
        depth: usize,
    },
    /// A quoted scalar spanning lines: until the quote closes.
    Quoted {
        quote: u8,
    },
}

#[derive(Debug)]
struct Scanner {
    stack: Vec<Frame>,
    skip: Skip,
    lines: HashMap<YamlPath, usize>,
    duplicates: Vec<(YamlPath, usize)>,
}

impl Default for Scanner {
    fn default() -> Self {
        Self {
            stack: Vec::new(),
            skip: Skip::None,
            lines: HashMap::new(),
            duplicates: Vec::new(),
        }
    }
}

impl Scanner {
    fn line(&mut self, number: usize, line: &str) {
        let col = line.len() - line.trim_start_matches(' ').len();
        let text = &line[col..];
        let blank = text.trim().is_empty() || text.starts_with('#');

        match self.skip {
            Skip::None => {}
            Skip::BlockScalar { owner_col } => {
                if blank || col > owner_col {
                    return;
                }
                self.skip = Skip::None;
            }
            Skip::Flow { depth } => {
                self.skip = continue_flow(text, depth);
                return;
            }
            Skip::Quoted { quote } => {
                if let Some(end) = closing_quote(text.as_bytes(), 0, quote) {
                    self.skip = Skip::None;
                    self.after_value(&text[end + 1..], col);
                }
                return;
            }
        }
        if blank || (col == 0 && (text.starts_with("---") || text.starts_with("..."))) {
            return;
        }
        // YAML forbids tabs in indentation; the parser reports the line, and guessing its
        // depth here could only attach later lines to the wrong parent.
        if text.starts_with('\t') {
            return;
        }
        if text.starts_with('%') && col == 0 {
            return;
        }
        self.entry_line(number, col, text);
    }

    fn entry_line(&mut self, number: usize, col: usize, text: &str) {
        let dash = is_dash(text);
        while self.stack.last().is_some_and(|f| f.col > col) {
            self.stack.pop();
        }
        // An indentless sequence (`key:` then `- item` at the key's column) ends at the
        // first line of that column that is not an item.
        if !dash
            && self
                .stack
                .last()
                .is_some_and(|f| f.col == col && f.kind == Kind::Seq)
            && self.stack.len() >= 2
            && self.stack[self.stack.len() - 2].col == col
        {
            self.stack.pop();
        }
        let kind = if dash { Kind::Seq } else { Kind::Map };
        match self.stack.last_mut() {
            None => self.stack.push(Frame::new(col, kind, YamlPath::root())),
            Some(top) if top.col == col => {
                if top.kind != kind {
                    // Only `key:` followed by `- item` at the same column is valid YAML.
                    if top.kind == Kind::Map && top.open {
                        let path = top.last.clone().unwrap_or_default();
                        top.open = false;
                        self.stack.push(Frame::new(col, Kind::Seq, path));
                    } else {
                        return;
                    }
                }
            }
            Some(top) => {
                if !top.open {
                    // A continuation of a multi-line plain scalar.
                    return;
                }
                let path = top.last.clone().unwrap_or_default();
                top.open = false;
                self.stack.push(Frame::new(col, kind, path));
            }
        }
        self.entry(number, col, text);
    }

    /// Scans the entry at `col` of the innermost frame, which has the right kind.
    fn entry(&mut self, number: usize, col: usize, text: &str) {
        let Some(top) = self.stack.last_mut() else {
            return;
        };
        match top.kind {
            Kind::Seq => {
                let item = top.path.index(top.next_index);
                top.next_index += 1;
                self.lines.entry(item.clone()).or_insert(number);
                top.last = Some(item.clone());
                let after = &text[1..];
                let rest = after.trim_start_matches(' ');
                let rest_col = col + 1 + (after.len() - rest.len());
                if rest.is_empty() || rest.starts_with('#') {
                    top.open = true;
                    return;
                }
                top.open = false;
                if is_dash(rest) {
                    self.stack.push(Frame::new(rest_col, Kind::Seq, item));
                    self.entry(number, rest_col, rest);
                } else if split_key(rest).is_some() {
                    self.stack.push(Frame::new(rest_col, Kind::Map, item));
                    self.entry(number, rest_col, rest);
                } else {
                    self.after_value(rest, col);
                }
            }
            Kind::Map => {
                let Some((key, value)) = split_key(text) else {
                    return;
                };
                let path = top.path.key(&key);
                if self.lines.contains_key(&path) {
                    self.duplicates.push((path.clone(), number));
                } else {
                    self.lines.insert(path.clone(), number);
                }
                top.last = Some(path);
                top.open = opens_block(value);
                self.after_value(value, col);
            }
        }
    }

    /// Notes a value that continues on later lines; `owner_col` is its entry's column.
    fn after_value(&mut self, value: &str, owner_col: usize) {
        let value = value.trim_start();
        let bytes = value.as_bytes();
        match bytes.first() {
            Some(b'|' | b'>') => self.skip = Skip::BlockScalar { owner_col },
            Some(b'[' | b'{') => self.skip = continue_flow(value, 0),
            Some(&q @ (b'"' | b'\'')) if closing_quote(bytes, 1, q).is_none() => {
                self.skip = Skip::Quoted { quote: q };
            }
            _ => {}
        }
    }
}

impl Frame {
    fn new(col: usize, kind: Kind, path: YamlPath) -> Self {
        Self {
            col,
            kind,
            path,
            next_index: 0,
            last: None,
            open: false,
        }
    }
}

fn is_dash(text: &str) -> bool {
    text == "-" || text.starts_with("- ") || text.starts_with("-\t")
}

/// Whether a `key:` value leaves room for a nested block: nothing, a comment, or only an
/// anchor or tag (`base: &defaults`).
fn opens_block(value: &str) -> bool {
    value
        .split_whitespace()
        .take_while(|t| !t.starts_with('#'))
        .all(|t| t.starts_with('&') || t.starts_with('!'))
}

/// Splits `key: value` into the unquoted key and the text after the colon; `None` when the
/// line is not a mapping entry.
fn split_key(text: &str) -> Option<(String, &str)> {
    let bytes = text.as_bytes();
    let (key, after) = match bytes.first()? {
        &q @ (b'"' | b'\'') => {
            let end = closing_quote(bytes, 1, q)?;
            let key = unquote(&text[1..end], q);
            let rest = text[end + 1..].trim_start_matches([' ', '\t']);
            (key, rest.strip_prefix(':')?)
        }
        b'[' | b'{' | b'?' | b'#' | b'&' | b'*' | b'!' | b'|' | b'>' => return None,
        _ => {
            let colon = plain_key_end(bytes)?;
            (text[..colon].trim_end().to_owned(), &text[colon + 1..])
        }
    };
    if !(after.is_empty() || after.starts_with([' ', '\t'])) {
        return None;
    }
    Some((key, after))
}

/// The colon ending a plain key: one followed by a space or the end of the line, before
/// any comment.
fn plain_key_end(bytes: &[u8]) -> Option<usize> {
    for (i, &b) in bytes.iter().enumerate() {
        let next = bytes.get(i + 1).copied();
        match b {
            b':' if matches!(next, None | Some(b' ' | b'\t')) => return Some(i),
            b'#' if i > 0 && matches!(bytes[i - 1], b' ' | b'\t') => return None,
            _ => {}
        }
    }
    None
}

/// The index of the quote closing a scalar opened before `from`.
fn closing_quote(bytes: &[u8], from: usize, quote: u8) -> Option<usize> {
    let mut i = from;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quote == b'"' => i += 1,
            // `''` is an escaped quote inside a single-quoted scalar.
            b'\'' if quote == b'\'' && bytes.get(i + 1) == Some(&b'\'') => i += 1,
            b if b == quote => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

fn unquote(inner: &str, quote: u8) -> String {
    if quote == b'\'' {
        return inner.replace("''", "'");
    }
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// Tracks bracket depth through `text`, ignoring quoted brackets and comments.
fn continue_flow(text: &str, mut depth: usize) -> Skip {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth = depth.saturating_sub(1),
            q @ (b'"' | b'\'') => match closing_quote(bytes, i + 1, q) {
                Some(end) => i = end,
                // A quote left open inside a flow collection: give up on the rest of it
                // rather than guess; later lines still get scanned for keys.
                None => return Skip::None,
            },
            b'#' if i == 0 || matches!(bytes[i - 1], b' ' | b'\t') => break,
            _ => {}
        }
        i += 1;
    }
    if depth == 0 {
        Skip::None
    } else {
        Skip::Flow { depth }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> YamlPath {
        // Test-only parser for the display form, so expectations read like error messages.
        let mut path = YamlPath::root();
        for part in text.split('.') {
            let (key, indexes) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
            if !key.is_empty() {
                path = path.key(key);
            }
            for idx in indexes.split('[').filter(|s| !s.is_empty()) {
                path = path.index(idx.trim_end_matches(']').parse().unwrap());
            }
        }
        path
    }

    fn line(source: &str, path: &str) -> Option<usize> {
        LineIndex::build(source).line_of(&p(path))
    }

    #[test]
    fn path_display() {
        assert_eq!(
            p("routes[1].sticky.query").to_string(),
            "routes[1].sticky.query"
        );
        assert_eq!(YamlPath::root().to_string(), "(top level)");
        let odd = YamlPath::root()
            .key("upstreams")
            .key("chat.v2")
            .key("backends");
        assert_eq!(odd.to_string(), r#"upstreams["chat.v2"].backends"#);
        assert_eq!(YamlPath::root().index(0).index(2).to_string(), "[0][2]");
    }

    #[test]
    fn top_level_keys_and_nested_maps() {
        let src = "a: 1\nb:\n  c: 2\n  d:\n    e: 3\nf: 4\n";
        assert_eq!(line(src, "a"), Some(1));
        assert_eq!(line(src, "b"), Some(2));
        assert_eq!(line(src, "b.c"), Some(3));
        assert_eq!(line(src, "b.d.e"), Some(5));
        assert_eq!(line(src, "f"), Some(6));
        // Unknown paths fall back to the nearest known ancestor.
        assert_eq!(line(src, "b.d.zz"), Some(4));
        assert_eq!(line(src, "zz"), None);
        assert_eq!(line(src, ""), None);
    }

    #[test]
    fn lists_of_maps_indented_and_indentless() {
        let src = "\
routes:
  - name: a
    match:
      host: x
  - name: b
    sticky:
      query: room
listeners:
- name: l0
  address: 1
-   name: l1
    tls:
      certificates:
      - cert: c
        key: k
";
        assert_eq!(line(src, "routes"), Some(1));
        assert_eq!(line(src, "routes[0]"), Some(2));
        assert_eq!(line(src, "routes[0].name"), Some(2));
        assert_eq!(line(src, "routes[0].match.host"), Some(4));
        assert_eq!(line(src, "routes[1]"), Some(5));
        assert_eq!(line(src, "routes[1].sticky.query"), Some(7));
        assert_eq!(line(src, "routes[1].upstream"), Some(5));
        assert_eq!(line(src, "listeners"), Some(8));
        assert_eq!(line(src, "listeners[0].address"), Some(10));
        assert_eq!(line(src, "listeners[1].name"), Some(11));
        assert_eq!(line(src, "listeners[1].tls.certificates[0].cert"), Some(14));
        assert_eq!(line(src, "listeners[1].tls.certificates[0].key"), Some(15));
        assert_eq!(line(src, "routes[2]"), Some(1));
    }

    #[test]
    fn indentless_sequence_ends_at_next_key() {
        let src = "\
- a: 1
  items:
  - x
  - y
  after: 2
- b: 3
";
        assert_eq!(line(src, "[0].items[1]"), Some(4));
        assert_eq!(line(src, "[0].after"), Some(5));
        assert_eq!(line(src, "[1].b"), Some(6));
    }

    #[test]
    fn items_on_their_own_line_and_nested_sequences() {
        let src = "\
list:
  -
    k: v
  - - a
    - b
  - scalar
";
        assert_eq!(line(src, "list[0]"), Some(2));
        assert_eq!(line(src, "list[0].k"), Some(3));
        assert_eq!(line(src, "list[1][0]"), Some(4));
        assert_eq!(line(src, "list[1][1]"), Some(5));
        assert_eq!(line(src, "list[2]"), Some(6));
    }

    #[test]
    fn comments_blank_lines_and_document_markers() {
        let src = "\
# leading comment
---

a:   # a comment after a key
  # indented comment

    b: 1 # trailing
c: \"x # not a comment\"
d: 2
";
        assert_eq!(line(src, "a"), Some(4));
        assert_eq!(line(src, "a.b"), Some(7));
        assert_eq!(line(src, "c"), Some(8));
        assert_eq!(line(src, "d"), Some(9));
    }

    #[test]
    fn quoted_keys_and_colons_in_values() {
        let src = "\
\"quoted key\": 1
'single ''q''': 2
url: ws://h:1/x
\"a:b\":
  inner: 3
time: 12:30
";
        let index = LineIndex::build(src);
        let at = |path: YamlPath| index.line_of(&path);
        assert_eq!(at(YamlPath::root().key("quoted key")), Some(1));
        assert_eq!(at(YamlPath::root().key("single 'q'")), Some(2));
        assert_eq!(at(YamlPath::root().key("url")), Some(3));
        assert_eq!(at(YamlPath::root().key("a:b").key("inner")), Some(5));
        assert_eq!(at(YamlPath::root().key("time")), Some(6));
    }

    #[test]
    fn flow_collections_fall_back_to_their_key() {
        let src = "\
names: [a, b]
multi: [
  \"x]\",
  y: z,
]
map: {k: v}
next:
  k: 1
";
        assert_eq!(line(src, "names[1]"), Some(1));
        assert_eq!(line(src, "multi[1]"), Some(2));
        assert_eq!(line(src, "map.k"), Some(6));
        assert_eq!(line(src, "next.k"), Some(8));
        // `y: z` inside the flow list must not have been taken for a top-level key.
        assert_eq!(line(src, "y"), None);
    }

    #[test]
    fn block_and_multiline_scalars_are_skipped() {
        let src = "\
a: |
  not: a key
  - not an item

  still text
b: >-
    folded: text
c: plain
  continued: no
d: \"open
  e: still quoted\"
f: 1
";
        assert_eq!(line(src, "a"), Some(1));
        assert_eq!(line(src, "b"), Some(6));
        assert_eq!(line(src, "c"), Some(8));
        assert_eq!(line(src, "d"), Some(10));
        assert_eq!(line(src, "f"), Some(12));
        assert_eq!(line(src, "a.not"), Some(1));
        assert_eq!(line(src, "c.continued"), Some(8));
        assert_eq!(line(src, "e"), None);
    }

    #[test]
    fn anchors_open_a_block_and_crlf_is_handled() {
        let src = "base: &b\r\n  k: 1\r\nother:\r\n  - x\r\n";
        assert_eq!(line(src, "base.k"), Some(2));
        assert_eq!(line(src, "other[0]"), Some(4));
    }

    #[test]
    fn path_at_finds_the_entry_on_a_line() {
        let src = "a:\n  b: 1\n\nc:\n  - d: 2\n";
        let index = LineIndex::build(src);
        let at = |line| index.path_at(line).map(ToString::to_string);
        assert_eq!(at(2), Some("a.b".into()));
        assert_eq!(at(3), None);
        assert_eq!(at(5), Some("c[0].d".into()));
        assert!(LineIndex::build("").path_at(1).is_none());
    }

    #[test]
    fn duplicate_keys_are_remembered() {
        let src = "a:\n  x: 1\n  y: 2\n  x: 3\nb:\n  - x: 1\n  - x: 2\n";
        let index = LineIndex::build(src);
        let (path, line) = index.duplicate_key("x").unwrap();
        assert_eq!((path.to_string(), line), ("a.x".into(), 4));
        assert_eq!(index.line_of(&p("a.x")), Some(2));
        // Same key in different items is no repeat.
        assert!(index.duplicate_key("y").is_none());
    }

    #[test]
    fn tab_indented_lines_are_not_guessed() {
        let src = "a:\n  b: 1\n\tc: 2\nd: 3\n";
        let index = LineIndex::build(src);
        assert_eq!(index.line_of(&p("d")), Some(4));
        assert!(index.path_at(3).is_none());
        assert_eq!(line("k:\tv\n", "k"), Some(1));
    }
}
