//! The closest valid values for an error message: what a user probably meant.

/// How alike two values are, 0 to 1: equal ignoring case counts as 1, otherwise the normalised
/// Damerau-Levenshtein similarity of the lower-cased texts.
fn likeness(given: &str, candidate: &str) -> f64 {
    let (a, b) = (given.to_lowercase(), candidate.to_lowercase());
    if a == b { 1.0 } else { strsim::normalized_damerau_levenshtein(&a, &b) }
}

/// The candidates ordered closest first (ties keep their order), duplicates removed.
pub fn closest<'a>(given: &str, candidates: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = std::collections::HashSet::new();
    let mut scored: Vec<(f64, usize, &str)> = candidates
        .into_iter()
        .filter(|c| seen.insert(*c))
        .enumerate()
        .map(|(i, c)| (likeness(given, c), i, c))
        .collect();
    scored.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    scored.into_iter().map(|(_, _, c)| c).collect()
}

/// The candidates closest first as a list for a message, at most `max` named
/// (`"K562", "k562x", "A549" and 12 more`).
pub fn listing<'a>(given: &str, candidates: impl IntoIterator<Item = &'a str>, max: usize) -> String {
    let ordered = closest(given, candidates);
    if ordered.is_empty() {
        return "none".to_owned();
    }
    let named: Vec<String> = ordered.iter().take(max).map(|c| format!("{c:?}")).collect();
    match ordered.len().saturating_sub(max) {
        0 => named.join(", "),
        more => format!("{} and {more} more", named.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_and_typos_come_first() {
        let values = ["A549", "k562", "HepG2", "K652"];
        assert_eq!(closest("K562", values)[..2], ["k562", "K652"]);
        assert_eq!(listing("ctrl", ["control", "ctrl_x", "TP53"], 2), "\"ctrl_x\", \"control\" and 1 more");
        assert_eq!(listing("x", [], 3), "none");
        assert_eq!(closest("a", ["b", "b", "a"]), ["a", "b"]);
    }
}
