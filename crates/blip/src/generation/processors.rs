//! transformers' logits processors and warpers, applied to one row's scores in place, with
//! transformers' exact rules.

/// `RepetitionPenaltyLogitsProcessor`: every token already in the sequence (prompt and bos
/// included) has its score divided by `penalty` when positive, multiplied when negative.
pub fn repetition_penalty(scores: &mut [f32], sequence: &[u32], penalty: f32) {
    let mut seen = vec![false; scores.len()];
    for &token in sequence {
        if let Some(flag) = seen.get_mut(token as usize) {
            *flag = true;
        }
    }
    for (score, seen) in scores.iter_mut().zip(seen) {
        if seen {
            *score = if *score < 0.0 { *score * penalty } else { *score / penalty };
        }
    }
}

/// `NoRepeatNGramLogitsProcessor`: bans every token that would complete an n-gram already in
/// the sequence (the prompt included).
pub fn no_repeat_ngram(scores: &mut [f32], sequence: &[u32], n: usize) {
    let len = sequence.len();
    if n == 0 || len + 1 < n {
        return;
    }
    let suffix = &sequence[len + 1 - n..];
    for window in sequence.windows(n) {
        if &window[..n - 1] == suffix {
            if let Some(score) = scores.get_mut(window[n - 1] as usize) {
                *score = f32::NEG_INFINITY;
            }
        }
    }
}

/// `TopKLogitsWarper`: removes tokens scoring below the k-th best (ties with it stay).
pub fn top_k(scores: &mut [f32], k: usize) {
    let k = k.min(scores.len());
    if k == 0 {
        return;
    }
    let mut sorted = scores.to_vec();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let threshold = sorted[k - 1];
    for score in scores.iter_mut() {
        if *score < threshold {
            *score = f32::NEG_INFINITY;
        }
    }
}

/// `TopPLogitsWarper`: keeps the smallest set of best tokens whose probability reaches `p`:
/// sorted ascending, tokens whose cumulative probability is at most 1 − p are removed, the
/// best `min_keep` always kept.
pub fn top_p(scores: &mut [f32], p: f32, min_keep: usize) {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Ascending, as torch.sort(descending=False); equal scores keep their index order.
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let probs = softmax(&order.iter().map(|&i| scores[i]).collect::<Vec<_>>());
    let keep_from = order.len().saturating_sub(min_keep);
    let mut cumulative = 0f32;
    let threshold = 1.0 - p;
    let mut remove = Vec::new();
    for (rank, (&index, prob)) in order.iter().zip(probs).enumerate() {
        cumulative += prob;
        if cumulative <= threshold && rank < keep_from {
            remove.push(index);
        }
    }
    for index in remove {
        scores[index] = f32::NEG_INFINITY;
    }
}

/// Softmax in f32 (−inf scores get probability 0).
pub fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = scores.iter().map(|&s| (s - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Log-softmax in f32.
pub fn log_softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = scores.iter().map(|&s| (s - max).exp()).sum();
    let log_sum = max + sum.ln();
    scores.iter().map(|&s| s - log_sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_scores() {
        let mut scores = vec![2.0, -2.0, 1.0, 4.0];
        repetition_penalty(&mut scores, &[0, 1, 0, 9], 2.0);
        assert_eq!(scores, vec![1.0, -4.0, 1.0, 4.0]);
    }

    #[test]
    fn ngrams_already_seen_cannot_be_completed() {
        // bigrams (5,6) and (6,5) were seen; the sequence ends in 5, so 6 is banned
        let mut scores = vec![0.0; 8];
        no_repeat_ngram(&mut scores, &[5, 6, 5], 2);
        assert_eq!(scores.iter().filter(|s| s.is_infinite()).count(), 1);
        assert!(scores[6].is_infinite());
    }

    #[test]
    fn top_k_keeps_ties_and_top_p_keeps_the_nucleus() {
        let mut scores = vec![1.0, 3.0, 3.0, 0.0];
        top_k(&mut scores, 1);
        assert_eq!(scores.iter().filter(|s| s.is_finite()).count(), 2);

        // probabilities 0.5, 0.3, 0.2 (as logits): top_p 0.6 keeps the two best
        let mut scores: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        top_p(&mut scores, 0.6, 1);
        assert!(scores[0].is_finite() && scores[1].is_finite() && scores[2].is_infinite());
    }
}
