//! Text in and out: the BERT WordPiece tokenizer BLIP uses, the captioning prompt convention,
//! and decoding generated ids back to text.

use std::path::Path;

use candle_core::{Device, Tensor};
use tokenizers::Tokenizer;

use crate::config::TextConfig;
use crate::error::{Error, InvalidInput, Param, Result};

/// Tokenizer plus the special ids of the model (bos/[DEC] exists only in the model's vocabulary).
pub struct TextProcessor {
    tokenizer: Tokenizer,
    bos_token_id: u32,
    sep_token_id: u32,
    pad_token_id: u32,
}

impl TextProcessor {
    /// Loads `tokenizer.json`, or builds the BERT tokenizer from a `vocab.txt`.
    pub fn from_file(path: &Path, config: &TextConfig) -> Result<Self> {
        let mut tokenizer = if path.file_name().is_some_and(|n| n == "vocab.txt") {
            bert_from_vocab(path)?
        } else {
            Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?
        };
        // tokenizer.json files may carry fixed padding/truncation (bert-base-uncased's pads to
        // 128); transformers resets both on every call unless asked, so do the same.
        tokenizer.with_truncation(None).map_err(|e| Error::Tokenizer(e.to_string()))?.with_padding(None);
        Ok(Self {
            tokenizer,
            bos_token_id: config.bos_token_id,
            sep_token_id: config.sep_token_id,
            pad_token_id: config.pad_token_id,
        })
    }

    /// `[CLS] text [SEP]` ids, as the BLIP processor tokenizes text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(text, true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `[CLS] text [SEP]` for the text encoder, cut to `max_len` tokens (keeping the final
    /// [SEP], as the tokenizer's `truncation=True` does) with a warning: BLIP's text has 512
    /// positions and a longer text cannot be encoded whole. Empty text is refused.
    /// `param` and `index` (its place among several) name the text in the refusal.
    pub fn encode_for_encoder(
        &self,
        text: &str,
        max_len: usize,
        param: Param,
        index: Option<usize>,
    ) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        if ids.len() <= 2 {
            return Err(InvalidInput::Empty { param, index }.into());
        }
        if ids.len() > max_len {
            tracing::warn!(
                "text of {} tokens truncated to the model's {max_len} positions: \"{}...\"",
                ids.len(),
                text.chars().take(40).collect::<String>()
            );
            ids.truncate(max_len - 1);
            ids.push(self.sep_token_id);
        }
        Ok(ids)
    }

    /// Rows of ids right-padded with `pad_token_id` into `input_ids` [b, t] and the
    /// `attention_mask` [b, t] (1 = token, 0 = padding), as the processor's `padding=True`.
    pub fn pad_batch(&self, rows: &[Vec<u32>], device: &Device) -> Result<(Tensor, Tensor)> {
        let width = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * width);
        let mut mask = Vec::with_capacity(rows.len() * width);
        for row in rows {
            ids.extend(row.iter().copied().chain(std::iter::repeat_n(self.pad_token_id, width - row.len())));
            mask.extend((0..width).map(|i| u32::from(i < row.len())));
        }
        let shape = (rows.len(), width);
        Ok((Tensor::from_vec(ids, shape, device)?, Tensor::from_vec(mask, shape, device)?))
    }

    /// A candidate answer as the answer decoder reads and scores it (original BLIP's
    /// rank_answer): `[bos] answer [SEP]`.
    pub fn answer_ids(&self, answer: &str, index: usize) -> Result<Vec<u32>> {
        let mut ids = self.encode(answer)?;
        if ids.len() <= 2 {
            return Err(InvalidInput::Empty { param: Param::Answers, index: Some(index) }.into());
        }
        ids[0] = self.bos_token_id;
        Ok(ids)
    }

    pub fn bos_token_id(&self) -> u32 {
        self.bos_token_id
    }

    /// The vocabulary entry of a token id (`##ing` for a word piece).
    pub fn token_text(&self, id: u32) -> Result<String> {
        self.tokenizer.id_to_token(id).ok_or_else(|| Error::Tokenizer(format!("no token {id} in the vocabulary")))
    }

    pub fn pad_token_id(&self) -> u32 {
        self.pad_token_id
    }

    pub fn sep_token_id(&self) -> u32 {
        self.sep_token_id
    }

    /// The ids captioning starts from: `[bos]` alone, or a prompt tokenized as `[CLS] prompt
    /// [SEP]` with [CLS] replaced by bos and the trailing [SEP] dropped (what
    /// `BlipForConditionalGeneration.generate` does).
    pub fn caption_prefix(&self, prompt: Option<&str>) -> Result<Vec<u32>> {
        let Some(prompt) = prompt else { return Ok(vec![self.bos_token_id]) };
        let mut ids = self.encode(prompt)?;
        if ids.last() == Some(&self.sep_token_id) {
            ids.pop();
        }
        match ids.first_mut() {
            Some(first) => *first = self.bos_token_id,
            None => ids.push(self.bos_token_id),
        }
        Ok(ids)
    }

    /// Text of `ids` without special tokens (`decode(..., skip_special_tokens=True)`); ids the
    /// tokenizer does not know (bos 30522) are skipped as transformers skips them.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
    }
}

/// bert-base-uncased's tokenizer from its vocabulary, for checkpoints without tokenizer.json.
fn bert_from_vocab(vocab: &Path) -> Result<Tokenizer> {
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::normalizers::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::processors::bert::BertProcessing;

    let vocab_name = vocab.display().to_string();
    let model = WordPiece::from_file(&vocab_name)
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| Error::Tokenizer(format!("{vocab_name}: {e}")))?;
    let id = |token: &str| {
        tokenizers::Model::token_to_id(&model, token)
            .ok_or_else(|| Error::Tokenizer(format!("{vocab_name}: no {token} token")))
    };
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
        .map_err(|e| Error::Tokenizer(e.to_string()))?
        .with_pre_tokenizer(Some(BertPreTokenizer))
        .with_post_processor(Some(BertProcessing::new(("[SEP]".into(), sep), ("[CLS]".into(), cls))))
        .with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
    let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"].map(|t| tokenizers::AddedToken::from(t, true));
    tokenizer.add_special_tokens(specials).map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(tokenizer)
}
