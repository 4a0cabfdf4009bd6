//! Batching across requests: each model has one worker thread and a bounded queue. The worker
//! takes what is waiting (up to `--max-batch-size` jobs), drops the jobs whose client is gone,
//! and runs the rest in as few library calls as their options allow: images of concurrent
//! requests go through the vision tower together, and their sequences decode together.

use std::sync::Arc;
use std::time::{Duration, Instant};

use blip::{
    AnswerOptions, CaptionOptions, Captioner, ClassifyOptions, GenerationOptions, GenerationRun, ImageTextMatcher,
    Images, LabelScore, MatchScore, Prompt, QuestionAnswerer, RgbImage, Tensor,
};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// A loaded model: which task type holds it decides the tasks it serves.
#[derive(Clone)]
pub enum Engine {
    Caption(Arc<Captioner>),
    Vqa(Arc<QuestionAnswerer>),
    Matching(Arc<ImageTextMatcher>),
}

impl Engine {
    /// An image's `pixel_values` [1, 3, size, size], by the model's own processor.
    pub fn preprocess(&self, image: RgbImage) -> blip::Result<Tensor> {
        let images = [image];
        let pixels = match self {
            Engine::Caption(task) => task.pixel_values(Images::from(&images))?,
            Engine::Vqa(task) => task.pixel_values(Images::from(&images))?,
            Engine::Matching(task) => task.pixel_values(Images::from(&images))?,
        };
        Ok(pixels.into_owned())
    }
}

/// (image or question, sequence, token) for each token chosen, when a client streams.
pub type TokenSender = mpsc::UnboundedSender<(usize, u32)>;

/// An image as the model's processor made it: `pixel_values` [1, 3, size, size]. Queued jobs
/// hold these rather than decoded images, so that a queue of large photos stays small.
pub type Pixels = Tensor;

/// What a request asks of the model, its inputs decoded and its options checked.
pub enum Work {
    Caption { image: Pixels, prompt: Option<String>, generation: GenerationOptions, tokens: Option<TokenSender> },
    Answer { image: Pixels, question: String, generation: GenerationOptions, tokens: Option<TokenSender> },
    Classify { image: Pixels, labels: Vec<String>, options: ClassifyOptions },
    Match { image: Pixels, texts: Vec<String> },
    EmbedImage { image: Pixels },
    EmbedText { text: String },
}

/// What the model gave back for one job.
#[derive(Debug)]
pub enum Output {
    /// Generated sequences, best first.
    Texts(Vec<blip::GeneratedText>),
    Labels(Vec<LabelScore>),
    Matches(Vec<MatchScore>),
    Embedding(Vec<f32>),
}

/// A job's answer and the size of the batch it ran in.
pub type Reply = Result<(Output, usize), ApiError>;

pub struct Job {
    pub work: Work,
    pub reply: oneshot::Sender<Reply>,
}

/// A place in a model's queue, held from before a request's body is read until the worker
/// takes its job: at most `--max-queue` requests hold bodies, images or pixels at once.
pub type Slot = OwnedSemaphorePermit;

/// A job in the queue with the place it holds.
struct Queued {
    job: Job,
    _slot: Slot,
}

/// The queue in front of one model's worker.
pub struct Scheduler {
    queue: mpsc::Sender<Queued>,
    slots: Arc<Semaphore>,
    max_queue: usize,
}

/// The queue is full: the caller answers 429.
pub struct Overloaded;

impl Scheduler {
    /// Starts the worker thread of `engine`, named `model` in the metrics.
    pub fn start(engine: Engine, model: String, max_batch: usize, max_queue: usize, metrics: Arc<Metrics>) -> Self {
        let max_queue = max_queue.max(1);
        let (queue, jobs) = mpsc::channel(max_queue);
        let slots = Arc::new(Semaphore::new(max_queue));
        let worker = Worker { engine, model, max_batch: max_batch.max(1), metrics, slots: slots.clone(), max_queue };
        std::thread::Builder::new()
            .name("blip-worker".into())
            .spawn(move || worker.run(jobs))
            .expect("a thread can be spawned");
        Self { queue, slots, max_queue }
    }

    /// A place in the queue, or `Overloaded` at once when there is none.
    pub fn reserve(&self) -> Result<Slot, Overloaded> {
        self.slots.clone().try_acquire_owned().map_err(|_| Overloaded)
    }

    /// Queues `work` in the place `slot` holds; the receiver gets its answer. Dropping the
    /// receiver cancels the job (before it starts, or between generation steps).
    pub fn submit(&self, work: Work, slot: Slot) -> Result<oneshot::Receiver<Reply>, ApiError> {
        let (reply, answer) = oneshot::channel();
        // Never full: the channel holds as many jobs as there are slots.
        self.queue
            .try_send(Queued { job: Job { work, reply }, _slot: slot })
            .map_err(|_| ApiError::internal("the model's worker has stopped"))?;
        Ok(answer)
    }

