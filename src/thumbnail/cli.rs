//! `downloader thumbnail --width W --height H [...] --output DIR FILE...`

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::{Config, Fit, OutputFormat, Spec, Thumbnailer, parse_color};

/// Make one thumbnail per input file, as `DIR/<file stem>.<ext>`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Width of the box, 1..=10000.
    #[arg(long)]
    pub width: u32,
    /// Height of the box, 1..=10000.
    #[arg(long)]
    pub height: u32,
    /// contain (fit inside), cover (fill and crop the centre) or fill (stretch).
    #[arg(long, default_value = "contain", value_parser = parse_fit)]
    pub fit: Fit,
    /// jpeg, png, webp, gif, tiff, bmp or same (as the input).
    #[arg(long, default_value = "jpeg", value_parser = parse_format)]
    pub format: OutputFormat,
    /// JPEG quality, 1..=100.
    #[arg(long, default_value_t = 85)]
    pub quality: u8,
    /// Progressive JPEG.
    #[arg(long)]
    pub progressive: bool,
    /// Allow enlarging images smaller than the box.
    #[arg(long)]
    pub enlarge: bool,
    /// Background for flattening alpha, #rrggbb.
    #[arg(long, default_value = "#ffffff", value_parser = parse_bg)]
    pub background: [u8; 3],
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// Refuse images with more pixels than this.
    #[arg(long, default_value_t = Config::default().max_pixels)]
    pub max_pixels: u64,
    /// Output directory (created if missing).
    #[arg(long)]
    pub output: PathBuf,
    /// Input images.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

fn parse_fit(s: &str) -> Result<Fit, String> {
    Fit::parse(s).ok_or_else(|| "must be one of contain, cover, fill".into())
}
fn parse_format(s: &str) -> Result<OutputFormat, String> {
    OutputFormat::parse(s)
        .ok_or_else(|| "must be one of jpeg, png, webp, gif, tiff, bmp, same".into())
}
fn parse_bg(s: &str) -> Result<[u8; 3], String> {
    parse_color(s).ok_or_else(|| "must be a colour like #rrggbb".into())
}

/// Run the subcommand: exit 0 if every file was made, 1 if any failed, 2 on bad arguments.
pub fn run(args: Args) -> ExitCode {
    let mut spec = Spec::new(args.width, args.height);
    spec.fit = args.fit;
    spec.format = args.format;
    spec.quality = args.quality;
    spec.progressive = args.progressive;
    spec.enlarge = args.enlarge;
    spec.background = args.background;
    if let Err(e) = spec.validate() {
        eprintln!("error: --{e}");
        return ExitCode::from(2);
    }
    if args.jobs == 0 || args.jobs > 256 {
        eprintln!("error: --jobs must be between 1 and 256");
        return ExitCode::from(2);
    }
    if let Err(e) = check_output_dir(&args.output) {
        eprintln!("error: --output {}: {e}", args.output.display());
        return ExitCode::from(2);
    }
    let config = Config {
        max_pixels: args.max_pixels,
        threads: 1,
        ..Config::default()
    };
    let t = Thumbnailer::new(config);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let out = Mutex::new(std::io::stdout());
    std::thread::scope(|scope| {
        for _ in 0..args.jobs.min(args.files.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(input) = args.files.get(i) else {
                        return;
                    };
                    let line = match one(&t, input, &args.output, &spec) {
                        Ok(line) => line,
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            format!("error  {}: {e}", input.display())
                        }
                    };
                    let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = writeln!(o, "{line}");
                }
            });
        }
    });
    if failed.load(Ordering::Relaxed) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn check_output_dir(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create: {e}"))?;
    }
    let md = std::fs::metadata(dir).map_err(|e| e.to_string())?;
    if !md.is_dir() {
        return Err("not a directory".into());
    }
    // Probe writability now rather than failing on every file.
    let probe = dir.join(format!(".thumbnail-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| format!("not writable: {e}"))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn one(t: &Thumbnailer, input: &Path, dir: &Path, spec: &Spec) -> Result<String, String> {
    let bytes = std::fs::read(input).map_err(|e| format!("cannot read: {e}"))?;
    let th = t.make_blocking(&bytes, spec).map_err(|e| e.to_string())?;
    let stem = input
        .file_stem()
        .ok_or_else(|| "no file name".to_string())?;
    let mut name = stem.to_os_string();
    name.push(".");
    name.push(th.format.extension());
    let out = dir.join(name);
    std::fs::write(&out, &th.bytes).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    Ok(format!(
        "ok  {} -> {}  {}x{}  {}",
        input.display(),
        out.display(),
        th.width,
        th.height,
        th.bytes.len()
    ))
}
