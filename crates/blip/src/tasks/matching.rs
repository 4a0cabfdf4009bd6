//! Image-text matching, embeddings and zero-shot classification with
//! `BlipForImageTextRetrieval` checkpoints (ITM head and 256-d ITC embeddings) or `BlipModel`
//! ones (512-d features and a learned logit scale, no ITM head).

use std::num::NonZeroUsize;

use candle_core::{IndexOp, Tensor};
use candle_nn::VarBuilder;

use super::{check_not_empty, Images, Task, TaskModel, DEFAULT_MATCHING_MODEL};
use crate::config::{Architecture, BlipConfig};
use crate::error::{InvalidInput, Param, Result};
use crate::models::contrastive::ContrastiveModel;
use crate::models::retrieval::RetrievalModel;

/// The two kinds of checkpoint that embed images and texts in one space.
#[non_exhaustive]
pub enum MatchingModel {
    Retrieval(RetrievalModel),
    Contrastive(ContrastiveModel),
}

/// How well one text fits one image.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct MatchScore {
    /// ITM match probability (softmax of itm_head, index 1); `None` for BlipModel checkpoints,
    /// which have no ITM head.
    pub itm: Option<f32>,
    /// ITC cosine similarity of the normalized embeddings.
    pub itc: f32,
}

/// Zero-shot classification settings.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ClassifyOptions {
    /// Text each label is put into; `{}` marks the label.
    pub template: String,
    /// Rescore this many top labels with the ITM head (retrieval checkpoints only).
    pub rerank: Option<NonZeroUsize>,
}

impl ClassifyOptions {
    /// The template every label goes into unless another is given.
    pub const DEFAULT_TEMPLATE: &'static str = "a picture of {}";

    pub fn new(template: impl Into<String>, rerank: Option<NonZeroUsize>) -> Self {
        Self { template: template.into(), rerank }
    }

    /// Refuses a template without its `{}` and empty or repeated labels, whatever the
    /// checkpoint; returns the texts the labels become.
    pub fn validate(&self, labels: &[&str]) -> Result<Vec<String>> {
        class_prompts(labels, &self.template)
    }
}

impl Default for ClassifyOptions {
    fn default() -> Self {
        Self { template: Self::DEFAULT_TEMPLATE.into(), rerank: None }
    }
}

/// One label's scores for one image.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LabelScore {
    pub label: String,
    /// Softmax over the labels of the ITC cosines times the logit scale.
    pub probability: f32,
    pub itc: f32,
    /// ITM match probability, for the labels reranked with the ITM head.
    pub itm: Option<f32>,
}

/// A loaded retrieval or BlipModel checkpoint with its processors.
pub type ImageTextMatcher = Task<MatchingModel>;

impl TaskModel for MatchingModel {
    const ACCEPTS: &'static [Architecture] = &[Architecture::ImageTextRetrieval, Architecture::Model];
    const TASK: &'static str = "image-text matching";
    const DEFAULT_MODEL: &'static str = DEFAULT_MATCHING_MODEL;

    fn build(config: &BlipConfig, architecture: Architecture, weights: VarBuilder) -> candle_core::Result<Self> {
        match architecture {
            Architecture::Model => ContrastiveModel::new(config, weights).map(MatchingModel::Contrastive),
            _ => RetrievalModel::new(config, weights).map(MatchingModel::Retrieval),
        }
    }
}

impl ImageTextMatcher {
    /// Whether image-text matching (ITM) probabilities are available.
    pub fn has_itm_head(&self) -> bool {
        matches!(self.model, MatchingModel::Retrieval(_))
    }

    /// Width of the embeddings: 256 (retrieval ITC) or 512 (BlipModel projection).
    pub fn embedding_dim(&self) -> usize {
        match self.model {
            MatchingModel::Retrieval(_) => self.config.image_text_hidden_size,
            MatchingModel::Contrastive(_) => self.config.projection_dim,
        }
    }

