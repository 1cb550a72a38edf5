//! `bd3lm plot`: pictures, as PNG or SVG (by the output's extension). `curve` draws
//! training curves from runs' `metrics.jsonl`; `block-sizes`, `variance` and `samplers`
//! draw the study of `docs/results.md` from `bd3lm eval` reports, and print the table of
//! what they drew (markdown) on standard output.

mod curve;
mod study;

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use plotters::coord::Shift;
use plotters::prelude::*;

pub use curve::CurveArgs;

/// `bd3lm plot`.
#[derive(Debug, Subcommand)]
pub enum PlotCommand {
    /// Training curves of runs: loss per step and validation NELBO.
    Curve(CurveArgs),
    /// Perplexity bound against block size, with the paper's OpenWebText figures on a
    /// second axis, from `bd3lm eval --data` reports of models of several block sizes.
    BlockSizes(ReportArgs),
    /// The variance of the training objective and the bound of runs with different noise
    /// intervals, from `bd3lm eval --data --variance-batches N` reports.
    Variance(ReportArgs),
    /// Generative perplexity against forward passes per token, one line per sampler,
    /// from `bd3lm eval --judge` reports of one model.
    Samplers(ReportArgs),
}

/// Arguments of the plots drawn from `bd3lm eval` reports.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// `bd3lm eval` reports (JSON files).
    #[arg(required = true, value_name = "REPORT")]
    pub reports: Vec<PathBuf>,
    /// Picture options.
    #[command(flatten)]
    pub picture: PictureArgs,
}

/// Where a picture goes and how large it is.
#[derive(Debug, Args)]
pub struct PictureArgs {
    /// The picture: a .png or .svg file.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Width and height in pixels.
    #[arg(long, default_value = "1000x600", value_parser = parse_size)]
    pub size: (u32, u32),
    /// Title; default: one naming what is drawn.
    #[arg(long)]
    pub title: Option<String>,
}

/// Runs `bd3lm plot`.
pub fn run(command: PlotCommand) -> anyhow::Result<()> {
    match command {
        PlotCommand::Curve(args) => curve::curve(&args),
        PlotCommand::BlockSizes(args) => study::block_sizes(&args),
        PlotCommand::Variance(args) => study::variance(&args),
        PlotCommand::Samplers(args) => study::samplers(&args),
    }
}

/// A picture that can be drawn on any plotters backend.
trait Picture {
    fn draw<B: DrawingBackend>(&self, root: &DrawingArea<B, Shift>) -> anyhow::Result<()>
    where
        B::ErrorType: 'static;
}

/// Draws `picture` into `args.out`, PNG or SVG by its extension.
fn render(args: &PictureArgs, picture: &impl Picture) -> anyhow::Result<()> {
    register_fonts();
    let (out, size) = (&args.out, args.size);
    let extension = out.extension().and_then(|e| e.to_str()).unwrap_or_default();
    match extension.to_ascii_lowercase().as_str() {
        "svg" => draw(picture, SVGBackend::new(out, size).into_drawing_area()),
        "png" => draw(picture, BitMapBackend::new(out, size).into_drawing_area()),
        _ => bail!(
            "--out: expected a .png or .svg file, found {}",
            out.display()
        ),
    }
    .with_context(|| out.display().to_string())
}

/// Draws `picture` on a white `root` and writes it out.
fn draw<B: DrawingBackend>(
    picture: &impl Picture,
    root: DrawingArea<B, Shift>,
) -> anyhow::Result<()>
where
    B::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(drawing)?;
    picture.draw(&root)?;
    root.present().map_err(drawing)
}

/// A drawing error, which plotters gives per backend type, as one error.
fn drawing(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing: {e}")
}

/// Every text is DejaVu Sans, bundled (fonts/, with its licence): pictures look the same
/// on every machine, fonts installed or not.
fn register_fonts() {
    static FONTS: Once = Once::new();
    FONTS.call_once(|| {
        let bytes = include_bytes!("../../fonts/DejaVuSans.ttf");
        let registered = plotters::style::register_font("sans-serif", FontStyle::Normal, bytes);
        assert!(registered.is_ok(), "the bundled font parses");
    });
}

/// The legend key of a line series: a short stroke in its style.
fn line_key(style: ShapeStyle) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style)
}

impl PictureArgs {
    /// The title asked for, else `default`.
    fn title_or(&self, default: impl FnOnce() -> String) -> String {
        self.title.clone().unwrap_or_else(default)
    }
}

/// The legend box every picture uses.
fn legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(position)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(drawing)
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let parsed = s
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)));
    match parsed {
        Some((w, h)) if (100..=10_000).contains(&w) && (100..=10_000).contains(&h) => Ok((w, h)),
        _ => Err(format!(
            "expected WIDTHxHEIGHT in pixels (100 to 10000 each), found {s:?}"
        )),
    }
}

/// Reads a file, naming it in the error.
fn read_text(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PNG signature and the IHDR chunk's width and height.
    pub(super) fn png_size(path: &Path) -> (u32, u32) {
        let png = std::fs::read(path).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let dim = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
        (dim(16), dim(20))
    }

    /// Picture options writing `out` at `size`, untitled.
    pub(super) fn picture(out: PathBuf, size: (u32, u32)) -> PictureArgs {
        PictureArgs {
            out,
            size,
            title: None,
        }
    }

    #[test]
    fn sizes_parse_within_bounds() {
        assert_eq!(parse_size("640x400"), Ok((640, 400)));
        assert!(parse_size("640").is_err() && parse_size("10x10").is_err());
    }
}
