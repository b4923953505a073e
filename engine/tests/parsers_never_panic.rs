//! Every parser of user text returns a value or an error on any input, never a panic or a stack
//! overflow: the `--source` expression, target specifications and tables, condition and dose
//! text, the model configuration and the store manifest. Random printable text and text built
//! from each grammar's own tokens (where bugs hide), a few thousand cases per run.

use cpa_stream_engine::predictor::targets::parse_target_spec;
use cpa_stream_pipeline::obs::expr::Expr;
use cpa_stream_schemas::Manifest;
use cpa_stream_stages::model::config::CpaConfig;
use cpa_stream_stages::model::vocab::split_condition;
use proptest::prelude::*;

/// Text made of a grammar's tokens, spaces and a few stray characters.
fn tokens(parts: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(parts), 0..60).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn source_expressions(text in prop_oneof![
        any::<String>(),
        tokens(&["a", "b", " ", "==", "!=", "!", "(", ")", ",", "in", "not", "and", "or", "&&", "||", "'", "\"", "all", "=", "&", "|"]),
    ]) {
        if let Ok(e) = text.parse::<Expr>() {
            let _ = e.columns();
        }
    }

    #[test]
    fn target_specs(text in prop_oneof![
        any::<String>(),
        tokens(&["condition", "dose", "=", ",", "A", "+", "1", "0.1", " ", "==", "cell_type"]),
    ]) {
        let _ = parse_target_spec(&text);
    }

    #[test]
    fn conditions_and_doses(
        condition in tokens(&["A", "B", "+", "ctrl", " ", "++", ""]),
        dose in prop::option::of(tokens(&["1", "0.1", "+", "-1", "nan", "inf", "1e400", " ", "x"])),
        max in 0usize..4,
    ) {
        let _ = split_condition(&condition, dose.as_deref(), max);
    }

    #[test]
    fn configurations(text in prop_oneof![
        any::<String>(),
        tokens(&["[model]\n", "[training]\n", "[adversary]\n", "n_latent = ", "lr = ", "batch_size = ", "1", "0",
                 "1e30", "-1", "nan", "\"x\"", "\n", "n_hidden_encoder = ", "99999999999", "true", "["]),
    ]) {
        let _ = CpaConfig::from_toml(&text, "fuzz.toml");
    }

    #[test]
    fn manifests(text in prop_oneof![
        any::<String>(),
        tokens(&["{", "}", "\"format\"", ":", "\"cpa-stream-store\"", ",", "\"version\"", "1", "\"files\"",
                 "\"codec\"", "{\"name\": \"raw\"}", "\"../x\"", "[", "]", "null", "-1", "18446744073709551616"]),
    ]) {
        if let Ok(m) = Manifest::from_json(&text) {
            let _ = m.total_bytes();
        }
    }
}
