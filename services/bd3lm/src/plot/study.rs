//! The study's pictures (`docs/results.md`), drawn from `bd3lm eval` reports: the
//! perplexity bound against block size beside the paper's figures, the variance of the
//! training objective under full and clipped noise intervals, and sample quality against
//! forward passes per sampler. Each also prints the table of what it drew.

use anyhow::anyhow;
use bd3lm_diffusion::schedule::Interval;
use bd3lm_training::bound::Bound;
use bd3lm_training::eval::{SampleReport, SamplingCost};
use plotters::coord::Shift;
use plotters::coord::ranged1d::{SegmentValue, SegmentedCoord};
use plotters::coord::types::RangedCoordi32;
use plotters::prelude::*;

use super::{Picture, ReportArgs, drawing, legend, line_key, read_text, render};
use crate::eval::Report;

/// The paper's OpenWebText test perplexities (bounds for the diffusion models; context
/// 1024, GPT-2 tokenizer; Arriola et al., ICLR 2025), for the block sizes it reports.
fn paper_owt(block_size: usize, model_length: usize) -> Option<f64> {
    match block_size {
        1 => Some(17.54),
        b if b == model_length => Some(22.98),
        4 => Some(20.73),
        8 => Some(21.68),
        16 => Some(22.27),
        _ => None,
    }
}

/// How the paper names a model of `block_size` (AR and MDLM are its two ends).
fn model_name(block_size: usize, model_length: usize) -> String {
    match block_size {
        1 => "AR".into(),
        b if b == model_length => format!("MDLM (L' = n = {b})"),
        b => format!("L' = {b}"),
    }
}

/// Reads the reports; each one must have what `need` takes from it.
fn load<T>(
    paths: &[std::path::PathBuf],
    need: impl Fn(&Report) -> Option<T>,
    missing: &str,
) -> anyhow::Result<Vec<(Report, T)>> {
    paths
        .iter()
        .map(|path| {
            let report: Report = serde_json::from_str(&read_text(path)?)
                .map_err(|e| anyhow!("{}: not a bd3lm eval report: {e}", path.display()))?;
            let part = need(&report)
                .ok_or_else(|| anyhow!("{}: no {missing} in this report", path.display()))?;
            Ok((report, part))
        })
        .collect()
}

fn interval_name(min: f64, max: f64) -> String {
    let full = Interval::default();
    let kind = if (min, max) == (full.min, full.max) {
        "full"
    } else {
        "clipped"
    };
    format!("{kind} [{min}, {max}]")
}

/// `bd3lm plot block-sizes`.
pub(super) fn block_sizes(args: &ReportArgs) -> anyhow::Result<()> {
    let mut points = load(&args.reports, |r| r.bound, "perplexity bound (--data)")?;
    points.sort_by_key(|(r, _)| r.model.block_size);
    println!(
        "| model | parameters | steps | tokens trained | NELBO (nats/token) | perplexity bound | paper, OpenWebText |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (report, bound) in &points {
        let m = &report.model;
        let count = |v: Option<u64>| v.map_or("".into(), |v| v.to_string());
        let paper = paper_owt(m.block_size, m.model_length).map_or("".into(), |p| format!("{p}"));
        println!(
            "| {} | {} | {} | {} | {:.3} | {:.1} | {paper} |",
            model_name(m.block_size, m.model_length),
            m.parameters,
            count(m.trained_steps),
            count(m.trained_tokens),
            bound.nll,
            bound.ppl,
        );
    }
    let figure = BlockSizes {
        points: &points,
        title: args
            .picture
            .title_or(|| "Perplexity bound by block size".into()),
    };
    render(&args.picture, &figure)
}

/// An axis of `count` categories, one segment each (plotters' integer ranges include
/// their end).
fn categories(count: usize) -> SegmentedCoord<RangedCoordi32> {
    (0..count as i32 - 1).into_segmented()
}

struct BlockSizes<'a> {
    points: &'a [(Report, Bound)],
    title: String,
}

