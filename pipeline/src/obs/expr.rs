//! Cell selections over obs columns (`--source`): a small boolean expression language.
//!
//! ```text
//! condition == control and cell_type in (A549, "K562")
//! not (dataset == norman19) or dose != 1
//! all
//! ```
//!
//! Comparisons are on the text of a value (categories, strings, numbers as printed); values are
//! bare words (anything but spaces, parentheses, commas, quotes, `!`, `=`, `&`, `|`) or quoted
//! with `'` or `"`. `and`/`&&`/`&`, `or`/`||`/`|`, `not`/`!`, parentheses; `and` binds tighter than
//! `or`. A missing value (null) equals nothing.

use std::collections::HashMap;

use arrow_array::RecordBatch;

use super::{TextColumn, column_strings};
use crate::Stage;
use crate::error::{Error, Result};

/// A parsed selection.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// Every cell.
    All,
    /// A column equals a value.
    Eq(String, String),
    /// A column's value is one of these.
    In(String, Vec<String>),
    /// The cells the inner expression does not select.
    Not(Box<Expr>),
    /// Both.
    And(Box<Expr>, Box<Expr>),
    /// Either.
    Or(Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Quoted(String),
    Open,
    Close,
    Comma,
    Eq,
    Ne,
    And,
    Or,
    Not,
}

fn tokenize(text: &str) -> std::result::Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    let special = |c: char| c.is_whitespace() || "()!=,&|'\"".contains(c);
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            _ if c.is_whitespace() => i += 1,
            '(' => (tokens.push(Token::Open), i += 1).1,
            ')' => (tokens.push(Token::Close), i += 1).1,
            ',' => (tokens.push(Token::Comma), i += 1).1,
            '=' => {
                tokens.push(Token::Eq);
                i += if next == Some('=') { 2 } else { 1 };
            }
            '!' if next == Some('=') => (tokens.push(Token::Ne), i += 2).1,
            '!' => (tokens.push(Token::Not), i += 1).1,
            '&' => {
                tokens.push(Token::And);
                i += if next == Some('&') { 2 } else { 1 };
            }
            '|' => {
                tokens.push(Token::Or);
                i += if next == Some('|') { 2 } else { 1 };
            }
            '\'' | '"' => {
                let end = chars[i + 1..]
                    .iter()
                    .position(|&q| q == c)
                    .ok_or_else(|| format!("unterminated quote starting at character {}", i + 1))?;
                tokens.push(Token::Quoted(chars[i + 1..i + 1 + end].iter().collect()));
                i += end + 2;
            }
            _ => {
                let start = i;
                while i < chars.len() && !special(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                tokens.push(match word.to_ascii_lowercase().as_str() {
                    "and" => Token::And,
                    "or" => Token::Or,
                    "not" => Token::Not,
                    _ => Token::Word(word),
                });
            }
        }
    }
    Ok(tokens)
}

