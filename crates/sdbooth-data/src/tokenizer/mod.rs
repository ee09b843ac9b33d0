//! CLIP BPE tokenizer with exact parity to what kohya's train_db.py uses: transformers' slow
//! `CLIPTokenizer` with ftfy installed, for SD1 (openai/clip-vit-large-patch14: pad = EOS) and SD2
//! (stabilityai/stable-diffusion-2's tokenizer: same BPE, pad = "!" id 0), and kohya's training
//! layout of the ids (`--max_token_length` windows, `--no_token_padding`, `--weighted_captions`).
//!
//! Our own BPE rather than Hugging Face's `tokenizers` crate: its CLIP pipeline (NFC, no ftfy)
//! is the fast tokenizer's, which differs from the slow one kohya uses on curly quotes,
//! full-width forms, ligatures and HTML entities.
//!
//! The vocabulary is open_clip's `bpe_simple_vocab_16e6.txt.gz` (MIT license, see
//! assets/LICENSE-open_clip), embedded in the binary.

mod bpe;
mod clean;
mod html;
mod lower;
mod mojibake;
mod weighted;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use bpe::BpeModel;
use clean::TextCleaner;
use weighted::AttentionParser;
pub use weighted::WeightedSpan;

pub use bpe::{BOS_ID, EOS_ID, VOCAB_SIZE};
/// CLIP's context: 75 caption tokens between BOS and EOS.
pub const MODEL_MAX_LENGTH: usize = 77;
/// SD2's pad token "!" is id 0.
pub const SD2_PAD_ID: u32 = 0;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("the embedded CLIP vocabulary is unusable: {0}")]
    Vocabulary(String),
    #[error("--max_token_length must be 75, 150 or 225 (kohya's choices), not {0}")]
    MaxTokenLength(usize),
    #[error("weighted caption {caption:?}: the weight {weight:?} is not a number")]
    Weight { caption: String, weight: String },
}

/// Which Stable Diffusion text encoder's tokenizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipVariant {
    /// SD 1.x: openai/clip-vit-large-patch14; pads with EOS (49407).
    Sd1,
    /// SD 2.x: pads with "!" (id 0), which is also a special token: a "!" typed in a caption
    /// becomes id 0, not the "!</w>" word (256) SD1 gives it.
    Sd2,
}

/// Ids of one caption as kohya lays them out for training: `[n_windows][77]`, or with
/// `--no_token_padding` one unpadded window.
pub type Windows = Vec<Vec<u32>>;

/// Ids and per-token weights for `--weighted_captions`, both `[n_windows][77]`.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightedWindows {
    pub ids: Windows,
    pub weights: Vec<Vec<f32>>,
}

struct Shared {
    bpe: BpeModel,
    cleaner: TextCleaner,
    attention: AttentionParser,
}

/// The tables are built once per process (about 50k merges) and shared by every tokenizer.
fn shared() -> Result<Arc<Shared>, TokenizerError> {
    static SHARED: OnceLock<Result<Arc<Shared>, String>> = OnceLock::new();
    let built = SHARED.get_or_init(|| {
        let build = || -> Result<Shared, TokenizerError> {
            Ok(Shared {
                bpe: BpeModel::load()?,
                cleaner: TextCleaner::new()?,
                attention: AttentionParser::new()?,
            })
        };
        build().map(Arc::new).map_err(|e| e.to_string())
    });
    built.clone().map_err(TokenizerError::Vocabulary)
}

/// Cached BPE results are capped so a huge caption set cannot grow memory without bound.
const CACHE_LIMIT: usize = 200_000;

pub struct ClipTokenizer {
    shared: Arc<Shared>,
    variant: ClipVariant,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

enum Piece<'a> {
    Text(&'a str),
    Special(u32),
}

impl ClipTokenizer {
    pub fn new(variant: ClipVariant) -> Result<Self, TokenizerError> {
        Ok(Self { shared: shared()?, variant, cache: Mutex::new(HashMap::new()) })
    }

    pub fn sd1() -> Result<Self, TokenizerError> {
        Self::new(ClipVariant::Sd1)
    }

    pub fn sd2() -> Result<Self, TokenizerError> {
        Self::new(ClipVariant::Sd2)
    }

    pub fn variant(&self) -> ClipVariant {
        self.variant
    }

    pub fn pad_id(&self) -> u32 {
        match self.variant {
            ClipVariant::Sd1 => EOS_ID,
            ClipVariant::Sd2 => SD2_PAD_ID,
        }
    }

    /// The token string of an id (byte-level form, `</w>` marking a word end), for debugging.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.shared.bpe.token(id)
    }

