//! `cpa-stream import-model`: a model saved by cpa-tools 0.8.8 as a cpa-stream model directory.
//!
//! cpa-tools saves its model as a Python pickle (`model.pt`); reading one takes Python. The
//! conversion is the Python package's (`python -m cpa_stream.cpa_tools_model`, the same code as
//! `cpa_stream.compat.CPA.load`), run with `$CPA_STREAM_PYTHON` (else `python3`): it reads the
//! pickle with an unpickler that builds tensors, arrays and containers only, renames the state
//! dict to cpa-stream's variables, checks every shape and writes the model directory whole.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

/// `cpa-stream import-model DIR --out MODEL`.
#[derive(Debug, clap::Args)]
pub struct ImportModelArgs {
    /// The directory cpa-tools' `model.save(dir_path)` wrote (`model.pt`, `CPA_info.json`).
    pub dir: PathBuf,
    /// The cpa-stream model directory to write (read by `predict --model`, `evaluate --model`, ...).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace a model directory import-model wrote before (its imported.json; never anything else).
    #[arg(long)]
    pub overwrite: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ImportModelArgs) -> anyhow::Result<ExitCode> {
    let python = std::env::var_os("CPA_STREAM_PYTHON").unwrap_or_else(|| "python3".into());
    let shown = std::path::Path::new(&python).display().to_string();
    let mut command = Command::new(&python);
    command.args(["-m", "cpa_stream.cpa_tools_model"]).arg(&args.dir).arg("--out").arg(&args.out);
    if args.overwrite {
        command.arg("--overwrite");
    }
    if args.json {
        command.arg("--json");
    }
    let advice = "reading cpa-tools' model.pt takes the Python package (pip install cpa-stream; \
                  CPA_STREAM_PYTHON names its interpreter)";
    let done = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| anyhow::anyhow!("import-model {}: cannot run {shown}: {e}; {advice}", args.dir.display()))?;
    if !done.status.success() {
        let said = String::from_utf8_lossy(&done.stderr);
        let said = said.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        let said = said.strip_prefix("error: ").unwrap_or(said);
        if said.contains("No module named cpa_stream") {
            anyhow::bail!("import-model {}: {shown} has no cpa_stream package; {advice}", args.dir.display());
        }
        anyhow::bail!("import-model {}: {said}", args.dir.display());
    }
    let text = String::from_utf8_lossy(&done.stdout);
    if args.json {
        jsonln!(&serde_json::from_str::<serde_json::Value>(&text)?);
    } else {
        out!("{text}");
    }
    Ok(ExitCode::SUCCESS)
}