/// Most tokens in an expression (names, values, operators): far more than a selection needs,
/// and small enough that evaluating and dropping the tree never runs out of stack.
pub const MAX_TOKENS: usize = 2000;
/// Most levels of parentheses and `not`.
pub const MAX_DEPTH: usize = 64;

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn bump(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn or(&mut self) -> std::result::Result<Expr, String> {
        let mut left = self.and()?;
        while self.peek() == Some(&Token::Or) {
            self.at += 1;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> std::result::Result<Expr, String> {
        let mut left = self.not()?;
        while self.peek() == Some(&Token::And) {
            self.at += 1;
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> std::result::Result<Expr, String> {
        if self.peek() == Some(&Token::Not) {
            self.at += 1;
            let inner = self.nested(Self::not)?;
            return Ok(Expr::Not(Box::new(inner)));
        }
        self.atom()
    }

    /// Parses one level deeper, refusing more than [`MAX_DEPTH`].
    fn nested(
        &mut self,
        parse: fn(&mut Self) -> std::result::Result<Expr, String>,
    ) -> std::result::Result<Expr, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("more than {MAX_DEPTH} levels of parentheses and not"));
        }
        let e = parse(self);
        self.depth -= 1;
        e
    }

    fn value(&mut self) -> std::result::Result<String, String> {
        match self.bump() {
            Some(Token::Word(w) | Token::Quoted(w)) => Ok(w),
            other => Err(format!("expected a value, found {}", describe(other.as_ref()))),
        }
    }

    fn atom(&mut self) -> std::result::Result<Expr, String> {
        match self.bump() {
            Some(Token::Open) => {
                let e = self.nested(Self::or)?;
                match self.bump() {
                    Some(Token::Close) => Ok(e),
                    other => Err(format!("expected ')', found {}", describe(other.as_ref()))),
                }
            }
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("all") && !self.is_comparison_next() => Ok(Expr::All),
            Some(Token::Word(column) | Token::Quoted(column)) => match self.bump() {
                Some(Token::Eq) => Ok(Expr::Eq(column, self.value()?)),
                Some(Token::Ne) => Ok(Expr::Not(Box::new(Expr::Eq(column, self.value()?)))),
                Some(Token::Word(w)) if w.eq_ignore_ascii_case("in") => Ok(Expr::In(column, self.list()?)),
                Some(Token::Not) if matches!(self.peek(), Some(Token::Word(w)) if w.eq_ignore_ascii_case("in")) => {
                    self.at += 1;
                    Ok(Expr::Not(Box::new(Expr::In(column, self.list()?))))
                }
                other => Err(format!("expected ==, != or in after {column:?}, found {}", describe(other.as_ref()))),
            },
            other => Err(format!("expected a column name, '(' or 'not', found {}", describe(other.as_ref()))),
        }
    }

    fn is_comparison_next(&self) -> bool {
        matches!(self.peek(), Some(Token::Eq | Token::Ne))
            || matches!(self.peek(), Some(Token::Word(w)) if w.eq_ignore_ascii_case("in"))
    }

    fn list(&mut self) -> std::result::Result<Vec<String>, String> {
        match self.bump() {
            Some(Token::Open) => {}
            other => return Err(format!("expected '(' after in, found {}", describe(other.as_ref()))),
        }
        let mut values = vec![self.value()?];
        loop {
            match self.bump() {
                Some(Token::Comma) => values.push(self.value()?),
                Some(Token::Close) => return Ok(values),
                other => return Err(format!("expected ',' or ')' in a list, found {}", describe(other.as_ref()))),
            }
        }
    }
}

fn describe(token: Option<&Token>) -> String {
    match token {
        None => "the end".to_owned(),
        Some(Token::Word(w)) => format!("{w:?}"),
        Some(Token::Quoted(w)) => format!("'{w}'"),
        Some(Token::Open) => "'('".to_owned(),
        Some(Token::Close) => "')'".to_owned(),
        Some(Token::Comma) => "','".to_owned(),
        Some(Token::Eq) => "'=='".to_owned(),
        Some(Token::Ne) => "'!='".to_owned(),
        Some(t) => format!("{t:?}").to_lowercase(),
    }
}

/// Characters of an expression quoted in an error at most.
const QUOTED_CHARS: usize = 200;

/// `text` quoted for an error, its start only when long (with its length), so that a huge
/// expression does not fill the terminal.
fn quoted_start(text: &str) -> String {
    match text.char_indices().nth(QUOTED_CHARS) {
        None => format!("{text:?}"),
        Some((end, _)) => format!("{:?}... ({} characters)", &text[..end], text.chars().count()),
    }
}

impl std::str::FromStr for Expr {
    type Err = Error;

    /// Parses a selection; errors say what was expected where.
    fn from_str(text: &str) -> Result<Expr> {
        let bad = |msg: String| Error::InvalidInput(format!("cell selection {}: {msg}", quoted_start(text)));
        let tokens = tokenize(text).map_err(bad)?;
        if tokens.len() > MAX_TOKENS {
            return Err(bad(format!("{} tokens, at most {MAX_TOKENS}", tokens.len())));
        }
        let mut parser = Parser { tokens, at: 0, depth: 0 };
        let expr = parser.or().map_err(bad)?;
        if let Some(t) = parser.peek() {
            return Err(bad(format!("unexpected {} after a complete expression", describe(Some(t)))));
        }
        Ok(expr)
    }
}

impl Expr {
    /// The obs columns the expression reads.
    pub fn columns(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.collect_columns(&mut out);
        out.sort_unstable();
        out.dedup();
        out
    }

    fn collect_columns<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Expr::All => {}
            Expr::Eq(c, _) | Expr::In(c, _) => out.push(c),
            Expr::Not(e) => e.collect_columns(out),
            Expr::And(a, b) | Expr::Or(a, b) => {
                a.collect_columns(out);
                b.collect_columns(out);
            }
        }
    }

    /// Evaluates the expression on every row of an obs record batch.
    pub fn select(&self, batch: &RecordBatch, origin: &str) -> Result<Vec<bool>> {
        let mut columns: HashMap<&str, TextColumn> = HashMap::new();
        for name in self.columns() {
            if batch.column_by_name(name).is_none() {
                let names: Vec<String> = batch.schema().fields().iter().map(|f| f.name().clone()).collect();
                return Err(Error::InvalidInput(format!(
                    "{origin}: the cell selection reads obs column {name:?}, which does not exist (columns: {})",
                    names.join(", ")
                )));
            }
            columns.insert(name, column_strings(batch, name, origin)?);
        }
        Ok((0..batch.num_rows()).map(|row| self.eval(&columns, row)).collect())
    }

    /// Why the expression selects no cell of the obs table at `obs`: each value it compares
    /// with that its column does not hold, with the column's values closest first; or, when every
    /// value occurs, that no cell meets the whole expression.
    pub fn explain_no_match(&self, obs: cpa_stream_stages::store::TableFile<'_>) -> Result<String> {
        /// Distinct values kept per column for the suggestions.
        const MAX_DISTINCT: usize = 100_000;
        let origin = obs.path().display().to_string();
        let columns = self.columns();
        let mut distinct: Vec<std::collections::HashSet<String>> = vec![Default::default(); columns.len()];
        for batch in obs.read().map_err(crate::error::Error::stage(Stage::Source))? {
            let batch = batch.map_err(crate::error::Error::stage(Stage::Source))?;
            for (name, seen) in columns.iter().zip(&mut distinct) {
                let col = column_strings(&batch, name, &origin)?;
                for row in 0..batch.num_rows() {
                    if let Some(v) = col.get(row)
                        && seen.len() < MAX_DISTINCT
                        && !seen.contains(v)
                    {
                        seen.insert(v.to_owned());
                    }
                }
            }
        }
        let mut literals = Vec::new();
        self.collect_literals(&mut literals);
        let mut reasons = Vec::new();
        for (column, value) in literals {
            let Some(k) = columns.iter().position(|c| *c == column) else { continue };
            if !distinct[k].contains(value) {
                let mut values: Vec<&str> = distinct[k].iter().map(String::as_str).collect();
                values.sort_unstable();
                reasons.push(format!(
                    "obs column {column:?} has no value {value:?} (closest first: {})",
                    crate::suggest::listing(value, values, 8)
                ));
            }
        }
        if reasons.is_empty() {
            reasons.push("every value it names occurs, but no cell meets the whole expression".to_owned());
        }
        Ok(reasons.join("; "))
    }

    fn collect_literals<'a>(&'a self, out: &mut Vec<(&'a str, &'a str)>) {
        match self {
            Expr::All => {}
            Expr::Eq(c, v) => out.push((c, v)),
            Expr::In(c, vs) => out.extend(vs.iter().map(|v| (c.as_str(), v.as_str()))),
            Expr::Not(e) => e.collect_literals(out),
            Expr::And(a, b) | Expr::Or(a, b) => {
                a.collect_literals(out);
                b.collect_literals(out);
            }
        }
    }

    fn eval(&self, columns: &HashMap<&str, TextColumn>, row: usize) -> bool {
        let value = |c: &str| columns.get(c).and_then(|col| col.get(row));
        match self {
            Expr::All => true,
            Expr::Eq(c, v) => value(c) == Some(v.as_str()),
            Expr::In(c, vs) => value(c).is_some_and(|x| vs.iter().any(|v| v == x)),
            Expr::Not(e) => !e.eval(columns, row),
            Expr::And(a, b) => a.eval(columns, row) && b.eval(columns, row),
            Expr::Or(a, b) => a.eval(columns, row) || b.eval(columns, row),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::StringArray;
    use arrow_schema::{DataType, Field, Schema};

    use super::*;

    fn eq(c: &str, v: &str) -> Expr {
        Expr::Eq(c.into(), v.into())
    }

    #[test]
    fn parses_precedence_quotes_and_lists() -> Result<()> {
        assert_eq!("all".parse::<Expr>()?, Expr::All);
        assert_eq!(
            "condition == control and cell_type in (A549, 'K 562') or not dose != 1".parse::<Expr>()?,
            Expr::Or(
                Box::new(Expr::And(
                    Box::new(eq("condition", "control")),
                    Box::new(Expr::In("cell_type".into(), vec!["A549".into(), "K 562".into()]))
                )),
                Box::new(Expr::Not(Box::new(Expr::Not(Box::new(eq("dose", "1"))))))
            )
        );
        assert_eq!("condition=MAP2K3+MAP2K6".parse::<Expr>()?, eq("condition", "MAP2K3+MAP2K6"));
        assert_eq!(
            "!(a == 1) && b not in (x)".parse::<Expr>()?,
            Expr::And(
                Box::new(Expr::Not(Box::new(eq("a", "1")))),
                Box::new(Expr::Not(Box::new(Expr::In("b".into(), vec!["x".into()]))))
            )
        );
        Ok(())
    }

    #[test]
    fn deep_or_long_expressions_are_refused_not_overflowed() {
        let deep = format!("{}a == b{}", "(".repeat(20_000), ")".repeat(20_000));
        let err = &deep.parse::<Expr>().unwrap_err().to_string();
        assert!(err.contains("tokens, at most"), "{err}");
        // The error quotes the expression's start, not its 40,000 characters.
        assert!(err.len() < 400 && err.contains("... (40006 characters)"), "{err}");
        let nots = format!("{}a == b", "!".repeat(50_000));
        assert!(&nots.parse::<Expr>().is_err());
        let nested = format!("{}a == b{}", "(".repeat(65), ")".repeat(65));
        assert!(&nested.parse::<Expr>().unwrap_err().to_string().contains("more than 64 levels"));
        let fine = format!("{}a == b{}", "(".repeat(64), ")".repeat(64));
        assert!(&fine.parse::<Expr>().is_ok());
        let chain = vec!["a == b"; 400].join(" and ");
        assert!(&chain.parse::<Expr>().is_ok());
    }

    #[test]
    fn errors_say_what_was_expected() {
        for (text, needle) in [
            ("condition ==", "expected a value, found the end"),
            ("(a == 1", "expected ')'"),
            ("a in b", "expected '(' after in"),
            ("a == 'x", "unterminated quote"),
            ("a == 1 b", "unexpected \"b\""),
            ("== 1", "expected a column name"),
        ] {
            let err = text.parse::<Expr>().map(|_| ()).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn selects_rows_and_names_missing_columns() -> Result<()> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("condition", DataType::Utf8, true),
            Field::new("cell_type", DataType::Utf8, false),
        ]));
        let columns: Vec<arrow_array::ArrayRef> = vec![
            Arc::new(StringArray::from(vec![Some("control"), Some("A"), None, Some("control")])),
            Arc::new(StringArray::from(vec!["x", "x", "y", "y"])),
        ];
        let batch = RecordBatch::try_new(schema, columns).map_err(|e| Error::InvalidInput(e.to_string()))?;
        let e = "condition == control and cell_type != x".parse::<Expr>()?;
        assert_eq!(e.select(&batch, "obs")?, [false, false, false, true]);
        assert_eq!("condition != control".parse::<Expr>()?.select(&batch, "obs")?, [false, true, true, false]);
        let err = "donor == 1".parse::<Expr>().and_then(|e| e.select(&batch, "obs.parquet")).unwrap_err().to_string();
        assert!(err.contains("\"donor\", which does not exist (columns: condition, cell_type)"), "{err}");
        Ok(())
    }
}