impl Picture for BlockSizes<'_> {
    fn draw<B: DrawingBackend>(&self, root: &DrawingArea<B, Shift>) -> anyhow::Result<()>
    where
        B::ErrorType: 'static,
    {
        let ours: Vec<f64> = self.points.iter().map(|(_, b)| b.ppl).collect();
        let paper: Vec<Option<f64>> = self
            .points
            .iter()
            .map(|(r, _)| paper_owt(r.model.block_size, r.model.model_length))
            .collect();
        let names: Vec<String> = self
            .points
            .iter()
            .map(|(r, _)| model_name(r.model.block_size, r.model.model_length))
            .collect();
        let span = |values: &mut dyn Iterator<Item = f64>| {
            let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(v), h.max(v)));
            let pad = ((hi - lo) * 0.15).max(0.5);
            (lo - pad)..(hi + pad)
        };
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .right_y_label_area_size(70)
            .build_cartesian_2d(
                categories(self.points.len()),
                span(&mut ours.iter().copied()),
            )
            .map_err(drawing)?
            .set_secondary_coord(
                categories(self.points.len()),
                span(&mut paper.iter().flatten().copied().chain([17.0, 23.5])),
            );
        let name_of = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("block size L'")
            .y_desc("perplexity bound, this study (SOTU, n = 128)")
            .x_label_formatter(&name_of)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(drawing)?;
        chart
            .configure_secondary_axes()
            .y_desc("paper, OpenWebText (n = 1024)")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(drawing)?;
        let at = |i: usize, v: f64| (SegmentValue::CenterOf(i as i32), v);
        let ours_points: Vec<_> = ours.iter().enumerate().map(|(i, &v)| at(i, v)).collect();
        let blue = BLUE.stroke_width(2);
        chart
            .draw_series(LineSeries::new(ours_points.clone(), blue))
            .map_err(drawing)?
            .label("this study: State of the Union, n = 128")
            .legend(line_key(blue));
        let labels = ours_points.iter().map(|(x, y)| {
            EmptyElement::at((x.clone(), *y))
                + Circle::new((0, 0), 5, BLUE.filled())
                + Text::new(format!("{y:.1}"), (8, 6), ("sans-serif", 14))
        });
        chart.draw_series(labels).map_err(drawing)?;
        let paper_points: Vec<_> = paper
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| at(i, v)))
            .collect();
        let red = RED.stroke_width(2);
        chart
            .draw_secondary_series(LineSeries::new(paper_points.clone(), red))
            .map_err(drawing)?
            .label("paper: OpenWebText, n = 1024 (right axis)")
            .legend(line_key(red));
        let marks = paper_points.iter().map(|(x, y)| {
            EmptyElement::at((x.clone(), *y))
                + TriangleMarker::new((0, 0), 6, RED.filled())
                + Text::new(format!("{y}"), (-46, -22), ("sans-serif", 14))
        });
        chart.draw_secondary_series(marks).map_err(drawing)?;
        legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        Ok(())
    }
}

/// `bd3lm plot variance`.
pub(super) fn variance(args: &ReportArgs) -> anyhow::Result<()> {
    let runs = load(
        &args.reports,
        |r| Some((r.bound?, *r.objective_variance.first()?)),
        "perplexity bound and objective variance (--data --variance-batches)",
    )?;
    println!(
        "| model | training interval | objective (nats/token) | its variance over batches | variance under [0.001, 1] | perplexity bound |"
    );
    println!("|---|---|---|---|---|---|");
    for (report, (bound, own)) in &runs {
        let full = report.objective_variance.last();
        println!(
            "| {} | {} | {:.3} | {:.4} ({} batches of {}) | {} | {:.1} |",
            model_name(report.model.block_size, report.model.model_length),
            interval_name(own.eps_min, own.eps_max),
            own.mean,
            own.variance,
            own.batches,
            own.batch_size,
            full.map_or("".into(), |f| format!("{:.4}", f.variance)),
            bound.ppl,
        );
    }
    let bars: Vec<Bar> = runs
        .iter()
        .map(|(_, (bound, own))| Bar {
            name: interval_name(own.eps_min, own.eps_max),
            variance: own.variance,
            ppl: bound.ppl,
        })
        .collect();
    let figure = Variance {
        bars: &bars,
        title: args.picture.title_or(|| "Clipped noise schedules".into()),
    };
    render(&args.picture, &figure)
}

