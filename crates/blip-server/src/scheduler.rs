//! Batching across requests: each model has one worker thread and a bounded queue. The worker
//! takes what is waiting (up to `--max-batch-size` jobs), drops the jobs whose client is gone,
//! and runs the rest in as few library calls as their options allow: images of concurrent
//! requests go through the vision tower together, and their sequences decode together.
//! Generation is continuous: between two decoding steps the worker takes the jobs that arrived,
//! and they join the running batch (whatever their options), each answered when its own
//! sequences end.

use std::collections::HashMap;
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
    /// An image resized by the model's own processor (its values are made in the worker).
    pub fn resize(&self, image: RgbImage) -> Resized {
        let processor = match self {
            Engine::Caption(task) => task.image_processor(),
            Engine::Vqa(task) => task.image_processor(),
            Engine::Matching(task) => task.image_processor(),
        };
        processor.resize(image)
    }

    /// `pixel_values` [n, 3, size, size] of resized images, by the model's own processor.
    fn pixel_values(&self, images: &[Resized]) -> blip::Result<Tensor> {
        let images = Images::from(images);
        let pixels = match self {
            Engine::Caption(task) => task.pixel_values(images)?,
            Engine::Vqa(task) => task.pixel_values(images)?,
            Engine::Matching(task) => task.pixel_values(images)?,
        };
        Ok(pixels.into_owned())
    }
}

/// (image or question, sequence, token) for each token chosen, when a client streams.
pub type TokenSender = mpsc::UnboundedSender<(usize, u32)>;

/// An image resized by the model's processor, not yet turned into `pixel_values`: queued jobs
/// hold these rather than decoded photos or f32 values (a quarter of their bytes), so that a
/// queue stays small.
pub type Resized = RgbImage;

/// Images per library call at most: the vision tower's activations grow with its batch, and
/// beyond a few images a batch is hardly faster per image (docs/SERVER.md). Generation jobs
/// started in several calls still decode as one batch.
const IMAGES_PER_CALL: usize = 4;

/// What a request asks of the model, its inputs decoded and its options checked.
pub enum Work {
    Caption { image: Resized, prompt: Option<String>, generation: GenerationOptions, tokens: Option<TokenSender> },
    Answer { image: Resized, question: String, generation: GenerationOptions, tokens: Option<TokenSender> },
    Classify { image: Resized, labels: Vec<String>, options: ClassifyOptions },
    Match { image: Resized, texts: Vec<String> },
    EmbedImage { image: Resized },
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

/// The generation being decoded, and who waits for each of its inputs.
struct Decoding<'a> {
    run: GenerationRun<'a>,
    waiting: HashMap<usize, Waiting>,
}

/// A generation job in the running batch.
struct Waiting {
    reply: oneshot::Sender<Reply>,
    tokens: Option<TokenSender>,
    /// The most jobs decoded together while it ran.
    batch: usize,
}