    /// The factor cosines are multiplied by before a softmax: BlipModel's learned
    /// `exp(logit_scale)`; for retrieval checkpoints, which carry none, the config's
    /// `exp(logit_scale_init_value)` (1/0.07, BLIP's initial ITC temperature).
    pub fn logit_scale(&self) -> f32 {
        match &self.model {
            MatchingModel::Retrieval(_) => self.config.logit_scale_init_value.exp() as f32,
            MatchingModel::Contrastive(m) => m.logit_scale,
        }
    }

    /// Vision `last_hidden_state` of preprocessed images.
    fn vision_states(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(match &self.model {
            MatchingModel::Retrieval(m) => m.vision_model.forward(pixel_values)?,
            MatchingModel::Contrastive(m) => m.vision_model.forward(pixel_values)?,
        })
    }

    fn image_embeds_from_states(&self, states: &Tensor) -> Result<Tensor> {
        Ok(match &self.model {
            MatchingModel::Retrieval(m) => m.image_itc_embeds(states)?,
            MatchingModel::Contrastive(m) => m.image_embeds(states)?,
        })
    }

    /// Tokenized, padded texts (`param` names them in errors): input_ids and attention_mask
    /// [n, t].
    pub(super) fn encode_texts(&self, param: Param, texts: &[&str]) -> Result<(Tensor, Tensor)> {
        check_not_empty(param, texts)?;
        let positions = self.config.text_config.max_position_embeddings;
        let several = texts.len() > 1;
        let ids = texts
            .iter()
            .enumerate()
            .map(|(i, t)| self.text_processor.encode_for_encoder(t, positions, param, several.then_some(i)))
            .collect::<Result<Vec<_>>>()?;
        self.text_processor.pad_batch(&ids, &self.device)
    }

