//! Continuous batching: generations started at different times, with different options and
//! prompts, joined into one running batch (`GenerationRun::join`), give every input exactly
//! what it gets decoded alone: the same tokens, the same log-probabilities.

use std::path::{Path, PathBuf};

use blip::generation::GenerationOptions;
use blip::processor::image::load_image;
use blip::{AnswerOptions, CaptionOptions, Captioner, Device, GeneratedText, GenerationRun, Prompt, QuestionAnswerer};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn images() -> Vec<blip::RgbImage> {
    ["chelsea.png", "astronaut.png", "rocket.jpg"]
        .iter()
        .map(|name| load_image(&fixtures().join("images-model").join(name)).unwrap())
        .collect()
}

/// Steps `run` to its end, collecting what `take_finished` gives (by input number).
fn drain(run: &mut GenerationRun, results: &mut Vec<Option<Vec<GeneratedText>>>) {
    loop {
        let done = run.step(&mut |_, _, _| ()).unwrap();
        collect(run, results);
        if done {
            break;
        }
    }
}

fn collect(run: &mut GenerationRun, results: &mut Vec<Option<Vec<GeneratedText>>>) {
    for (input, texts) in run.take_finished().unwrap() {
        if results.len() <= input {
            results.resize(input + 1, None);
        }
        assert!(results[input].is_none(), "input {input} finished twice");
        results[input] = Some(texts);
    }
}

/// Same tokens, and log-probabilities within 1e-6 relative: the CPU kernels split work by
/// batch size (the cross-attention's encoder states among threads), so a batch of other rows
/// sums in another order, as any batching does.
fn assert_same(what: &str, joined: &[GeneratedText], alone: &[GeneratedText]) {
    assert_eq!(joined.len(), alone.len(), "{what}: number of sequences");
    for (j, a) in joined.iter().zip(alone) {
        assert_eq!(j.tokens, a.tokens, "{what}: tokens");
        let diff = (j.log_prob - a.log_prob).abs();
        assert!(diff <= 1e-6 * a.log_prob.abs().max(1.0), "{what}: log-probability {} vs {}", j.log_prob, a.log_prob);
    }
}

#[test]
fn captions_joining_a_running_batch_equal_captions_alone() {
    let captioner = Captioner::load(fixtures().join("models/tiny-caption-st").to_str().unwrap(), &Device::Cpu).unwrap();
    let images = images();
    let greedy = GenerationOptions::default().max_new_tokens(14);
    // (image, options): a prompt, min length and penalties, sampling with two sequences, and
    // beam search (a batch row per beam)
    let requests: Vec<(usize, CaptionOptions)> = vec![
        (0, CaptionOptions::new(Prompt::None, greedy.clone())),
        (1, CaptionOptions::new(Prompt::Same("a picture of".into()), greedy.clone())),
        (2, CaptionOptions::new(Prompt::None, greedy.clone().min_new_tokens(11).repetition_penalty(1.3))),
        (
            0,
            CaptionOptions::new(
                Prompt::Same("an astronaut in space with".into()),
                greedy.clone().do_sample(true).seed(Some(7)).num_return_sequences(2).top_k(20),
            ),
        ),
        (1, CaptionOptions::new(Prompt::None, greedy.clone().num_beams(3))),
        (2, CaptionOptions::new(Prompt::Same("rocket".into()), greedy.clone().no_repeat_ngram_size(2))),
    ];
    let alone: Vec<Vec<GeneratedText>> = requests
        .iter()
        .map(|(image, options)| {
            let run = captioner.start_captions(std::slice::from_ref(&images[*image]), options).unwrap();
            finish_one(run)
        })
        .collect();

    // The first two start together (one start, two prompt lengths: two groups that join after
    // their first step); each other request joins the running batch a step after the one before
    // it, and one more joins and is stopped (its client gone) two steps later.
    let mut results = Vec::new();
    let first: Vec<blip::RgbImage> = vec![images[requests[0].0].clone(), images[requests[1].0].clone()];
    let prompts = Prompt::PerImage(vec![None, Some("a picture of".into())]);
    let mut run = captioner.start_captions(&first, &CaptionOptions::new(prompts, greedy.clone())).unwrap();
    let mut numbers = vec![0, 1];
    let mut joined_rows = 0;
    let mut stopped = None;
    for (step, (image, options)) in requests[2..].iter().enumerate() {
        run.step(&mut |_, _, _| ()).unwrap();
        collect(&mut run, &mut results);
        joined_rows = joined_rows.max(run.rows());
        if step == 1 {
            let extra = captioner.start_captions(std::slice::from_ref(&images[1]), &requests[0].1).unwrap();
            stopped = Some(run.join(extra).unwrap());
        }
        if step == 3 {
            run.stop(stopped.unwrap()).unwrap();
        }
        let newcomer = captioner.start_captions(std::slice::from_ref(&images[*image]), options).unwrap();
        numbers.push(run.join(newcomer).unwrap());
    }
    drain(&mut run, &mut results);
    assert!(joined_rows >= 5, "requests ran together: {joined_rows} rows at most");
    let stopped = results[stopped.unwrap()].as_ref().expect("a stopped input is finished");
    assert!(stopped[0].tokens.len() < 1 + 14, "stopped early: {:?}", stopped[0].tokens);
    for (request, number) in numbers.iter().enumerate() {
        let joined = results[*number].as_ref().unwrap_or_else(|| panic!("request {request} not finished"));
        assert_same(&format!("request {request}"), joined, &alone[request]);
    }
}

fn finish_one(run: GenerationRun) -> Vec<GeneratedText> {
    let mut run = run;
    let mut results = Vec::new();
    drain(&mut run, &mut results);
    results.into_iter().next().flatten().expect("one input")
}

#[test]
fn answers_to_questions_of_other_lengths_joining_a_running_batch_equal_answers_alone() {
    let qa = QuestionAnswerer::load(fixtures().join("models/tiny-vqa").to_str().unwrap(), &Device::Cpu).unwrap();
    let images = images();
    let questions =
        ["what is in the picture?", "how many animals are there?", "is this a rocket that flies into space at night?"];
    let options = AnswerOptions::new(GenerationOptions::default().max_new_tokens(10).min_new_tokens(6));
    let alone: Vec<Vec<GeneratedText>> = (0..3)
        .map(|i| finish_one(qa.start_answers(std::slice::from_ref(&images[i]), &[questions[i]], &options).unwrap()))
        .collect();
    // the longest question joins last: the running batch's encoder states are padded to it
    let mut results = Vec::new();
    let mut run = qa.start_answers(std::slice::from_ref(&images[0]), &[questions[0]], &options).unwrap();
    let mut numbers = vec![0];
    for i in 1..3 {
        run.step(&mut |_, _, _| ()).unwrap();
        collect(&mut run, &mut results);
        numbers.push(
            run.join(qa.start_answers(std::slice::from_ref(&images[i]), &[questions[i]], &options).unwrap()).unwrap(),
        );
    }
    drain(&mut run, &mut results);
    for (i, number) in numbers.iter().enumerate() {
        assert_same(&format!("question {i}"), results[*number].as_ref().unwrap(), &alone[i]);
    }
}