impl Worker {
    /// Runs batches until every sender is gone (the server shut down) and nothing runs.
    fn run(self, mut jobs: mpsc::Receiver<Queued>) {
        let mut decoding: Option<Decoding> = None;
        let mut open = true;
        while open || decoding.is_some() {
            let mut batch = Vec::new();
            match &decoding {
                // Idle: wait for a job, then a little for requests on their way in.
                None => match jobs.blocking_recv() {
                    Some(Queued { job, _slot }) => {
                        // taken from the queue, a job gives its place back at once
                        drop(_slot);
                        batch.push(job);
                        self.gather(&mut jobs, &mut batch);
                    }
                    None => open = false,
                },
                // Decoding: what has arrived joins at this step, up to the batch size.
                Some(running) => {
                    while running.waiting.len() + batch.len() < self.max_batch {
                        match jobs.try_recv() {
                            Ok(Queued { job, _slot }) => batch.push(job),
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => {
                                open = false;
                                break;
                            }
                        }
                    }
                }
            }
            let before = batch.len();
            batch.retain(|job| !job.reply.is_closed());
            self.metrics.cancelled(&self.model, before - batch.len());
            if batch.is_empty() && decoding.is_none() {
                continue;
            }
            // rayon's pool runs the model's kernels; a worker of it runs a step's many small
            // parallel steps inline (see blip::generation::generate). A panic (a bug) fails the
            // requests running (their replies are dropped: 500), not the worker.
            let start = Instant::now();
            let size = batch.len();
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                rayon::scope(|_| self.advance(&mut decoding, batch))
            }));
            if ran.is_err() {
                tracing::error!(model = self.model, "a batch panicked; its requests failed");
                decoding = None;
            }
            tracing::trace!(model = self.model, size, seconds = start.elapsed().as_secs_f64(), "step");
        }
    }

    /// Adds to `batch` the jobs queued within [`GATHER`] while requests holding a place are on
    /// their way in (alone, a request waits for nothing), so that requests sent together start
    /// together instead of the first alone.
    fn gather(&self, jobs: &mut mpsc::Receiver<Queued>, batch: &mut Vec<Job>) {
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
    }

    /// Starts the new jobs (generation jobs joining the running batch, the others run whole),
    /// then steps the running generation once and answers the jobs whose sequences ended.
    fn advance<'a>(&'a self, decoding: &mut Option<Decoding<'a>>, batch: Vec<Job>) {
        let (generating, others): (Vec<Job>, Vec<Job>) =
            batch.into_iter().partition(|job| matches!(job.work, Work::Caption { .. } | Work::Answer { .. }));
        if !others.is_empty() {
            self.run_batch(others);
        }
        if !generating.is_empty() {
            self.start_generation(decoding, generating);
        }
        let Some(running) = decoding else { return };
        if let Err(err) = self.step(running) {
            for (_, waiting) in running.waiting.drain() {
                let _ = waiting.reply.send(Err(err.clone()));
            }
        }
        if running.run.is_done() {
            // every input has been answered; none can be left waiting
            for (_, waiting) in running.waiting.drain() {
                let _ = waiting.reply.send(Err(ApiError::internal("generation ended without this request's answer")));
            }
        }
        if running.waiting.is_empty() {
            *decoding = None;
        }
    }

    /// Starts generation jobs, in groups of equal options, and joins them to the running batch.
    fn start_generation<'a>(&'a self, decoding: &mut Option<Decoding<'a>>, jobs: Vec<Job>) {
        for group in groups(jobs) {
            let (mut works, mut waiting) = (Vec::new(), Vec::new());
            for Job { work, reply } in group {
                let tokens = match &work {
                    Work::Caption { tokens, .. } | Work::Answer { tokens, .. } => tokens.clone(),
                    _ => None,
                };
                works.push(work);
                waiting.push(Waiting { reply, tokens, batch: 0 });
            }
            // A panic (a bug) starting these jobs fails them alone, not the running batch.
            let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.start_run(works)))
                .unwrap_or_else(|_| Err(ApiError::internal("the model failed on this request")));
            let run = match started {
                Ok(run) => run,
                Err(err) => {
                    for job in waiting {
                        let _ = job.reply.send(Err(err.clone()));
                    }
                    continue;
                }
            };
            match decoding {
                None => {
                    *decoding = Some(Decoding { run, waiting: waiting.into_iter().enumerate().collect() });
                }
                Some(running) => match running.run.join(run) {
                    Ok(offset) => {
                        running.waiting.extend(waiting.into_iter().enumerate().map(|(i, w)| (offset + i, w)));
                    }
                    Err(err) => {
                        let err = ApiError::from(err);
                        for job in waiting {
                            let _ = job.reply.send(Err(err.clone()));
                        }
                    }
                },
            }
        }
        if let Some(running) = decoding {
            self.metrics.batch(&self.model, running.waiting.len());
        }
    }

    /// The vision tower (and question encoder) for generation jobs of equal options, and their
    /// generation started.
    fn start_run(&self, works: Vec<Work>) -> Result<GenerationRun<'_>, ApiError> {
        match (&self.engine, &works[0]) {
            (Engine::Caption(captioner), Work::Caption { generation, .. }) => {
                let generation = generation.clone();
                let (mut images, mut prompts) = (Vec::new(), Vec::new());
                for work in works {
                    let Work::Caption { image, prompt, .. } = work else { unreachable!("grouped") };
                    images.push(image);
                    prompts.push(prompt);
                }
                let pixels = self.batch_pixels(images)?;
                let options = CaptionOptions::new(Prompt::PerImage(prompts), generation);
                Ok(captioner.start_captions(&pixels, &options)?)
            }
            (Engine::Vqa(vqa), Work::Answer { generation, .. }) => {
                let options = AnswerOptions::new(generation.clone());
                let (mut images, mut questions) = (Vec::new(), Vec::new());
                for work in works {
                    let Work::Answer { image, question, .. } = work else { unreachable!("grouped") };
                    images.push(image);
                    questions.push(question);
                }
                let pixels = self.batch_pixels(images)?;
                let questions: Vec<&str> = questions.iter().map(String::as_str).collect();
                Ok(vqa.start_answers(&pixels, &questions, &options)?)
            }
            _ => Err(ApiError::internal("this model does not serve this task")),
        }
    }

    /// One token more for every running sequence: stops the inputs whose client is gone,
    /// streams tokens to the clients that asked, answers the jobs whose sequences all ended.
    fn step(&self, running: &mut Decoding<'_>) -> Result<(), ApiError> {
        let gone: Vec<usize> =
            running.waiting.iter().filter(|(_, waiting)| waiting.reply.is_closed()).map(|(&input, _)| input).collect();
        for input in gone {
            running.run.stop(input)?;
            running.waiting.remove(&input);
            self.metrics.cancelled(&self.model, 1);
        }
        let together = running.waiting.len();
        for waiting in running.waiting.values_mut() {
            waiting.batch = waiting.batch.max(together);
        }
        if !running.run.is_done() {
            let waiting = &running.waiting;
            running.run.step(&mut |input, sequence, token| {
                if let Some(Some(sender)) = waiting.get(&input).map(|w| &w.tokens) {
                    let _ = sender.send((sequence, token));
                }
            })?;
        }
        for (input, texts) in running.run.take_finished()? {
            let tokens: usize = texts.iter().map(|t| t.tokens.len()).sum();
            self.metrics.tokens(&self.model, tokens);
            if let Some(waiting) = running.waiting.remove(&input) {
                let _ = waiting.reply.send(Ok((Output::Texts(texts), waiting.batch)));
            }
        }
        Ok(())
    }

    /// Runs the jobs in groups that one library call can serve together.
    fn run_batch(&self, batch: Vec<Job>) {
        let size = batch.len();
        for group in groups(batch) {
            self.metrics.batch(&self.model, group.len());
            let (works, replies): (Vec<Work>, Vec<oneshot::Sender<Reply>>) =
                group.into_iter().map(|job| (job.work, job.reply)).unzip();
            let results = match self.run_group(works) {
                Ok(outputs) => outputs.into_iter().map(Ok).collect(),
                Err(err) => replies.iter().map(|_| Err(err.clone())).collect::<Vec<_>>(),
            };
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result.map(|output| (output, size)));
            }
        }
    }

    /// One library call for jobs that [`batches_with`] put together (not generation).
    fn run_group(&self, works: Vec<Work>) -> Result<Vec<Output>, ApiError> {
        match (&self.engine, &works[0]) {
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
        let images: Vec<Resized> = works
            .into_iter()
            .filter_map(|work| match work {
                Work::Classify { image, .. } | Work::Match { image, .. } | Work::EmbedImage { image } => Some(image),
                _ => None,
            })
            .collect();
        self.batch_pixels(images)
    }

    /// Jobs' `pixel_values` as one batch, counted.
    fn batch_pixels(&self, images: Vec<Resized>) -> Result<Tensor, ApiError> {
        self.metrics.images(&self.model, images.len());
        Ok(self.engine.pixel_values(&images)?)
    }
}

/// Jobs in groups that one library call can serve together (at most [`IMAGES_PER_CALL`] jobs
/// with an image each), in arrival order.
fn groups(jobs: Vec<Job>) -> Vec<Vec<Job>> {
    let mut groups: Vec<Vec<Job>> = Vec::new();
    for job in jobs {
        let has_room = |group: &Vec<Job>| group.len() < IMAGES_PER_CALL || matches!(job.work, Work::EmbedText { .. });
        match groups.iter_mut().find(|group| has_room(group) && batches_with(&group[0].work, &job.work)) {
            Some(group) => group.push(job),
            None => groups.push(vec![job]),
        }
    }
    groups
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