    /// Requests holding a place: being read and decoded, or queued.
    pub fn waiting(&self) -> usize {
        self.max_queue - self.slots.available_permits()
    }
}

struct Worker {
    engine: Engine,
    model: String,
    max_batch: usize,
    metrics: Arc<Metrics>,
    /// The queue's places, to see requests on their way in.
    slots: Arc<Semaphore>,
    max_queue: usize,
}

/// Longest a worker waits for requests on their way in before it starts a batch.
const GATHER: Duration = Duration::from_millis(50);

impl Worker {
    /// Runs batches until every sender is gone (the server shut down).
    fn run(self, mut jobs: mpsc::Receiver<Queued>) {
        while let Some(first) = jobs.blocking_recv() {
            // Taken from the queue, the jobs give their places back at once.
            let Queued { job, _slot } = first;
            drop(_slot);
            let mut batch = vec![job];
            // Requests that hold a place but are not queued yet are still being decoded: wait
            // a little for them (alone, a request waits for nothing), so that requests sent
            // together run together instead of the first alone.
            let deadline = Instant::now() + GATHER;
            while batch.len() < self.max_batch {
                match jobs.try_recv() {
                    Ok(Queued { job, _slot }) => batch.push(job),
                    Err(_) if self.slots.available_permits() < self.max_queue && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(_) => break,
                }
            }
            let before = batch.len();
            batch.retain(|job| !job.reply.is_closed());
            self.metrics.cancelled(&self.model, before - batch.len());
            if batch.is_empty() {
                continue;
            }
            let start = Instant::now();
            let size = batch.len();
            self.metrics.batch(&self.model, size);
            // rayon's pool runs the model's kernels; a worker of it runs a batch's many small
            // parallel steps inline (see blip::generation::generate).
            // A panic (a bug) fails this batch's requests (their replies are dropped: 500),
            // not the worker.
            let ran =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rayon::scope(|_| self.run_batch(batch))));
            if ran.is_err() {
                tracing::error!(model = self.model, "a batch panicked; its requests failed");
            }
            tracing::debug!(model = self.model, size, seconds = start.elapsed().as_secs_f64(), "batch");
        }
    }

    /// Runs the jobs in groups that one library call can serve together.
    fn run_batch(&self, batch: Vec<Job>) {
        let size = batch.len();
        let mut groups: Vec<Vec<Job>> = Vec::new();
        for job in batch {
            match groups.iter_mut().find(|group| batches_with(&group[0].work, &job.work)) {
                Some(group) => group.push(job),
                None => groups.push(vec![job]),
            }
        }
        for group in groups {
            let (works, replies): (Vec<Work>, Vec<oneshot::Sender<Reply>>) =
                group.into_iter().map(|job| (job.work, job.reply)).unzip();
            let results = match self.run_group(works, &replies) {
                Ok(outputs) => outputs.into_iter().map(Ok).collect(),
                Err(err) => replies.iter().map(|_| Err(err.clone())).collect::<Vec<_>>(),
            };
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result.map(|output| (output, size)));
            }
        }
    }

    /// One library call for jobs that [`batches_with`] put together.
    /// Generation stops early for jobs whose client is gone (`replies` closed).
    fn run_group(&self, works: Vec<Work>, replies: &[oneshot::Sender<Reply>]) -> Result<Vec<Output>, ApiError> {
        match (&self.engine, &works[0]) {
            (Engine::Caption(captioner), Work::Caption { generation, .. }) => {
                let generation = generation.clone();
                let (mut images, mut prompts, mut senders) = (Vec::new(), Vec::new(), Vec::new());
                for work in works {
                    let Work::Caption { image, prompt, tokens, .. } = work else { unreachable!("grouped") };
                    images.push(image);
                    prompts.push(prompt);
                    senders.push(tokens);
                }
                let pixels = self.batch_pixels(images)?;
                let options = CaptionOptions::new(Prompt::PerImage(prompts), generation);
                let run = captioner.start_captions(&pixels, &options)?;
                self.generate(run, &senders, replies)
            }
            (Engine::Vqa(vqa), Work::Answer { generation, .. }) => {
                let options = AnswerOptions::new(generation.clone());
                let (mut images, mut questions, mut senders) = (Vec::new(), Vec::new(), Vec::new());
                for work in works {
                    let Work::Answer { image, question, tokens, .. } = work else { unreachable!("grouped") };
                    images.push(image);
                    questions.push(question);
                    senders.push(tokens);
                }
                let pixels = self.batch_pixels(images)?;
                let questions: Vec<&str> = questions.iter().map(String::as_str).collect();
                let run = vqa.start_answers(&pixels, &questions, &options)?;
                self.generate(run, &senders, replies)
            }
            (Engine::Matching(matcher), Work::Classify { labels, options, .. }) => {
                let (labels, options) = (labels.clone(), options.clone());
                let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
                let pixels = self.take_images(works)?;
                Ok(matcher.classify(&pixels, &labels, &options)?.into_iter().map(Output::Labels).collect())
            }
            (Engine::Matching(matcher), Work::Match { texts, .. }) => {
                let texts = texts.clone();
                let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
                let pixels = self.take_images(works)?;
                Ok(matcher.match_texts(&pixels, &texts)?.into_iter().map(Output::Matches).collect())
            }
            (Engine::Matching(matcher), Work::EmbedImage { .. }) => {
                let pixels = self.take_images(works)?;
                let embeddings = matcher.embed_images(&pixels)?.to_vec2::<f32>().map_err(blip::Error::from)?;
                Ok(embeddings.into_iter().map(Output::Embedding).collect())
            }
            (Engine::Matching(matcher), Work::EmbedText { .. }) => {
                let texts: Vec<&str> = works
                    .iter()
                    .map(|work| match work {
                        Work::EmbedText { text } => text.as_str(),
                        _ => unreachable!("grouped"),
                    })
                    .collect();
                let embeddings = matcher.embed_texts(&texts)?.to_vec2::<f32>().map_err(blip::Error::from)?;
                Ok(embeddings.into_iter().map(Output::Embedding).collect())
            }
            _ => Err(ApiError::internal("this model does not serve this task")),
        }
    }

    /// The images of jobs that carry one each, as one batch.
    fn take_images(&self, works: Vec<Work>) -> Result<Tensor, ApiError> {
        let images: Vec<Pixels> = works
            .into_iter()
            .filter_map(|work| match work {
                Work::Classify { image, .. } | Work::Match { image, .. } | Work::EmbedImage { image } => Some(image),
                _ => None,
            })
            .collect();
        self.batch_pixels(images)
    }

    /// Jobs' `pixel_values` stacked into one batch, counted.
    fn batch_pixels(&self, images: Vec<Pixels>) -> Result<Tensor, ApiError> {
        self.metrics.images(&self.model, images.len());
        Tensor::cat(&images, 0).map_err(|e| ApiError::internal(format!("batching images: {e}")))
    }

    /// Steps a generation to its end, streaming tokens to the clients that asked, and stopping
    /// the inputs whose client is gone (all gone: it ends there); counts the tokens generated.
    fn generate(
        &self,
        mut run: GenerationRun<'_>,
        senders: &[Option<TokenSender>],
        replies: &[oneshot::Sender<Reply>],
    ) -> Result<Vec<Output>, ApiError> {
        let mut gone = vec![false; replies.len()];
        loop {
            for (input, reply) in replies.iter().enumerate() {
                if !gone[input] && reply.is_closed() {
                    gone[input] = true;
                    run.stop(input)?;
                    self.metrics.cancelled(&self.model, 1);
                }
            }
            if gone.iter().all(|&g| g) || run.step(&mut stream_to(senders))? {
                break;
            }
        }
        let generated = run.finish()?;
        let tokens: usize = generated.iter().flatten().map(|g| g.tokens.len()).sum();
        self.metrics.tokens(&self.model, tokens);
        Ok(generated.into_iter().map(Output::Texts).collect())
    }
}

/// Whether two jobs can run in one library call: the same task with the same options (prompts
/// and questions may differ: the library groups prompts by length itself).
fn batches_with(a: &Work, b: &Work) -> bool {
    match (a, b) {
        (Work::Caption { generation: x, .. }, Work::Caption { generation: y, .. }) => x == y,
        (Work::Answer { generation: x, .. }, Work::Answer { generation: y, .. }) => x == y,
        (Work::Classify { labels: l1, options: o1, .. }, Work::Classify { labels: l2, options: o2, .. }) => {
            l1 == l2 && o1 == o2
        }
        (Work::Match { texts: x, .. }, Work::Match { texts: y, .. }) => x == y,
        (Work::EmbedImage { .. }, Work::EmbedImage { .. }) => true,
        (Work::EmbedText { .. }, Work::EmbedText { .. }) => true,
        _ => false,
    }
}

/// The library's token callback, forwarding each row's tokens to its client if it streams.
fn stream_to(senders: &[Option<TokenSender>]) -> impl FnMut(usize, usize, u32) + Send + '_ {
    move |row, sequence, token| {
        if let Some(Some(sender)) = senders.get(row) {
            let _ = sender.send((sequence, token));
        }
    }
}
