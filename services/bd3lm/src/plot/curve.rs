//! `bd3lm plot curve`: training curves from runs' `metrics.jsonl`: the training loss per
//! step (faint) with its moving mean, and the validation NELBO, one colour per run.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};
use clap::Args;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::{Picture, PictureArgs, drawing, legend, line_key, read_text, render};

/// Arguments of `bd3lm plot curve`.
#[derive(Debug, Args)]
pub struct CurveArgs {
    /// Run directories (their metrics.jsonl) or metrics files.
    #[arg(required = true, value_name = "RUN")]
    pub runs: Vec<PathBuf>,
    /// Steps in the moving mean of the training loss (1: none).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub smooth: u32,
    /// Picture options (the title defaults to the runs' names).
    #[command(flatten)]
    pub picture: PictureArgs,
}

/// One run's figures.
#[derive(Debug, Default, PartialEq)]
struct Curve {
    name: String,
    /// (step, training loss).
    train: Vec<(f64, f64)>,
    /// (step, validation NELBO).
    validation: Vec<(f64, f64)>,
}

/// Draws `bd3lm plot curve`.
pub(super) fn curve(args: &CurveArgs) -> anyhow::Result<()> {
    let curves = args
        .runs
        .iter()
        .map(|r| read(r))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let title = args.picture.title_or(|| {
        let names: Vec<&str> = curves.iter().map(|c| c.name.as_str()).collect();
        names.join(", ")
    });
    let figure = Figure {
        curves: &curves,
        smooth: args.smooth as usize,
        title: &title,
    };
    render(&args.picture, &figure)
}

/// Reads a run's metrics log (`DIR/metrics.jsonl`, or the file itself); a line that does
/// not parse is an error naming it.
fn read(run: &Path) -> anyhow::Result<Curve> {
    let file = if run.is_dir() {
        run.join(bd3lm_training::trainer::METRICS_FILE)
    } else {
        run.to_path_buf()
    };
    let text = read_text(&file)?;
    let name = match run.is_dir() {
        true => run.file_name(),
        false => run.parent().and_then(Path::file_name),
    };
    let mut curve = Curve {
        name: name.map_or("run".into(), |n| n.to_string_lossy().into_owned()),
        ..Curve::default()
    };
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = || anyhow!("{}:{}: not a metrics record", file.display(), i + 1);
        let value: serde_json::Value = serde_json::from_str(line).map_err(|_| bad())?;
        let step = value["step"].as_f64().ok_or_else(bad)?;
        match value["kind"].as_str() {
            Some("train") => curve
                .train
                .push((step, value["loss"].as_f64().ok_or_else(bad)?)),
            Some("validation") => curve
                .validation
                .push((step, value["nll"].as_f64().ok_or_else(bad)?)),
            _ => return Err(bad()),
        }
    }
    if curve.train.is_empty() && curve.validation.is_empty() {
        bail!("{}: no training steps or validations", file.display());
    }
    Ok(curve)
}

/// The moving mean of the last `window` values of `points`.
fn moving_mean(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut sum = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            sum += y;
            if i >= window {
                sum -= points[i - window].1;
            }
            (x, sum / (i + 1).min(window) as f64)
        })
        .collect()
}

/// The training-curve picture.
struct Figure<'a> {
    curves: &'a [Curve],
    smooth: usize,
    title: &'a str,
}

impl Picture for Figure<'_> {
    fn draw<B: DrawingBackend>(&self, root: &DrawingArea<B, Shift>) -> anyhow::Result<()>
    where
        B::ErrorType: 'static,
    {
        let all = || {
            let curves = self.curves.iter();
            curves.flat_map(|c| c.train.iter().chain(&c.validation))
        };
        let steps = all().map(|p| p.0).fold(1.0, f64::max);
        let (low, high) = all().fold((f64::MAX, f64::MIN), |(l, h), p| (l.min(p.1), h.max(p.1)));
        let pad = ((high - low) * 0.05).max(1e-3);
        let mut chart = ChartBuilder::on(root)
            .caption(self.title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..steps, (low - pad)..(high + pad))
            .map_err(drawing)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("nats per token")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(drawing)?;
        for (i, curve) in self.curves.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let faint = LineSeries::new(curve.train.iter().copied(), color.mix(0.2));
            chart.draw_series(faint).map_err(drawing)?;
            let mean = LineSeries::new(
                moving_mean(&curve.train, self.smooth),
                color.stroke_width(2),
            );
            chart
                .draw_series(mean)
                .map_err(drawing)?
                .label(format!("{} training loss", curve.name))
                .legend(line_key(color.stroke_width(2)));
            let dots = curve
                .validation
                .iter()
                .map(|&p| Circle::new(p, 4, color.filled()));
            chart
                .draw_series(dots)
                .map_err(drawing)?
                .label(format!("{} validation NELBO", curve.name))
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{picture, png_size};
    use super::*;

    /// A run directory `name` under `dir` with `steps` training lines and a validation
    /// every 5 steps.
    fn run(dir: &Path, name: &str, steps: u64) -> PathBuf {
        let run = dir.join(name);
        std::fs::create_dir_all(&run).unwrap();
        let mut log = String::new();
        for step in 1..=steps {
            let loss = 8.0 / step as f64 + 1.0;
            log += &format!("{{\"kind\":\"train\",\"step\":{step},\"loss\":{loss}}}\n");
            if step % 5 == 0 {
                log += &format!(
                    "{{\"kind\":\"validation\",\"step\":{step},\"nll\":{}}}\n",
                    loss + 0.5
                );
            }
        }
        std::fs::write(run.join("metrics.jsonl"), log).unwrap();
        run
    }

    /// Two runs drawn as PNG (of the asked size) and SVG (naming both runs).
    #[test]
    fn curves_draw_as_png_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let runs = vec![run(dir.path(), "bs4", 30), run(dir.path(), "bs16", 20)];
        for (name, size) in [("curve.png", (640, 400)), ("curve.svg", (800, 500))] {
            let args = CurveArgs {
                runs: runs.clone(),
                smooth: 5,
                picture: picture(dir.path().join(name), size),
            };
            curve(&args).unwrap();
        }
        assert_eq!(png_size(&dir.path().join("curve.png")), (640, 400));
        let svg = std::fs::read_to_string(dir.path().join("curve.svg")).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("bs4 training loss"),
            "{svg:.200}"
        );
        assert!(svg.contains("bs16 validation NELBO"));
    }

    /// A line that is not a metrics record is an error naming its file and line; an
    /// unknown format is refused before anything is drawn.
    #[test]
    fn bad_input_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = run(dir.path(), "good", 3);
        let file = dir.path().join("bad.jsonl");
        std::fs::write(
            &file,
            "{\"kind\":\"train\",\"step\":1,\"loss\":2.0}\nnot json\n",
        )
        .unwrap();
        let err = read(&file).unwrap_err().to_string();
        assert!(err.ends_with("bad.jsonl:2: not a metrics record"), "{err}");
        let args = CurveArgs {
            runs: vec![good],
            smooth: 1,
            picture: picture(dir.path().join("curve.pdf"), (640, 400)),
        };
        let err = format!("{:#}", curve(&args).unwrap_err());
        assert!(err.contains("expected a .png or .svg file"), "{err}");
    }

    /// The moving mean averages the last `window` values (fewer at the start).
    #[test]
    fn the_moving_mean_trails_by_its_window() {
        let points: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, i as f64)).collect();
        let mean: Vec<f64> = moving_mean(&points, 2).iter().map(|p| p.1).collect();
        assert_eq!(mean, [0.0, 0.5, 1.5, 2.5, 3.5]);
    }
}