struct Bar {
    name: String,
    variance: f64,
    ppl: f64,
}

/// One of a bar's figures, drawn in a panel of its own.
type Measure = fn(&Bar) -> f64;

struct Variance<'a> {
    bars: &'a [Bar],
    title: String,
}

impl Picture for Variance<'_> {
    fn draw<B: DrawingBackend>(&self, root: &DrawingArea<B, Shift>) -> anyhow::Result<()>
    where
        B::ErrorType: 'static,
    {
        let root = root
            .titled(&self.title, ("sans-serif", 22))
            .map_err(drawing)?;
        let panels = root.split_evenly((1, 2));
        let halves: [(&str, Measure); 2] = [
            ("variance of the training objective", |b| b.variance),
            ("perplexity bound", |b| b.ppl),
        ];
        for (panel, (name, value)) in panels.iter().zip(halves) {
            let top = self.bars.iter().map(value).fold(0.0, f64::max) * 1.2;
            let mut chart = ChartBuilder::on(panel)
                .margin(16)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .caption(name, ("sans-serif", 16))
                .build_cartesian_2d(categories(self.bars.len()), 0.0..top.max(1e-9))
                .map_err(drawing)?;
            let bar_name = |v: &SegmentValue<i32>| match v {
                SegmentValue::CenterOf(i) => self
                    .bars
                    .get(*i as usize)
                    .map_or(String::new(), |b| b.name.clone()),
                _ => String::new(),
            };
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_label_formatter(&bar_name)
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(drawing)?;
            for (i, bar) in self.bars.iter().enumerate() {
                let (i, v) = (i as i32, value(bar));
                let color = Palette99::pick(i as usize).to_rgba();
                let mut rect = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), v),
                    ],
                    color.filled(),
                );
                rect.set_margin(0, 0, 24, 24);
                chart.draw_series([rect]).map_err(drawing)?;
                let text = if v < 1.0 {
                    format!("{v:.4}")
                } else {
                    format!("{v:.1}")
                };
                let label = EmptyElement::at((SegmentValue::CenterOf(i), v))
                    + Text::new(text, (-20, -20), ("sans-serif", 14));
                chart.draw_series([label]).map_err(drawing)?;
            }
        }
        Ok(())
    }
}

/// One sampler setting's figures.
struct SamplerPoint {
    sampler: &'static str,
    /// Its setting, as the picture labels it.
    setting: String,
    cost: SamplingCost,
    quality: SampleReport,
}

/// `bd3lm plot samplers`.
pub(super) fn samplers(args: &ReportArgs) -> anyhow::Result<()> {
    let reports = load(
        &args.reports,
        |r| {
            let samples = r.samples.clone()?;
            Some((r.sampling?, samples.cost?, samples))
        },
        "judged samples (--judge)",
    )?;
    let mut points: Vec<SamplerPoint> = reports
        .iter()
        .map(|(_, (params, cost, quality))| SamplerPoint {
            sampler: params.sampler.name(),
            setting: match params.sampler.threshold() {
                Some(threshold) => format!("{threshold}"),
                None => format!("T = {}", params.steps),
            },
            cost: *cost,
            quality: quality.clone(),
        })
        .collect();
    points.sort_by(|a, b| {
        let key = |p: &SamplerPoint| (p.sampler, p.cost.forward_passes_per_token);
        key(a).partial_cmp(&key(b)).expect("finite figures")
    });
    let held_out = reports.iter().find_map(|(r, _)| r.held_out.clone());
    println!(
        "| sampler | setting | forward passes / token | tokens/s | generative perplexity | unigram entropy (nats) |"
    );
    println!("|---|---|---|---|---|---|");
    for p in &points {
        println!(
            "| {} | {} | {:.3} | {:.0} | {:.1} | {:.2} |",
            p.sampler,
            p.setting,
            p.cost.forward_passes_per_token,
            p.cost.tokens_per_s,
            p.quality.gen_ppl,
            p.quality.unigram_entropy,
        );
    }
    if let Some(real) = &held_out {
        println!(
            "| held-out text | | | | {:.1} | {:.2} |",
            real.gen_ppl, real.unigram_entropy
        );
    }
    let figure = Samplers {
        points: &points,
        held_out: held_out.map(|r| r.gen_ppl),
        title: args
            .picture
            .title_or(|| "Sample quality against forward passes".into()),
    };
    render(&args.picture, &figure)
}

