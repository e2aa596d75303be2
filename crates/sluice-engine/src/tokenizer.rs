//! Tokenizers: a model directory's `tokenizer.json`, or the vocabulary
//! embedded in a GGUF file, both run by the `tokenizers` crate.
//!
//! GGUF vocabularies are turned into the equivalent `tokenizer.json`
//! description: byte-level BPE for `tokenizer.ggml.model = "gpt2"` (with the
//! pre-tokenizer regex named by `tokenizer.ggml.pre`), and a byte-fallback
//! unigram model over the stored scores for SentencePiece (`"llama"`)
//! vocabularies, which approximates llama.cpp's SPM merge order.

use serde_json::{json, Value as Json};
use sluice_core::{Error, Result};
use sluice_format::{ModelFiles, Value};

/// A tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("tokenizer: {e}"))
}

const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF metadata key under which packed files store a `tokenizer.json`.
pub const PACKED_TOKENIZER_KEY: &str = "sluice.tokenizer";

impl Tokenizer {
    /// The tokenizer of a model, if it has one.
    pub fn for_model(files: &ModelFiles) -> Result<Option<Tokenizer>> {
        if files.hf_config().is_some() {
            let p = files.path.join("tokenizer.json");
            if !p.is_file() {
                return Ok(None);
            }
            let inner = tokenizers::Tokenizer::from_file(&p)
                .map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))?;
            return Ok(Some(Tokenizer { inner }));
        }
        let Some(g) = files.gguf() else {
            return Ok(None);
        };
        if let Some(j) = g.get(PACKED_TOKENIZER_KEY).and_then(Value::as_str) {
            let inner = tokenizers::Tokenizer::from_bytes(j.as_bytes()).map_err(tok_err)?;
            return Ok(Some(Tokenizer { inner }));
        }
        let model = g.get("tokenizer.ggml.model").and_then(Value::as_str);
        let Some(tokens) = g.get("tokenizer.ggml.tokens").and_then(Value::as_array) else {
            return Ok(None);
        };
        let tokens: Vec<&str> = tokens.iter().map(|t| t.as_str().unwrap_or("")).collect();
        let types: Vec<u64> = g
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        // Control (3) and user-defined (4) tokens are matched whole.
        let added: Vec<Json> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": types[i] == 3})
            })
            .collect();
        let desc = match model {
            Some("gpt2") => {
                let merges: Vec<&str> = g
                    .get("tokenizer.ggml.merges")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().map(|v| v.as_str().unwrap_or("")).collect())
                    .unwrap_or_default();
                let vocab: serde_json::Map<String, Json> = tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.to_string(), json!(i)))
                    .collect();
                let pre = g.get("tokenizer.ggml.pre").and_then(Value::as_str);
                let split = match pre {
                    Some("qwen2") | Some("deepseek-r1-qwen") => Some(QWEN2_SPLIT),
                    Some("llama3") | Some("llama-bpe") | Some("olmo") | Some("dbrx") => {
                        Some(LLAMA3_SPLIT)
                    }
                    _ => None,
                };
                let pre_tok = match split {
                    Some(re) => json!({"type": "Sequence", "pretokenizers": [
                        {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
                        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]}),
                    None => json!({"type": "ByteLevel", "add_prefix_space": false,
                                   "trim_offsets": true, "use_regex": true}),
                };
                json!({
                    "version": "1.0", "truncation": null, "padding": null,
                    "added_tokens": added, "normalizer": null, "pre_tokenizer": pre_tok,
                    "post_processor": null,
                    "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                    "model": {"type": "BPE", "dropout": null, "unk_token": null,
                              "continuing_subword_prefix": null, "end_of_word_suffix": null,
                              "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                              "vocab": vocab, "merges": merges}
                })
            }
            Some("llama") => {
                let scores: Vec<f64> = g
                    .get("tokenizer.ggml.scores")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect())
                    .unwrap_or_default();
                let vocab: Vec<Json> = tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| json!([t, scores.get(i).copied().unwrap_or(0.0)]))
                    .collect();
                let unk = g
                    .get("tokenizer.ggml.unknown_token_id")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                json!({
                    "version": "1.0", "truncation": null, "padding": null,
                    "added_tokens": added,
                    "normalizer": {"type": "Sequence", "normalizers": [
                        {"type": "Prepend", "prepend": "▁"},
                        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
                    "pre_tokenizer": null, "post_processor": null,
                    "decoder": {"type": "Sequence", "decoders": [
                        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                        {"type": "ByteFallback"}, {"type": "Fuse"},
                        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
                    "model": {"type": "Unigram", "unk_id": unk, "vocab": vocab, "byte_fallback": true}
                })
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "GGUF tokenizer model {:?}",
                    other.unwrap_or("(none)")
                )))
            }
        };
        let inner: tokenizers::Tokenizer = desc.to_string().parse().map_err(tok_err)?;
        Ok(Some(Tokenizer { inner }))
    }

    /// Token ids of `text` (special tokens written in the text are matched).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// The tokenizer as `tokenizer.json` text (stored in packed files).
    pub fn to_json(&self) -> String {
        self.inner.to_string(false).unwrap_or_default()
    }

    /// The id of a token given as its text (`<|im_end|>`), if the
    /// vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Each token id's bytes as they appear in decoded text, and whether
    /// it is an added token (matched whole by [`Tokenizer::encode`], such
    /// as `<|im_end|>`); for constrained decoding, which must know what a
    /// token writes before choosing it. A token whose bytes cannot be
    /// told (a hole in the ids) has none.
    pub fn token_bytes(&self) -> Vec<(Vec<u8>, bool)> {
        let added = self.inner.get_added_tokens_decoder();
        let decoder = serde_json::from_str::<Json>(&self.to_json())
            .ok()
            .and_then(|j| j.get("decoder").map(Json::to_string))
            .unwrap_or_default();
        let byte_level = decoder.contains("\"ByteLevel\"");
        let spm = decoder.contains("ByteFallback") || decoder.contains("Metaspace");
        let unbyte = byte_level_chars();
        (0..self.vocab_size() as u32)
            .map(|id| {
                if let Some(t) = added.get(&id) {
                    return (t.content.as_bytes().to_vec(), true);
                }
                let Some(piece) = self.inner.id_to_token(id) else {
                    return (Vec::new(), false);
                };
                let bytes = if byte_level {
                    piece.chars().map(|c| unbyte.get(&c).copied()).collect()
                } else if spm {
                    spm_bytes(&piece)
                } else {
                    None
                };
                let bytes =
                    bytes.unwrap_or_else(|| self.decode(&[id]).unwrap_or_default().into_bytes());
                (bytes, false)
            })
            .collect()
    }
}

