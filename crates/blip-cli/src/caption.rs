//! `blip caption`: load a captioning checkpoint, caption images in batches, print text or JSONL.

use std::process::ExitCode;

use blip::{CaptionOptions, Captioner, Checkpoint, Prompt};
use clap::Args;

use crate::common::{self, GeneratedRecord, GenerationArgs, ImageRunArgs};
use crate::sidecar::SidecarArgs;

/// What `--num-return-sequences` is called here.
pub const NUM_CAPTIONS: &str = "--num-captions";

#[derive(Args)]
#[command(mut_arg("num_return_sequences", |arg| arg
    .visible_alias("num-captions")
    .help("Captions per image, best first: the best beams (needs --num-beams at least as large) or independent samples (--do-sample)")),
    mut_args(common::show_generation_defaults(Captioner::default_generation())))]
pub struct CaptionArgs {
    #[command(flatten)]
    image_size: common::ImageSizeArg,

    /// Checkpoint: a Hub repo id (downloaded into the Hugging Face cache) or a local folder.
    #[arg(long, short, default_value = Captioner::DEFAULT_MODEL)]
    model: String,

    /// Text the caption starts with, e.g. "a picture of" (it is part of the output caption).
    #[arg(long)]
    prompt: Option<String>,

    #[command(flatten)]
    run: ImageRunArgs,

    #[command(flatten)]
    sidecar: SidecarArgs,

    #[command(flatten)]
    generation: GenerationArgs,
}

/// Captions every readable image; unreadable ones are reported and make the exit code 1.
pub fn run(args: CaptionArgs, dtype: blip::DType) -> anyhow::Result<ExitCode> {
    args.generation.check_given()?;
    let sidecars = args.sidecar.sidecars()?;
    let checkpoint = Checkpoint::locate(&args.model)?;
    let generation = args.generation.resolve(&Captioner::generation_defaults(&checkpoint)?, &args.model)?;
    let mut captioner = Captioner::from_checkpoint(&checkpoint, &blip::Device::Cpu, dtype)?;
    captioner.set_resize_backend(args.run.batch.resize.into());
    args.image_size.apply(&mut captioner)?;
    let mut options: CaptionOptions = captioner.default_options();
    options.generation = generation;
    if let Some(prompt) = &args.prompt {
        options.prompt = Prompt::Same(prompt.clone());
    }
    captioner.validate(&options)?;

    let record =
        GeneratedRecord { key: "caption", question: None, several: options.generation.num_return_sequences > 1 };
    args.run.process_with_sidecars(
        "captioned",
        sidecars.as_ref(),
        |captions: &Vec<blip::Caption>| captions.first().map(|best| best.text.clone()).unwrap_or_default(),
        |images| Ok(captioner.caption(images, &options)?),
        |out, format, image, captions| record.write(out, format, image, &captions),
    )
}