    /// Unit-norm image embeddings [n, dim].
    pub fn embed_images<'a>(&self, images: impl Into<Images<'a>>) -> Result<Tensor> {
        let pixel_values = self.pixel_values(images.into())?;
        self.image_embeds_from_states(&self.vision_states(&pixel_values)?)
    }

    /// Unit-norm text embeddings [n, dim] (each text as `[CLS] text [SEP]`, batch padded).
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Tensor> {
        let (ids, mask) = self.encode_texts(Param::Text, texts)?;
        self.text_embeds(&ids, &mask)
    }

    /// Unnormalized BlipModel features (`get_image_features`), [n, projection_dim].
    pub fn image_features<'a>(&self, images: impl Into<Images<'a>>) -> Result<Tensor> {
        match &self.model {
            MatchingModel::Contrastive(m) => {
                let pixel_values = self.pixel_values(images.into())?;
                Ok(m.image_features(&m.vision_model.forward(&pixel_values)?)?)
            }
            MatchingModel::Retrieval(_) => Err(self.needs(Param::Images, Architecture::Model)),
        }
    }

    /// Unnormalized BlipModel features (`get_text_features`), [n, projection_dim].
    pub fn text_features(&self, texts: &[&str]) -> Result<Tensor> {
        match &self.model {
            MatchingModel::Contrastive(m) => {
                let (ids, mask) = self.encode_texts(Param::Text, texts)?;
                Ok(m.text_features(&ids, Some(&mask))?)
            }
            MatchingModel::Retrieval(_) => Err(self.needs(Param::Text, Architecture::Model)),
        }
    }

    /// The refusal of `param` on a checkpoint without the head it needs.
    fn needs(&self, param: Param, needs: Architecture) -> crate::Error {
        InvalidInput::NeedsArchitecture { param, needs, found: self.architecture }.into()
    }

    /// `logits_per_image` [images, texts]: cosine × logit scale, as `BlipModel.forward`.
    pub fn logits_per_image<'a>(&self, images: impl Into<Images<'a>>, texts: &[&str]) -> Result<Tensor> {
        let cosines = self.embed_images(images)?.matmul(&self.embed_texts(texts)?.t()?)?;
        Ok((cosines * self.logit_scale() as f64)?)
    }

    /// Every image against every text: scores[image][text] (ITM for retrieval checkpoints,
    /// ITC for both kinds).
    pub fn match_texts<'a>(&self, images: impl Into<Images<'a>>, texts: &[&str]) -> Result<Vec<Vec<MatchScore>>> {
        let (ids, mask) = self.encode_texts(Param::Text, texts)?;
        let pixel_values = self.pixel_values(images.into())?;
        let states = self.vision_states(&pixel_values)?;
        let text_embeds = self.text_embeds(&ids, &mask)?;
        let itc = self.image_embeds_from_states(&states)?.matmul(&text_embeds.t()?)?.to_vec2::<f32>()?;
        let all: Vec<u32> = (0..texts.len() as u32).collect();
        itc.into_iter()
            .enumerate()
            .map(|(i, row)| {
                let itm = match &self.model {
                    MatchingModel::Retrieval(_) => {
                        self.itm(&states.i(i..i + 1)?, &ids, &mask, &all)?.into_iter().map(Some).collect()
                    }
                    MatchingModel::Contrastive(_) => vec![None; texts.len()],
                };
                Ok(row.into_iter().zip(itm).map(|(itc, itm)| MatchScore { itm, itc }).collect())
            })
            .collect()
    }

    /// Each image against its own texts: scores[i][j] for image i and `texts[i][j]` (CapFilt's
    /// filter; ITM for retrieval checkpoints, ITC for both kinds). An image may have no texts.
    pub fn match_pairs<'a>(&self, images: impl Into<Images<'a>>, texts: &[Vec<&str>]) -> Result<Vec<Vec<MatchScore>>> {
        let images = images.into();
        super::check_count(Param::Text, texts.len(), images.len()?)?;
        let flat: Vec<&str> = texts.iter().flatten().copied().collect();
        if flat.is_empty() {
            return Ok(vec![vec![]; texts.len()]);
        }
        let (ids, mask) = self.encode_texts(Param::Text, &flat)?;
        let pixel_values = self.pixel_values(images)?;
        let states = self.vision_states(&pixel_values)?;
        let itc =
            self.image_embeds_from_states(&states)?.matmul(&self.text_embeds(&ids, &mask)?.t()?)?.to_vec2::<f32>()?;
        let mut first = 0;
        texts
            .iter()
            .zip(itc)
            .enumerate()
            .map(|(i, (own, itc))| {
                let rows: Vec<u32> = (first as u32..(first + own.len()) as u32).collect();
                first += own.len();
                if rows.is_empty() {
                    return Ok(vec![]);
                }
                let itm: Vec<Option<f32>> = match &self.model {
                    MatchingModel::Retrieval(_) => {
                        self.itm(&states.i(i..i + 1)?, &ids, &mask, &rows)?.into_iter().map(Some).collect()
                    }
                    MatchingModel::Contrastive(_) => vec![None; rows.len()],
                };
                Ok(rows.iter().zip(itm).map(|(&r, itm)| MatchScore { itm, itc: itc[r as usize] }).collect())
            })
            .collect()
    }

    /// Unit-norm embeddings of encoded texts.
    fn text_embeds(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        Ok(match &self.model {
            MatchingModel::Retrieval(m) => m.text_itc_embeds(ids, Some(mask))?,
            MatchingModel::Contrastive(m) => m.text_embeds(ids, Some(mask))?,
        })
    }

    /// ITM match probabilities of encoded text rows `which` against one image's vision states
    /// [1, n, v].
    fn itm(&self, image_states: &Tensor, ids: &Tensor, mask: &Tensor, which: &[u32]) -> Result<Vec<f32>> {
        let MatchingModel::Retrieval(model) = &self.model else {
            return Err(self.needs(Param::Text, Architecture::ImageTextRetrieval));
        };
        let rows = Tensor::new(which, &self.device)?;
        let repeat = Tensor::zeros(which.len(), candle_core::DType::U32, &self.device)?;
        let logits = model.itm_logits(
            &ids.index_select(&rows, 0)?,
            Some(&mask.index_select(&rows, 0)?),
            &image_states.index_select(&repeat, 0)?,
        )?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        Ok(probs.i((.., 1))?.to_vec1()?)
    }

    /// Refuses labels, template or reranking that cannot classify with this checkpoint,
    /// before any image is decoded; returns the texts the labels become.
    pub fn validate_classify(&self, labels: &[&str], options: &ClassifyOptions) -> Result<Vec<String>> {
        if options.rerank.is_some() && !self.has_itm_head() {
            return Err(self.needs(Param::Rerank, Architecture::ImageTextRetrieval));
        }
        options.validate(labels)
    }

    /// Zero-shot classification: labels ranked by probability per image (reranked labels, when
    /// asked, first and ordered by ITM probability).
    pub fn classify<'a>(
        &self,
        images: impl Into<Images<'a>>,
        labels: &[&str],
        options: &ClassifyOptions,
    ) -> Result<Vec<Vec<LabelScore>>> {
        let prompts = self.validate_classify(labels, options)?;
        let pixel_values = self.pixel_values(images.into())?;
        let prompt_refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let (ids, mask) = self.encode_texts(Param::Label, &prompt_refs)?;
        let states = self.vision_states(&pixel_values)?;
        let cosines = self.image_embeds_from_states(&states)?.matmul(&self.text_embeds(&ids, &mask)?.t()?)?;
        let probs = candle_nn::ops::softmax_last_dim(&(&cosines * self.logit_scale() as f64)?)?.to_vec2::<f32>()?;
        let cosines = cosines.to_vec2::<f32>()?;
        let mut results = Vec::with_capacity(probs.len());
        for (i, (probs, cosines)) in probs.into_iter().zip(cosines).enumerate() {
            let mut scores: Vec<LabelScore> = labels
                .iter()
                .zip(probs.into_iter().zip(cosines))
                .map(|(label, (probability, itc))| LabelScore { label: label.to_string(), probability, itc, itm: None })
                .collect();
            let mut order: Vec<usize> = (0..scores.len()).collect();
            order.sort_by(|&a, &b| scores[b].probability.total_cmp(&scores[a].probability));
            if let Some(k) = options.rerank.map(NonZeroUsize::get) {
                let top: Vec<u32> = order[..k.min(order.len())].iter().map(|&j| j as u32).collect();
                let itm = self.itm(&states.i(i..i + 1)?, &ids, &mask, &top)?;
                for (&j, p) in top.iter().zip(itm) {
                    scores[j as usize].itm = Some(p);
                }
                let itm_of = |j: usize| scores[j].itm.unwrap_or(f32::NEG_INFINITY);
                order[..top.len()].sort_by(|&a, &b| itm_of(b).total_cmp(&itm_of(a)));
            }
            results.push(order.into_iter().map(|j| scores[j].clone()).collect());
        }
        Ok(results)
    }
}

/// Each label put into the template; labels must be distinct and non-empty, and the template
/// must mark the label's place.
fn class_prompts(labels: &[&str], template: &str) -> Result<Vec<String>> {
    if !template.contains("{}") {
        return Err(InvalidInput::NoPlaceholder { template: template.to_string() }.into());
    }
    check_not_empty(Param::Label, labels)?;
    let mut seen = std::collections::HashSet::new();
    labels
        .iter()
        .map(|label| {
            if !seen.insert(*label) {
                return Err(InvalidInput::Duplicate { param: Param::Label, value: label.to_string() }.into());
            }
            Ok(template.replace("{}", label))
        })
        .collect()
}