/// Byte-level BPE's alphabet, character to byte: printable bytes stand
/// for themselves, the others for the characters from U+0100 on, in
/// byte order.
fn byte_level_chars() -> std::collections::HashMap<char, u8> {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut next = 0x100u32;
    (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            (char::from_u32(c).unwrap_or('\0'), b as u8)
        })
        .collect()
}

/// A SentencePiece piece's bytes: `<0xAB>` is the byte, `▁` a space.
fn spm_bytes(piece: &str) -> Option<Vec<u8>> {
    if let Some(h) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>')) {
        if h.len() == 2 {
            return u8::from_str_radix(h, 16).ok().map(|b| vec![b]);
        }
    }
    Some(piece.replace('\u{2581}', " ").into_bytes())
}

/// Turns a growing token sequence into text increments, holding back bytes
/// of a multi-byte character until it is complete.
pub struct TextStream {
    ids: Vec<u32>,
    printed: usize,
}

impl Default for TextStream {
    fn default() -> Self {
        Self::new()
    }
}

impl TextStream {
    /// An empty stream.
    pub fn new() -> Self {
        TextStream {
            ids: Vec::new(),
            printed: 0,
        }
    }

    /// Adds a token; returns the newly completed text.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if text.ends_with('\u{fffd}') || text.len() < self.printed {
            return Ok(String::new());
        }
        let new = text.get(self.printed..).unwrap_or("").to_string();
        self.printed = text.len();
        Ok(new)
    }
}
