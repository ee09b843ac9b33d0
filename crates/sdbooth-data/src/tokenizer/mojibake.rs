//! ftfy's `fix_encoding` (mojibake repair). Not ported yet: the text is returned unchanged.

use super::TokenizerError;

pub(crate) struct Mojibake {}

impl Mojibake {
    pub(crate) fn new() -> Result<Self, TokenizerError> {
        Ok(Self {})
    }

    pub(crate) fn fix_encoding(&self, text: &str) -> String {
        text.to_string()
    }
}