    /// Text back from ids (BOS/EOS skipped), for logs and `--debug_dataset`: lower case and
    /// cleaned, words separated by single spaces, as transformers' `decode`.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.shared.bpe.decode(ids)
    }

    /// The text CLIP actually sees: ftfy's fixes, whitespace collapsed, lower case.
    pub fn clean(&self, text: &str) -> String {
        self.shared.cleaner.clean(text)
    }

    /// `tokenizer(text).input_ids[1:-1]`: the ids of a text, no BOS/EOS, no truncation.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        for piece in self.split_special(text) {
            match piece {
                Piece::Special(id) => out.push(id),
                Piece::Text(chunk) => self.encode_chunk(chunk, &mut out),
            }
        }
        out
    }

    /// transformers splits out its added tokens (BOS, EOS, and SD2's pad "!") before any cleaning,
    /// matching them case-sensitively. None of the three is a prefix of another, so a left-to-right
    /// scan finds what its trie finds.
    fn split_special<'t>(&self, text: &'t str) -> Vec<Piece<'t>> {
        let mut specials: Vec<(&str, u32)> = vec![("<|startoftext|>", BOS_ID), ("<|endoftext|>", EOS_ID)];
        if self.variant == ClipVariant::Sd2 {
            specials.push(("!", SD2_PAD_ID));
        }
        let mut pieces = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < text.len() {
            let rest = &text[i..];
            if let Some(&(s, id)) = specials.iter().find(|(s, _)| rest.starts_with(s)) {
                if start < i {
                    pieces.push(Piece::Text(&text[start..i]));
                }
                pieces.push(Piece::Special(id));
                i += s.len();
                start = i;
            } else {
                i += rest.chars().next().map_or(1, char::len_utf8);
            }
        }
        if start < text.len() {
            pieces.push(Piece::Text(&text[start..]));
        }
        pieces
    }

    /// `CLIPTokenizer._tokenize` on one chunk: ftfy, whitespace clean-up, lower case, the regex
    /// pre-tokenizer, then BPE per pre-token.
    fn encode_chunk(&self, chunk: &str, out: &mut Vec<u32>) {
        let text = self.shared.cleaner.clean(chunk);
        let Ok(mut cache) = self.cache.lock() else {
            // A poisoned cache only means another thread panicked mid-insert; skip caching.
            for word in self.shared.bpe.pretokens(&text) {
                self.shared.bpe.encode_word(word, out);
            }
            return;
        };
        for word in self.shared.bpe.pretokens(&text) {
            if let Some(ids) = cache.get(word) {
                out.extend_from_slice(ids);
                continue;
            }
            let start = out.len();
            self.shared.bpe.encode_word(word, out);
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(word.to_string(), out[start..].to_vec());
        }
    }

    /// kohya's `max_token_length` (None, 75, 150, 225) → the length of the padded sequence
    /// before it is cut into windows (77, 77, 152, 227).
    fn padded_length(max_token_length: Option<usize>) -> Result<usize, TokenizerError> {
        match max_token_length {
            None | Some(75) => Ok(MODEL_MAX_LENGTH),
            Some(n @ (150 | 225)) => Ok(n + 2),
            Some(n) => Err(TokenizerError::MaxTokenLength(n)),
        }
    }

    /// The ids kohya trains on for one caption (`SdTokenizeStrategy.tokenize`): the caption cut to
    /// 75/150/225 ids, wrapped in BOS/EOS and padded, then for 150/225 split into 75-id windows
    /// each wrapped in BOS … EOS/pad, shape `[n_windows][77]`.
    ///
    /// `no_token_padding` reproduces kohya's old behaviour, which its current code ignores (it
    /// always pads): one window of BOS + at most 75 ids + EOS, no padding (the batch is then
    /// padded to its longest caption with [`Self::pad_batch`]), whatever `max_token_length` says.
    pub fn tokenize_for_training(
        &self,
        caption: &str,
        max_token_length: Option<usize>,
        no_token_padding: bool,
    ) -> Result<Windows, TokenizerError> {
        let length = Self::padded_length(max_token_length)?;
        let ids = self.encode(caption);
        if no_token_padding {
            let n = ids.len().min(MODEL_MAX_LENGTH - 2);
            let mut window = Vec::with_capacity(n + 2);
            window.push(BOS_ID);
            window.extend_from_slice(&ids[..n]);
            window.push(EOS_ID);
            return Ok(vec![window]);
        }
        let full = self.pad_sequence(&ids, length);
        Ok(self.windows(&full))
    }

    /// Pads unpadded windows (`no_token_padding`) to the batch's longest, as `padding=True` did.
    pub fn pad_batch(&self, batch: &[Vec<u32>]) -> Vec<Vec<u32>> {
        let longest = batch.iter().map(Vec::len).max().unwrap_or(0);
        batch
            .iter()
            .map(|w| {
                let mut w = w.clone();
                w.resize(longest, self.pad_id());
                w
            })
            .collect()
    }

    /// `tokenizer(text, padding="max_length", truncation=True, max_length=length)`.
    fn pad_sequence(&self, ids: &[u32], length: usize) -> Vec<u32> {
        let n = ids.len().min(length - 2);
        let mut full = Vec::with_capacity(length);
        full.push(BOS_ID);
        full.extend_from_slice(&ids[..n]);
        full.push(EOS_ID);
        full.resize(length, self.pad_id());
        full
    }

    /// kohya's window construction (`TokenizeStrategy._get_input_ids`). Each window is BOS, 75 ids
    /// of the padded sequence, and the sequence's last id (EOS if the caption filled it, else
    /// pad). For SD2, a window whose content does not end in EOS/pad gets EOS as its last id, and a
    /// window that starts with pad gets EOS there instead (so it reads BOS EOS pad …).
    fn windows(&self, full: &[u32]) -> Windows {
        let len = full.len();
        if len <= MODEL_MAX_LENGTH {
            return vec![full.to_vec()];
        }
        let body = MODEL_MAX_LENGTH - 2;
        let first = full[0];
        let last = full[len - 1];
        let pad = self.pad_id();
        (1..len - MODEL_MAX_LENGTH + 2)
            .step_by(body)
            .map(|i| {
                let mut w = Vec::with_capacity(MODEL_MAX_LENGTH);
                w.push(first);
                w.extend_from_slice(&full[i..(i + body).min(len)]);
                w.push(last);
                if self.variant == ClipVariant::Sd2 {
                    let n = w.len();
                    if w[n - 2] != EOS_ID && w[n - 2] != pad {
                        w[n - 1] = EOS_ID;
                    }
                    if w[1] == pad {
                        w[1] = EOS_ID;
                    }
                }
                w
            })
            .collect()
    }

    /// kohya's attention syntax parsed into pieces and weights (see [`WeightedSpan`]).
    pub fn parse_attention(&self, caption: &str) -> Result<Vec<WeightedSpan>, TokenizerError> {
        self.shared.attention.parse(caption)
    }

    /// Ids with one weight per id, no BOS/EOS, no truncation: each piece of the attention syntax
    /// is tokenized on its own (as kohya does, so cleaning and word ends apply per piece).
    pub fn encode_weighted(&self, caption: &str) -> Result<(Vec<u32>, Vec<f64>), TokenizerError> {
        self.encode_weighted_until(caption, usize::MAX)
    }

    /// As [`Self::encode_weighted`], stopping after the first piece that takes the ids past
    /// `limit` (kohya stops tokenizing pieces there; the caller truncates).
    fn encode_weighted_until(
        &self,
        caption: &str,
        limit: usize,
    ) -> Result<(Vec<u32>, Vec<f64>), TokenizerError> {
        let mut ids = Vec::new();
        let mut weights = Vec::new();
        for span in self.parse_attention(caption)? {
            let piece = self.encode(&span.text);
            weights.resize(weights.len() + piece.len(), span.weight);
            ids.extend(piece);
            if ids.len() > limit {
                break;
            }
        }
        Ok((ids, weights))
    }

    /// `--weighted_captions` (kohya's `SdTokenizeStrategy.tokenize_with_weights`): ids laid out as
    /// [`Self::tokenize_for_training`] lays them out (always padded, as kohya), with each id's
    /// weight; BOS, EOS and padding weigh 1.0. Weights are f32, as the tensor kohya builds.
    pub fn tokenize_weighted(
        &self,
        caption: &str,
        max_token_length: Option<usize>,
    ) -> Result<WeightedWindows, TokenizerError> {
        let length = Self::padded_length(max_token_length)?;
        let body = length - 2;
        // kohya stops tokenizing pieces once past the limit, then truncates.
        let (mut ids, mut weights) = self.encode_weighted_until(caption, body)?;
        ids.truncate(body);
        weights.truncate(body);
        let full_ids = self.pad_sequence(&ids, length);
        let mut full_weights = Vec::with_capacity(length);
        full_weights.push(1.0f32);
        full_weights.extend(weights.iter().map(|&w| w as f32));
        full_weights.resize(length, 1.0);

        let windows = self.windows(&full_ids);
        if windows.len() == 1 {
            return Ok(WeightedWindows { ids: windows, weights: vec![full_weights] });
        }
        let model_body = MODEL_MAX_LENGTH - 2;
        let window_weights = (0..windows.len())
            .map(|b| {
                let mut w = vec![1.0f32; MODEL_MAX_LENGTH];
                let from = 1 + b * model_body;
                w[1..1 + model_body].copy_from_slice(&full_weights[from..from + model_body]);
                w
            })
            .collect();
        Ok(WeightedWindows { ids: windows, weights: window_weights })
    }
}
