//! The text key of a label group: one string per (condition, doses, covariate values) as obs
//! writes them, so that a hash lookup finds a row's group without parsing its condition again.

/// Builds group keys into one reused buffer.
#[derive(Debug, Default)]
pub struct GroupKey {
    text: String,
}

/// Separates the parts of a key (the ASCII unit separator, never in obs labels).
const SEPARATOR: char = '\u{1f}';

impl GroupKey {
    /// The key of a row's labels: condition, dose (or none) and covariate values, as written.
    pub fn of(&mut self, condition: &str, dose: Option<&str>, covariates: &[&str]) -> &str {
        self.text.clear();
        self.text.push_str(condition);
        self.text.push(SEPARATOR);
        self.text.push_str(dose.unwrap_or(""));
        for value in covariates {
            self.text.push(SEPARATOR);
            self.text.push_str(value);
        }
        &self.text
    }
}
