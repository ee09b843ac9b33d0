//! A small spanned view of a TOML document: every value keeps the line it was written on, so
//! schema errors can name it. Built from toml_edit, which keeps byte spans of keys and values.

use std::path::Path;

use toml_edit::{ImDocument, Item, Value};

use crate::error::{DataError, Result};

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub kind: Kind,
    /// 1-based line of the key (for table entries) or of the value (for array items).
    pub line: usize,
}

#[derive(Debug, Clone)]
pub(crate) enum Kind {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime,
    Array(Vec<Node>),
    Table(Vec<(String, Node)>),
}

impl Kind {
    pub fn type_name(&self) -> &'static str {
        match self {
            Kind::Str(_) => "a string",
            Kind::Int(_) => "an integer",
            Kind::Float(_) => "a float",
            Kind::Bool(_) => "a boolean",
            Kind::Datetime => "a date-time",
            Kind::Array(_) => "an array",
            Kind::Table(_) => "a table",
        }
    }
}

/// Maps byte offsets to 1-based line numbers.
struct Lines {
    starts: Vec<usize>,
}

impl Lines {
    fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.char_indices().filter(|(_, c)| *c == '\n').map(|(i, _)| i + 1));
        Self { starts }
    }
    fn line_of(&self, offset: usize) -> usize {
        match self.starts.binary_search(&offset) {
            Ok(i) => i + 1,
            Err(i) => i,
        }
    }
    fn col_of(&self, offset: usize) -> usize {
        let l = self.line_of(offset);
        offset - self.starts[l.saturating_sub(1)] + 1
    }
}

/// Parses `text` (the content of `path`) into the root table of entries.
pub(crate) fn parse(path: &Path, text: &str) -> Result<Vec<(String, Node)>> {
    let lines = Lines::new(text);
    let doc = ImDocument::parse(text).map_err(|e| {
        let off = e.span().map(|s| s.start).unwrap_or(0);
        DataError::ConfigSyntax {
            path: path.to_path_buf(),
            line: lines.line_of(off),
            column: lines.col_of(off),
            message: e.message().trim().to_string(),
        }
    })?;
    match convert_item(doc.as_item(), 1, &lines).kind {
        Kind::Table(t) => Ok(t),
        _ => Ok(Vec::new()),
    }
}

fn line(span: Option<std::ops::Range<usize>>, lines: &Lines, fallback: usize) -> usize {
    span.map(|s| lines.line_of(s.start)).unwrap_or(fallback)
}

fn convert_table<'a>(
    entries: impl Iterator<Item = (&'a toml_edit::Key, &'a Item)>,
    lines: &Lines,
    fallback: usize,
) -> Kind {
    let mut out = Vec::new();
    for (k, v) in entries {
        if v.is_none() {
            continue;
        }
        let l = line(k.span(), lines, line(v.span(), lines, fallback));
        out.push((k.get().to_string(), convert_item(v, l, lines)));
    }
    Kind::Table(out)
}

fn convert_item(item: &Item, key_line: usize, lines: &Lines) -> Node {
    let kind = match item {
        Item::None => Kind::Table(Vec::new()),
        Item::Value(v) => return convert_value(v, key_line, lines),
        Item::Table(t) => {
            let tl = line(t.span(), lines, key_line);
            let keys: Vec<&str> = t.iter().map(|(k, _)| k).collect();
            let entries = keys.into_iter().filter_map(|k| t.get_key_value(k));
            return Node { kind: convert_table(entries, lines, tl), line: key_line };
        }
        Item::ArrayOfTables(a) => Kind::Array(
            a.iter()
                .map(|t| {
                    let tl = line(t.span(), lines, key_line);
                    let keys: Vec<&str> = t.iter().map(|(k, _)| k).collect();
                    let entries = keys.into_iter().filter_map(|k| t.get_key_value(k));
                    Node { kind: convert_table(entries, lines, tl), line: tl }
                })
                .collect(),
        ),
    };
    Node { kind, line: key_line }
}

fn convert_value(v: &Value, key_line: usize, lines: &Lines) -> Node {
    let kind = match v {
        Value::String(s) => Kind::Str(s.value().clone()),
        Value::Integer(i) => Kind::Int(*i.value()),
        Value::Float(f) => Kind::Float(*f.value()),
        Value::Boolean(b) => Kind::Bool(*b.value()),
        Value::Datetime(_) => Kind::Datetime,
        Value::Array(a) => {
            Kind::Array(a.iter().map(|x| convert_value(x, line(x.span(), lines, key_line), lines)).collect())
        }
        Value::InlineTable(t) => {
            let tl = line(t.span(), lines, key_line);
            let keys: Vec<&str> = t.iter().map(|(k, _)| k).collect();
            let entries = keys.into_iter().filter_map(|k| t.get_key_value(k));
            convert_table(entries, lines, tl)
        }
    };
    Node { kind, line: key_line }
}
