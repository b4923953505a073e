//! `cpa-stream info`: its flags.

use clap::Args;

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}