struct Samplers<'a> {
    points: &'a [SamplerPoint],
    held_out: Option<f64>,
    title: String,
}

impl Picture for Samplers<'_> {
    fn draw<B: DrawingBackend>(&self, root: &DrawingArea<B, Shift>) -> anyhow::Result<()>
    where
        B::ErrorType: 'static,
    {
        let x = |p: &SamplerPoint| p.cost.forward_passes_per_token;
        let y = |p: &SamplerPoint| p.quality.gen_ppl;
        let right = self.points.iter().map(x).fold(0.0, f64::max) * 1.15;
        let ys = self.points.iter().map(y).chain(self.held_out);
        let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(v), h.max(v)));
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..right.max(1e-3), ((lo * 0.8)..(hi * 1.25)).log_scale())
            .map_err(drawing)?;
        chart
            .configure_mesh()
            .x_desc("denoising forward passes per token")
            .y_desc("generative perplexity (SmolLM2-135M), log scale")
            .y_labels(8)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(drawing)?;
        let mut kinds: Vec<&str> = self.points.iter().map(|p| p.sampler).collect();
        kinds.dedup();
        for (i, kind) in kinds.into_iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let line: Vec<(f64, f64)> = self
                .points
                .iter()
                .filter(|p| p.sampler == kind)
                .map(|p| (x(p), y(p)))
                .collect();
            chart
                .draw_series(LineSeries::new(line, color.stroke_width(2)))
                .map_err(drawing)?
                .label(kind)
                .legend(line_key(color.stroke_width(2)));
            let marks = self.points.iter().filter(|p| p.sampler == kind).map(|p| {
                EmptyElement::at((x(p), y(p)))
                    + Circle::new((0, 0), 5, color.filled())
                    + Text::new(p.setting.clone(), (7, -16), ("sans-serif", 13))
            });
            chart.draw_series(marks).map_err(drawing)?;
        }
        if let Some(real) = self.held_out {
            let grey = BLACK.mix(0.5).stroke_width(1);
            chart
                .draw_series(LineSeries::new([(0.0, real), (right, real)], grey))
                .map_err(drawing)?
                .label("held-out real text")
                .legend(line_key(grey));
        }
        legend(&mut chart, SeriesLabelPosition::LowerRight)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::tests::{picture, png_size};
    use super::*;
    use crate::eval::ModelFacts;
    use bd3lm_diffusion::SamplingParams;
    use bd3lm_sampling::Sampler;
    use bd3lm_training::bound::ObjectiveVariance;

    fn facts(block_size: usize) -> ModelFacts {
        ModelFacts {
            block_size,
            model_length: 128,
            parameters: 1000,
            eps_min: 1e-3,
            eps_max: 1.0,
            trained_steps: Some(10),
            trained_tokens: Some(20480),
        }
    }

    fn report(model: ModelFacts) -> Report {
        Report {
            checkpoint: "runs/x/checkpoint".into(),
            untrained: false,
            model,
            bound: None,
            objective_variance: Vec::new(),
            sampling: None,
            samples: None,
            held_out: None,
        }
    }

    fn samples(gen_ppl: f64, cost: Option<SamplingCost>) -> SampleReport {
        SampleReport {
            samples: 2,
            tokens_per_sample: 8,
            gen_ppl,
            judged_tokens: 16,
            unigram_entropy: 2.0,
            cost,
            texts: vec!["a".into(), "b".into()],
        }
    }

    /// Writes `reports` as JSON files into `dir`, as `bd3lm eval` would.
    fn write(dir: &Path, reports: Vec<Report>) -> Vec<std::path::PathBuf> {
        reports
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let path = dir.join(format!("{i}.json"));
                std::fs::write(&path, serde_json::to_string(&r).unwrap()).unwrap();
                path
            })
            .collect()
    }

    fn args(reports: Vec<std::path::PathBuf>, out: std::path::PathBuf) -> ReportArgs {
        ReportArgs {
            reports,
            picture: picture(out, (700, 450)),
        }
    }

    /// The three pictures draw from small reports, as PNG and as SVG holding their series.
    #[test]
    fn the_study_pictures_draw_from_eval_reports() {
        let dir = tempfile::tempdir().unwrap();
        let bounds: Vec<Report> = [(1, 3.0), (4, 3.4), (16, 3.6), (128, 3.9)]
            .into_iter()
            .map(|(bs, nll)| Report {
                bound: Some(Bound {
                    nll,
                    ppl: f64::exp(nll),
                    tokens: 100,
                }),
                objective_variance: vec![ObjectiveVariance {
                    eps_min: if bs == 16 { 0.3 } else { 1e-3 },
                    eps_max: 1.0,
                    batches: 4,
                    batch_size: 2,
                    mean: nll,
                    variance: 0.01 * nll,
                }],
                ..report(facts(bs))
            })
            .collect();
        let bound_files = write(dir.path(), bounds);
        block_sizes(&args(bound_files.clone(), dir.path().join("b.png"))).unwrap();
        assert_eq!(png_size(&dir.path().join("b.png")), (700, 450));
        block_sizes(&args(bound_files.clone(), dir.path().join("b.svg"))).unwrap();
        let svg = std::fs::read_to_string(dir.path().join("b.svg")).unwrap();
        assert!(svg.contains("paper: OpenWebText"), "{svg:.300}");
        assert!(svg.contains("MDLM (L&apos; = n = 128)") || svg.contains("MDLM (L' = n = 128)"));
        assert!(svg.contains("20.73"), "the paper's L' = 4 figure is marked");
        let two = bound_files[1..3].to_vec();
        variance(&args(two, dir.path().join("v.svg"))).unwrap();
        let svg = std::fs::read_to_string(dir.path().join("v.svg")).unwrap();
        assert!(svg.contains("clipped [0.3, 1]") && svg.contains("full [0.001, 1]"));

        let sampled: Vec<Report> = [
            (Sampler::FirstHitting, 4, 1.0, 300.0),
            (Sampler::Ddpm, 1, 0.25, 900.0),
            (Sampler::Ddpm, 4, 0.9, 320.0),
            (Sampler::Confidence { threshold: 0.9 }, 4, 0.8, 310.0),
        ]
        .into_iter()
        .map(|(sampler, steps, passes, gen_ppl)| {
            let cost = SamplingCost {
                forward_passes_per_token: passes,
                tokens_per_s: 100.0 / passes,
            };
            Report {
                sampling: Some(SamplingParams {
                    sampler,
                    steps,
                    ..SamplingParams::new(4)
                }),
                samples: Some(samples(gen_ppl, Some(cost))),
                held_out: Some(samples(50.0, None)),
                ..report(facts(4))
            }
        })
        .collect();
        let sub = dir.path().join("samplers");
        std::fs::create_dir(&sub).unwrap();
        let files = write(&sub, sampled);
        samplers(&args(files, dir.path().join("s.svg"))).unwrap();
        let svg = std::fs::read_to_string(dir.path().join("s.svg")).unwrap();
        for name in [
            "first-hitting",
            "ddpm",
            "confidence",
            "held-out real text",
            "T = 1",
        ] {
            assert!(svg.contains(name), "{name} is drawn");
        }
    }

    /// A report without what the picture needs, or not a report, is named.
    #[test]
    fn reports_missing_figures_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = write(dir.path(), vec![report(facts(4))]);
        let err = block_sizes(&args(files.clone(), dir.path().join("b.svg"))).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("0.json: no perplexity bound (--data) in this report"),
            "{err}"
        );
        let err = samplers(&args(files, dir.path().join("s.svg"))).unwrap_err();
        assert!(err.to_string().contains("no judged samples"), "{err}");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{}").unwrap();
        let err = variance(&args(vec![bad], dir.path().join("v.svg"))).unwrap_err();
        assert!(
            err.to_string()
                .contains("bad.json: not a bd3lm eval report"),
            "{err}"
        );
    }
}
