//! What made an output file: the cpa-stream version and the command line, recorded in the
//! metadata of every Parquet output (predictions, evaluation tables) so that a file found later
//! says where it came from. The CLI sets them once at start; a library caller may set its own.

use std::sync::{Arc, OnceLock};

use arrow_schema::{Schema, SchemaRef};
use parquet::file::metadata::KeyValue;

/// Metadata key: the cpa-stream version (with the git revision when built from a checkout).
pub const VERSION_KEY: &str = "cpa_stream.version";
/// Metadata key: the command line that wrote the file.
pub const COMMAND_KEY: &str = "cpa_stream.command";

static PROVENANCE: OnceLock<(String, String)> = OnceLock::new();

/// Records the version and command line stamped on outputs; the first call wins.
pub fn set(version: &str, command: &str) {
    let _ = PROVENANCE.set((version.to_owned(), command.to_owned()));
}

/// `schema` with the version and the command line added to its metadata (the library's version
/// and no command line when [`set`] was never called).
pub fn stamp(schema: &Schema) -> SchemaRef {
    let mut metadata = schema.metadata().clone();
    let (version, command) = match PROVENANCE.get() {
        Some((v, c)) => (v.clone(), Some(c.clone())),
        None => (env!("CARGO_PKG_VERSION").to_owned(), None),
    };
    metadata.insert(VERSION_KEY.to_owned(), version);
    if let Some(command) = command {
        metadata.insert(COMMAND_KEY.to_owned(), command);
    }
    Arc::new(schema.clone().with_metadata(metadata))
}

/// The schema's metadata as plain Parquet key-value pairs, sorted by key: readers that do not
/// decode the Arrow schema (DuckDB's `parquet_kv_metadata`, Spark, Trino) see them too.
pub fn key_values(schema: &Schema) -> Option<Vec<KeyValue>> {
    let mut pairs: Vec<KeyValue> =
        schema.metadata().iter().map(|(k, v)| KeyValue::new(k.clone(), Some(v.clone()))).collect();
    pairs.sort_by(|a, b| a.key.cmp(&b.key));
    (!pairs.is_empty()).then_some(pairs)
}

/// A command line as a shell would take it back: arguments with spaces or shell characters in
/// single quotes.
pub fn shell_words(args: impl IntoIterator<Item = String>) -> String {
    let quote = |a: String| {
        let plain = !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,+@%".contains(c));
        if plain { a } else { format!("'{}'", a.replace('\'', r"'\''")) }
    };
    args.into_iter().map(quote).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_quote_what_a_shell_would_split() {
        let args = ["cpa-stream", "predict", "--source", "condition == control", "--target", "it's"];
        assert_eq!(
            shell_words(args.iter().map(|s| s.to_string())),
            r"cpa-stream predict --source 'condition == control' --target 'it'\''s'"
        );
    }
}
